"""DPStep: noise once per logical step, expected-batch denominator, chunking, world, resume."""
from __future__ import annotations

import json
import threading

import pytest
import torch
from torch import nn

from dpldm.privacy import (DPStep, DPStepOrderError, GaussianNoise, PoissonPlan, PrivacyLedger, World,
                           clipped_gradient_sum)

DT = torch.float64
N, D_IN, D_OUT = 40, 30, 20


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, D_OUT), nn.Tanh(), nn.LayerNorm(D_OUT)).to(DT)


DATA = torch.randn(N, 3, D_IN, generator=torch.Generator().manual_seed(7), dtype=DT)


def loss_fn(model, idx):  # the batch is a tensor of example indices into DATA
    return model(DATA[idx]).pow(2).sum(dim=(1, 2))


def make_ledger(q=0.25, sigma=1.3, C=0.5, seed=11):
    return PrivacyLedger(noise_multiplier=sigma, max_grad_norm=C, plan=PoissonPlan(N, q, seed), delta=1e-3)


def run_step(dp, chunk_size):
    idx = dp.begin_step()
    for s in range(0, len(idx), chunk_size):
        dp.accumulate(idx[s:s + chunk_size])
    dp.step()
    return idx, {n: t.clone() for n, t in dp.update.items()}


def test_update_is_noisy_sum_over_expected_batch_not_realised():
    """update = (sum_i clip(g_i) + Z) / (q*N), with Z the step's one draw; q*N != |batch|."""
    model, ledger = make_model(), make_ledger()
    dp = DPStep(model, loss_fn, ledger, noise=GaussianNoise(seed=5))
    idx, upd = run_step(dp, chunk_size=4)
    assert len(idx) != ledger.expected_batch_size  # realised 13 vs expected 10: the two differ
    S = clipped_gradient_sum(model, loss_fn, idx, ledger.max_grad_norm)
    names = list(S)
    Z = GaussianNoise(seed=5).draw([S[n] for n in names], ledger.noise_std, 0)
    for n, z in zip(names, Z):
        want = (S[n] + z) / (ledger.sample_rate * N)
        torch.testing.assert_close(upd[n], want, rtol=1e-10, atol=1e-12)
        wrong = (S[n] + z) / len(idx)  # the classic mistake
        assert not torch.allclose(upd[n], wrong, rtol=1e-3)


def test_noise_std_matches_sigma_C_over_qN():
    """Empirical std of (update - clipped_sum/(qN)) is sigma*C/(qN) within 5%, seeded and OS modes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 100)).to(torch.float32)
    data = torch.randn(N, 100)
    lf = lambda m, idx: m(data[idx]).pow(2).sum(dim=1)  # noqa: E731
    for noise in (GaussianNoise(seed=3), GaussianNoise(), GaussianNoise(secure=True)):
        ledger = PrivacyLedger(noise_multiplier=0.8, max_grad_norm=2.0, plan=PoissonPlan(N, 0.2, 1), delta=1e-3)
        dp = DPStep(model, lf, ledger, noise=noise)
        idx = dp.begin_step()
        dp.accumulate(idx)
        dp.step()
        S = clipped_gradient_sum(model, lf, idx, 2.0)
        resid = torch.cat([(dp.update[n] - S[n] / (0.2 * N)).flatten() for n in S])  # 10100 coordinates
        want = 0.8 * 2.0 / (0.2 * N)
        assert abs(float(resid.std()) / want - 1) < 0.05, (noise.mode, float(resid.std()), want)
        assert abs(float(resid.mean())) < 4 * want / resid.numel() ** 0.5
        assert dp.update["0.weight"].dtype == torch.float32


@pytest.mark.parametrize("chunk_sizes", [(2, 5, 1000)])
def test_exactly_one_draw_per_step_however_chunked(chunk_sizes):
    """Noise per chunk (instead of per logical step) would give more draws and a different,
    larger noise; with seeded noise every chunking gives the same update."""
    results = []
    for cs in chunk_sizes:
        model = make_model()
        noise = GaussianNoise(seed=9)
        dp = DPStep(model, loss_fn, make_ledger(), noise=noise)
        ups = [run_step(dp, cs)[1] for _ in range(3)]
        assert noise.draws == 3 and dp.ledger.steps_done == 3
        results.append(ups)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            for n in a:
                torch.testing.assert_close(a[n], b[n], rtol=1e-9, atol=1e-12)


def test_empty_batch_still_gets_noise_and_accounting():
    seed = next(s for s in range(500) if len(PoissonPlan(N, 0.01, s).indices(0)) == 0)
    ledger = PrivacyLedger(noise_multiplier=1.0, max_grad_norm=1.0, plan=PoissonPlan(N, 0.01, seed), delta=1e-3)
    step = 0
    noise = GaussianNoise(seed=1)
    dp = DPStep(make_model(), loss_fn, ledger, noise=noise)
    idx = dp.begin_step()
    assert idx.numel() == 0
    dp.accumulate(idx)  # an empty chunk is fine too
    dp.step()
    assert noise.draws == 1 and ledger.steps_done == step + 1
    flat = torch.cat([t.flatten() for t in dp.update.values()])
    assert float(flat.abs().max()) > 0  # pure noise, not zeros and not a skipped step
    assert all(torch.isfinite(t).all() for t in dp.update.values())


def test_named_parts_only_in_order():
    dp = DPStep(make_model(), loss_fn, make_ledger(), noise=GaussianNoise(seed=1))
    with pytest.raises(DPStepOrderError):
        dp.accumulate(torch.tensor([0]))  # before begin_step
    with pytest.raises(DPStepOrderError):
        dp.add_noise()
    idx = dp.begin_step()
    dp.accumulate(idx)
    with pytest.raises(DPStepOrderError):
        dp.scale()  # before noise
    dp.add_noise()
    with pytest.raises(DPStepOrderError):
        dp.add_noise()  # twice in one step
    with pytest.raises(DPStepOrderError):
        dp.accumulate(idx)  # after noise
    with pytest.raises(DPStepOrderError):
        dp.state_dict()  # mid-step
    dp.reduce()
    dp.scale()
    dp.step()
    assert dp.noise.draws == 1 and dp.ledger.steps_done == 1


def test_fixed_size_batches_instead_of_poisson_sample_refused():
    """Classic mistake: shuffled fixed-size batches accounted as Poisson. Accumulating anything
    but this step's Poisson sample fails before any noise or accounting."""
    dp = DPStep(make_model(), loss_fn, make_ledger(), noise=GaussianNoise(seed=1))
    idx = dp.begin_step()
    fixed = torch.randperm(N)[:10]  # expected batch size, shuffled
    assert len(idx) != 10
    dp.accumulate(fixed)
    with pytest.raises(DPStepOrderError, match="Poisson sample"):
        dp.add_noise()
    assert dp.noise.draws == 0 and dp.ledger.steps_done == 0


def test_grads_written_and_optimizer_stepped():
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dp = DPStep(model, loss_fn, make_ledger(), noise=GaussianNoise(seed=2), optimizer=opt)
    idx = dp.begin_step()
    dp.accumulate(idx)
    dp.step()
    for b, (n, p) in zip(before, model.named_parameters()):
        torch.testing.assert_close(p.detach(), b - 0.1 * dp.update[n])
        assert p.grad is None  # zeroed after the optimizer step


def _all_reduce_group(world_size):
    """An in-process SUM all-reduce over threads (stands in for torch.distributed)."""
    barrier = threading.Barrier(world_size)
    slots: list = [None] * world_size

    def make(rank):
        def all_reduce_sum(tensors):
            slots[rank] = [t.clone() for t in tensors]
            barrier.wait()
            total = [sum(slots[r][i] for r in range(world_size)) for i in range(len(tensors))]
            barrier.wait()
            for t, s in zip(tensors, total):
                t.copy_(s)
        return all_reduce_sum
    return make


@pytest.mark.parametrize("W", [2, 3])
def test_world_ranks_sum_clipped_sums_and_add_noise_once(W):
    single = DPStep(make_model(), loss_fn, make_ledger(), noise=GaussianNoise(seed=4))
    want = [run_step(single, 2)[1] for _ in range(2)]
    make = _all_reduce_group(W)
    out: list = [None] * W
    noises = [GaussianNoise(seed=4) for _ in range(W)]
    models = [make_model() for _ in range(W)]  # built here: make_model seeds the global RNG
    errors = []

    def rank_main(r):
        try:
            dp = DPStep(models[r], loss_fn, make_ledger(), noise=noises[r],
                        world=World(rank=r, world_size=W, all_reduce_sum=make(r)))
            out[r] = [run_step(dp, 2)[1] for _ in range(2)]
        except Exception as e:  # pragma: no cover - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(W)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert [n.draws for n in noises] == [2] + [0] * (W - 1)  # one draw per step, globally
    for r in range(W):
        for a, b in zip(want, out[r]):
            for n in a:
                torch.testing.assert_close(b[n], a[n], rtol=1e-9, atol=1e-12)


def test_resume_gives_same_params_and_epsilon():
    """Train 6 steps; versus 3 steps, checkpoint (JSON ledger + tensors), rebuild, 3 more."""
    def fresh(state=None, params=None):
        model = make_model()
        if params is not None:
            model.load_state_dict(params)
        ledger = make_ledger() if state is None else PrivacyLedger.from_state_dict(state)
        dp = DPStep(model, loss_fn, ledger, noise=GaussianNoise(seed=21),
                    optimizer=torch.optim.SGD(model.parameters(), lr=0.05))
        return model, dp

    m_full, dp_full = fresh()
    for _ in range(6):
        run_step(dp_full, 5)
    m_a, dp_a = fresh()
    for _ in range(3):
        run_step(dp_a, 5)
    state = json.loads(json.dumps(dp_a.state_dict()["ledger"]))  # through JSON, as in meta.json
    params = {k: v.clone() for k, v in m_a.state_dict().items()}
    del m_a, dp_a
    m_b, dp_b = fresh(state, params)
    assert dp_b.ledger.steps_done == 3
    for _ in range(3):
        run_step(dp_b, 5)
    for (n, a), b in zip(m_full.state_dict().items(), m_b.state_dict().values()):
        assert torch.equal(a, b), n
    assert dp_b.ledger.epsilon_spent() == dp_full.ledger.epsilon_spent()
    assert dp_b.ledger.state_dict() == dp_full.ledger.state_dict()


def test_nonfinite_in_dpstep_raises_with_step_and_adds_nothing():
    model = make_model()
    data = DATA.clone()

    def bad_loss(m, idx):
        x = data[idx] + float("nan")
        return m(x).pow(2).sum(dim=(1, 2))

    dp = DPStep(model, bad_loss, make_ledger(), noise=GaussianNoise(seed=1))
    idx = dp.begin_step()
    from dpldm.privacy import NonFiniteGradientError

    with pytest.raises(NonFiniteGradientError, match="logical step 0"):
        dp.accumulate(idx)
    assert dp.noise.draws == 0 and dp.ledger.steps_done == 0


def test_memory_flat_in_logical_batch():
    """Between chunks only the fp32/fp64 accumulators persist: no recorded activations or
    gradients survive a chunk, however many chunks the logical step has."""
    dp = DPStep(make_model(), loss_fn, make_ledger(q=1.0), noise=GaussianNoise(seed=1))
    idx = dp.begin_step()
    assert len(idx) == N
    for s in range(0, N, 3):
        dp.accumulate(idx[s:s + 3])
        assert all(not r.calls and r._prep is None for r in dp.engine.rules)
    assert set(dp.acc) == set(dp.params)
    assert all(dp.acc[n].shape == p.shape for n, p in dp.params.items())
    dp.step()


def test_noise_uses_dedicated_generators_not_the_global_rng():
    from dpldm.kernels.secure_noise import SecureGaussian

    like = [torch.zeros(50, 40)]
    for noise in (GaussianNoise(), GaussianNoise(seed=3), GaussianNoise(secure=True)):
        state = torch.get_rng_state()
        z = noise.draw(like, 2.0, step=0)[0]
        assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
        assert z.dtype == torch.float32 and z.shape == (50, 40) and float(z.std()) > 1.0
    assert isinstance(GaussianNoise(secure=True)._secure, SecureGaussian)  # the CSPRNG, not the fallback
    a, b = GaussianNoise().draw(like, 1.0, 0)[0], GaussianNoise().draw(like, 1.0, 0)[0]
    assert not torch.equal(a, b)  # OS-seeded: fresh noise even for the same step
    s1, s2 = GaussianNoise(seed=3).draw(like, 1.0, 4)[0], GaussianNoise(seed=3).draw(like, 1.0, 4)[0]
    assert torch.equal(s1, s2) and not torch.equal(s1, GaussianNoise(seed=3).draw(like, 1.0, 5)[0])
    with pytest.raises(ValueError, match="secure"):
        GaussianNoise(secure=True, seed=1)
