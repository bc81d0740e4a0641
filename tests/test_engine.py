"""Book-keeping clipping engine against an independent float64 per-example loop.

The reference clips each example's full gradient (torch.autograd.grad of that example's loss
alone) and sums; the engine does one batched forward/backward. Relative 1e-6 in float64.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpldm.privacy import (BookKeepingEngine, NonFiniteGradientError, RowMismatchError, UnsupportedLayerError,
                           clipped_gradient_sum)
from helpers import assert_close, norms_of, per_example_grads, reference_clipped_sum, repeat_k, unet_k_case

DT = torch.float64


# --- independent reference --------------------------------------------------------------------------

# --- models: each with a per-example loss that repeats every example K times ------------------------



class LinearSeq(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 5)

    def forward(self, x):  # (R, T, 6) -> (R,)
        return torch.tanh(self.lin(x)).pow(2).sum(dim=(1, 2))


class LinearVec(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 5)
        self.out = nn.Linear(5, 1)

    def forward(self, x):  # (R, 6) -> (R,)
        return self.out(torch.tanh(self.lin(x))).squeeze(-1).pow(2)


class LNModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(6)
        self.register_buffer("w", torch.randn(6))

    def forward(self, x):  # (R, T, 6)
        return (torch.sin(self.ln(x)) * self.w).sum(dim=(1, 2))


class GNModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.gn = nn.GroupNorm(2, 4)
        self.register_buffer("w", torch.randn(4, 3, 3))

    def forward(self, x):  # (R, 4, 3, 3)
        return (torch.sin(self.gn(x)) * self.w).sum(dim=(1, 2, 3))


class EmbModel(nn.Module):
    def __init__(self, padding_idx=None):
        super().__init__()
        self.emb = nn.Embedding(5, 4, padding_idx=padding_idx)
        self.register_buffer("w", torch.randn(4))

    def forward(self, idx):  # (R, T) with repeated indices inside a row
        return torch.tanh(self.emb(idx) @ self.w).pow(2).sum(dim=1)


class Block(nn.Module):
    """GroupNorm -> proj_in -> LN/self-attn -> LN/cross-attn to an embedded class -> LN/FF -> proj_out."""

    def __init__(self, c=8, heads=2, n_cls=4):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(2, c)
        self.proj_in = nn.Linear(c, c)
        self.n1, self.n2, self.n3 = nn.LayerNorm(c), nn.LayerNorm(c), nn.LayerNorm(c)
        self.q1, self.k1, self.v1 = (nn.Linear(c, c, bias=False) for _ in range(3))
        self.o1 = nn.Linear(c, c)
        self.q2, self.k2, self.v2 = (nn.Linear(c, c, bias=False) for _ in range(3))
        self.o2 = nn.Linear(c, c)
        self.ff1, self.ff2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)
        self.proj_out = nn.Linear(c, c)
        self.emb = nn.Embedding(n_cls, c)

    def attn(self, q, k, v, o, x, ctx):
        b, t, c = x.shape
        h = self.heads
        Q = q(x).view(b, t, h, c // h).transpose(1, 2)
        K_ = k(ctx).view(b, ctx.shape[1], h, c // h).transpose(1, 2)
        V = v(ctx).view(b, ctx.shape[1], h, c // h).transpose(1, 2)
        a = torch.softmax(Q @ K_.transpose(-1, -2) / math.sqrt(c // h), dim=-1)
        return o((a @ V).transpose(1, 2).reshape(b, t, c))

    def forward(self, x, y):  # x (R, C, H, W), y (R,)
        b, c, hh, ww = x.shape
        ctx = torch.cat([self.emb(y)[:, None], self.emb((y + 1) % self.emb.num_embeddings)[:, None]], dim=1)
        t = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # (R, HW, C)
        n = self.n1(t)
        t = t + self.attn(self.q1, self.k1, self.v1, self.o1, n, n)
        t = t + self.attn(self.q2, self.k2, self.v2, self.o2, self.n2(t), ctx)
        t = t + self.ff2(F.gelu(self.ff1(self.n3(t))))
        out = x + self.proj_out(t).transpose(1, 2).reshape(b, c, hh, ww)
        return out.pow(2).mean(dim=(1, 2, 3))


def _case(kind, B, K):
    g = torch.Generator().manual_seed(100 + B * 10 + K)
    r = lambda *s: torch.randn(*s, generator=g, dtype=DT)  # noqa: E731
    if kind == "linear_seq":
        model, batch, shift = LinearSeq(), (r(B, 3, 6),), r(K, 3, 6) * 0.3
    elif kind == "linear_vec":
        model, batch, shift = LinearVec(), (r(B, 6),), r(K, 6) * 0.3
    elif kind == "layernorm":
        model, batch, shift = LNModel(), (r(B, 3, 6),), r(K, 3, 6) * 0.3
    elif kind == "groupnorm":
        model, batch, shift = GNModel(), (r(B, 4, 3, 3),), r(K, 4, 3, 3) * 0.3
    elif kind == "embedding":
        model = EmbModel(padding_idx=1)
        batch, shift = (torch.randint(0, 5, (B, 6), generator=g),), None
    elif kind == "block":
        model = Block()
        batch = (r(B, 8, 2, 3), torch.randint(0, 4, (B,), generator=g))
        shift = r(K, 8, 2, 3) * 0.3
    else:
        raise AssertionError(kind)
    model = model.to(DT)

    def loss_fn(m, bt):
        x = bt[0]
        xr = repeat_k(x, K, shift)
        if kind == "block":
            out = m(xr, bt[1].repeat_interleave(K))
        elif kind == "embedding":  # copy k looks up (idx + k) % 5: different rows per copy
            offs = torch.arange(K).repeat(x.shape[0]).view(-1, 1)
            out = m((xr + offs) % 5)
        else:
            out = m(xr)
        return out.view(-1, K).mean(dim=1)  # (B,) average of the K copies BEFORE clipping

    return model, batch, loss_fn


KINDS = ["linear_seq", "linear_vec", "layernorm", "groupnorm", "embedding", "block"]


@pytest.mark.parametrize("method", ["ghost", "materialize"])
@pytest.mark.parametrize("K", [1, 4])
@pytest.mark.parametrize("B", [0, 1, 7])
@pytest.mark.parametrize("kind", KINDS)
def test_clipped_sum_matches_per_example_loop(kind, B, K, method):
    model, batch, loss_fn = _case(kind, B, K)
    grads = per_example_grads(model, loss_fn, batch, B)
    norms = sorted(norms_of(grads))
    C = norms[len(norms) // 2] if norms else 1.0  # median: some examples clipped, some not
    want = reference_clipped_sum(model, grads, C)
    got = clipped_gradient_sum(model, loss_fn, batch, C, norm_method=method)
    assert_close(got, want)
    for p in model.parameters():
        assert p.grad is None  # the engine never writes param.grad


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_auto_method_picks_both_paths(backend):
    """Short sequences go ghost, long ones materialised/fused (the kernels' rule for the backend);
    every path gives the loop's answer."""
    from dpldm.kernels import choose_method
    from dpldm.kernels.registry import cpu_method

    lin = nn.Linear(4, 4).to(DT)
    model = nn.Sequential(lin)
    seen = set()
    for T in (1, 9):
        x = torch.randn(3, T, 4, dtype=DT)
        loss_fn = lambda m, b: m(b[0]).pow(2).sum(dim=(1, 2))  # noqa: E731
        eng = BookKeepingEngine(model, 0.5, backend=backend)
        got = eng.clipped_sums(loss_fn, (x,)).sums
        want = choose_method(T, 4, 4, "torch") if backend == "torch" else cpu_method(T, 4, 4)
        assert eng.methods["0"] == want  # the documented fixed rule (no selector)
        assert eng.kernels_used["0"]["linear_sqnorm"].split("/")[1] == want
        seen.add(eng.methods["0"])
        assert_close(got, reference_clipped_sum(model, per_example_grads(model, loss_fn, (x,), 3), 0.5))
    assert "ghost" in seen and len(seen) == 2


def test_torch_backend_matches_loop_on_block():
    """The plain-PyTorch kernels (the reference backend) under the engine, K=4."""
    model, batch, loss_fn = _case("block", 7, 4)
    grads = per_example_grads(model, loss_fn, batch, 7)
    C = sorted(norms_of(grads))[3]
    assert_close(clipped_gradient_sum(model, loss_fn, batch, C, backend="torch"), reference_clipped_sum(model, grads, C))


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_layers_sharing_an_input_are_grouped_exactly(backend):
    """q1/k1/v1 read one LayerNorm output and k2/v2 one context: each set shares one norm kernel and
    one clipped-sum GEMM (LinearGroup); the sums equal the ungrouped engine's and the loop's."""
    model, batch, loss_fn = _case("block", 6, 2)
    grads = per_example_grads(model, loss_fn, batch, 6)
    C = sorted(norms_of(grads))[3]
    grouped = BookKeepingEngine(model, C, backend=backend)
    plain = BookKeepingEngine(model, C, backend=backend, group_shared_inputs=False)
    got = grouped.clipped_sums(loss_fn, batch).sums
    assert_close(got, plain.clipped_sums(loss_fn, batch).sums, rel=1e-12)
    assert_close(got, reference_clipped_sum(model, grads, C))
    groups = {d.get("group") for d in grouped.kernels_used.values()}
    assert groups == {None, "q1+k1+v1", "k2+v2"}  # q2 reads n2(t), not the context: alone
    assert "group" not in plain.kernels_used["q1"]


def test_k_copies_clipped_jointly_not_separately():
    """Classic mistake: clipping each of the K copies on its own gives sensitivity K*C. The
    engine's per-example contribution is the joint clip, of norm <= C."""
    torch.manual_seed(1)
    model = LinearSeq().to(DT)
    x, shift, K, C = torch.randn(1, 3, 6, dtype=DT), torch.randn(4, 3, 6, dtype=DT), 4, 1e-3

    def loss_fn(m, b):
        return m(repeat_k(b[0], K, shift)).view(-1, K).mean(dim=1)

    got = clipped_gradient_sum(model, loss_fn, (x,), C)
    norm = math.sqrt(sum(float((t ** 2).sum()) for t in got.values()))
    assert norm == pytest.approx(C, rel=1e-6)  # clipped jointly: exactly C
    sep = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for k in range(K):  # the mistake: each copy's gradient clipped to C, then summed
        gs = torch.autograd.grad(model(x + shift[k:k + 1])[0] / K, list(model.parameters()))
        nk = math.sqrt(sum(float((t ** 2).sum()) for t in gs))
        for (n, _), t in zip(model.named_parameters(), gs):
            sep[n] += min(1.0, C / (nk + 1e-6)) * t
    sep_norm = math.sqrt(sum(float((t ** 2).sum()) for t in sep.values()))
    assert sep_norm > 1.5 * C  # up to K*C: the mistake's sensitivity; the engine's stays C
    assert float(sum(((got[n] - sep[n]) ** 2).sum() for n in sep)) > (0.1 * C) ** 2


def test_weight_sharing_calls_concatenate():
    """One Linear used twice in a forward (and on inputs of different lengths)."""
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 5)
            self.ln = nn.LayerNorm(5)
            self.emb = nn.Embedding(4, 5)

        def forward(self, x, y):
            h = self.lin(torch.tanh(self.lin(x)))  # (B, 3, 5) twice through lin
            c = self.lin(self.emb(y)[:, None] + self.emb((y + 1) % 4)[:, None])  # (B, 1, 5) a third time
            return self.ln(self.ln(h) + c).pow(2).sum(dim=(1, 2))

    model = Shared().to(DT)
    x, y = torch.randn(7, 3, 5, dtype=DT), torch.randint(0, 4, (7,))
    loss_fn = lambda m, b: m(*b)  # noqa: E731
    grads = per_example_grads(model, loss_fn, (x, y), 7)
    C = sorted(norms_of(grads))[3]
    for method in ("ghost", "materialize"):
        assert_close(clipped_gradient_sum(model, loss_fn, (x, y), C, norm_method=method),
                     reference_clipped_sum(model, grads, C))


def test_partially_frozen_layers():
    """Frozen weight with trainable bias (and vice versa) in Linear and LayerNorm."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.LayerNorm(6), nn.Linear(6, 3)).to(DT)
    model[0].weight.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    model[3].bias.requires_grad_(False)
    x = torch.randn(7, 2, 4, dtype=DT)
    loss_fn = lambda m, b: m(b[0]).pow(2).sum(dim=(1, 2))  # noqa: E731
    grads = per_example_grads(model, loss_fn, (x,), 7)
    C = sorted(norms_of(grads))[3]
    got = clipped_gradient_sum(model, loss_fn, (x,), C)
    assert set(got) == {"0.bias", "2.weight", "3.weight"}
    assert_close(got, reference_clipped_sum(model, grads, C))


def test_agrees_with_opacus_hooks():
    """Opacus 1.6 GradSampleModule (hooks) + DPOptimizer.clip_and_accumulate vs the engine."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(6, 8)
            self.lin1 = nn.Linear(8, 16)
            self.ln = nn.LayerNorm(16)
            self.gn = nn.GroupNorm(4, 16)
            self.lin2 = nn.Linear(16, 2)

        def forward(self, idx, x):  # idx (B, T), x (B, T, 8)
            h = torch.tanh(self.lin1(x + self.emb(idx)))  # (B, T, 16)
            h = self.gn(self.ln(h).transpose(1, 2)).transpose(1, 2)
            return self.lin2(h).pow(2).sum(dim=(1, 2))

    torch.manual_seed(3)
    net = Net().to(DT)
    idx, x = torch.randint(0, 6, (9, 5)), torch.randn(9, 5, 8, dtype=DT)
    norms = sorted(norms_of(per_example_grads(net, lambda m, b: m(*b), (idx, x), 9)))
    C = norms[4]  # median: some examples clipped, some not
    ours = clipped_gradient_sum(net, lambda m, b: m(*b), (idx, x), C)

    gsm = GradSampleModule(net, loss_reduction="sum")  # hooks mode
    opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=C,
                      expected_batch_size=9, loss_reduction="sum")
    gsm(idx, x).sum().backward()
    opt.clip_and_accumulate()
    theirs = {n: p.summed_grad for n, p in net.named_parameters()}
    assert_close(ours, theirs)
    gsm._close()


def test_unsupported_trainable_layer_refused_at_setup():
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(2, 1))  # (Conv2d has a rule)
    with pytest.raises(UnsupportedLayerError, match=r"'0\.weight'.*Conv1d"):
        BookKeepingEngine(model, 1.0)
    model[0].requires_grad_(False)
    BookKeepingEngine(model, 1.0)  # frozen conv is fine

    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.zeros(3))
            self.lin = nn.Linear(3, 1)

    with pytest.raises(UnsupportedLayerError, match=r"'pos'"):
        BookKeepingEngine(Bare(), 1.0)

    class OwnForward(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(UnsupportedLayerError, match="OwnForward"):
        BookKeepingEngine(nn.Sequential(OwnForward(2, 2)), 1.0)
    with pytest.raises(UnsupportedLayerError, match="scale_grad_by_freq"):
        BookKeepingEngine(nn.Sequential(nn.Embedding(3, 2, scale_grad_by_freq=True)), 1.0)
    mha = nn.MultiheadAttention(4, 2)
    with pytest.raises(UnsupportedLayerError, match="in_proj_weight"):
        BookKeepingEngine(mha, 1.0)


def test_explicit_backend_that_cannot_run_is_refused_at_setup():
    from dpldm.kernels import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match=r"backend 'cuda' is unavailable .* on cpu"):
        BookKeepingEngine(nn.Linear(3, 2), 1.0, backend="cuda")


def test_embedding_max_norm_refused_trainable_or_frozen():
    """max_norm renorms the looked-up rows in place during the forward: the weights would move with
    the private batch outside the noised update (shown first, then refused)."""
    emb = nn.Embedding(4, 3, max_norm=0.5)
    with torch.no_grad():
        emb.weight.mul_(10)
    before = emb.weight.detach().clone()
    emb(torch.tensor([2]))
    changed = (emb.weight.detach() != before).any(dim=1)
    assert changed.tolist() == [False, False, True, False]  # the leak: exactly the row the batch used
    model = nn.Sequential(nn.Embedding(4, 3, max_norm=1.0), nn.Linear(3, 1))
    with pytest.raises(UnsupportedLayerError, match=r"embedding '0' \(trainable\) has max_norm=1.0"):
        BookKeepingEngine(model, 1.0)
    model[0].requires_grad_(False)
    with pytest.raises(UnsupportedLayerError, match=r"embedding '0' \(frozen\) has max_norm"):
        BookKeepingEngine(model, 1.0)
    model[0].max_norm = None
    BookKeepingEngine(model, 1.0)


class _NormNet(nn.Module):
    """A frozen statistics layer in front of a trainable head: (R, 3, *spatial) -> (R,)."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm
        self.head = nn.Linear(3, 1)

    def forward(self, x):
        h = self.norm(x)
        return self.head(h.flatten(2).mean(dim=2)).squeeze(-1).pow(2)


@pytest.mark.parametrize("norm", [nn.BatchNorm1d, nn.BatchNorm2d, nn.InstanceNorm2d])
def test_running_statistics_refused_in_train_mode_trainable_or_frozen(norm):
    x = torch.randn(5, 3, 4) if norm is nn.BatchNorm1d else torch.randn(5, 3, 2, 2)
    net = _NormNet(norm(3, track_running_stats=True, affine=True))
    net.norm.requires_grad_(False)  # frozen: it still updates its buffers from the batch
    with pytest.raises(UnsupportedLayerError, match=r"module 'norm' \(" + norm.__name__ + r"\).*running statistics"):
        BookKeepingEngine(net, 1.0)
    before = net.norm.running_mean.clone()
    net(x)  # the leak the refusal prevents: a train-mode forward moves the buffers with the data
    assert not torch.equal(net.norm.running_mean, before)
    net.eval()  # stored statistics: nothing is updated, accepted
    eng = BookKeepingEngine(net, 1.0)
    frozen = net.norm.running_mean.clone()
    assert eng.clipped_sums(lambda m, b: m(b), x).num_examples == 5
    assert torch.equal(net.norm.running_mean, frozen)
    net.train()  # back in train mode after set-up: refused at the next chunk, before any forward
    with pytest.raises(UnsupportedLayerError, match="running statistics.*when computing clipped sums"):
        eng.clipped_sums(lambda m, b: m(b), x)
    assert torch.equal(net.norm.running_mean, frozen)
    net.norm.requires_grad_(True)  # trainable affine parameters of a BatchNorm: no rule either way
    net.eval()
    with pytest.raises(UnsupportedLayerError, match="no per-example clipping rule"):
        BookKeepingEngine(net, 1.0)


def test_batchnorm_with_batch_statistics_refused():
    """Without running stats a BatchNorm normalises with the batch's statistics in any mode: each
    example's gradient depends on the others."""
    bn = nn.BatchNorm1d(3, track_running_stats=False, affine=False)
    model = nn.Sequential(bn, nn.Linear(3, 1))
    model.eval()
    with pytest.raises(UnsupportedLayerError, match="batch statistics"):
        BookKeepingEngine(model, 1.0)
    inst = nn.Sequential(nn.InstanceNorm1d(3), nn.Flatten(), nn.Linear(6, 1))  # per example: fine
    BookKeepingEngine(inst, 1.0)


def test_shared_parameter_and_functional_use_refused():
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight = a.weight
    with pytest.raises(UnsupportedLayerError, match="shared"):
        BookKeepingEngine(nn.Sequential(a, b), 1.0)

    class Tied(nn.Module):  # the weight also used functionally: its gradient would escape clipping
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(4, 3)

        def forward(self, idx):
            return F.linear(self.emb(idx), self.emb.weight).sum(dim=1)

    with pytest.raises(UnsupportedLayerError, match="outside the engine"):
        clipped_gradient_sum(Tied(), lambda m, b: m(b), torch.tensor([0, 1]), 1.0)


def test_rows_not_multiple_of_batch_refused():
    model = nn.Sequential(nn.Linear(3, 2))

    def bad_loss(m, x):  # 3 examples but the layer sees 4 rows
        out = m(torch.cat([x, x[:1]]))
        return out.sum(dim=1)[:3]

    with pytest.raises(RowMismatchError, match="4 rows for a batch of 3"):
        clipped_gradient_sum(model, bad_loss, torch.randn(3, 3), 1.0)


def test_bad_arguments():
    model = nn.Sequential(nn.Linear(3, 2))
    for C in (0.0, -1.0):
        with pytest.raises(ValueError, match="max_grad_norm"):
            BookKeepingEngine(model, C)
    with pytest.raises(ValueError, match="norm_method"):
        BookKeepingEngine(model, 1.0, norm_method="fast")
    with pytest.raises(ValueError, match="backend"):
        BookKeepingEngine(model, 1.0, backend="tpu")
    with pytest.raises(ValueError, match="shape \\(B,\\)"):
        clipped_gradient_sum(model, lambda m, x: m(x), torch.randn(3, 3), 1.0)
    with pytest.raises(ValueError, match="no trainable"):
        BookKeepingEngine(model.requires_grad_(False), 1.0)


def _nan_case(where):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    x = torch.randn(5, 3, dtype=DT)

    def loss_fn(m, b):
        xb = b[0]
        out = m(xb).squeeze(-1)  # (B,)
        if where == "loss":
            return out.pow(2) + torch.where(xb[:, 0] > 100, torch.tensor(float("nan"), dtype=DT), 0.0)
        # finite loss, NaN gradient for the bad example only: d sqrt(s)/ds at s = 0 times 0
        h = m[0](xb)  # (B, 4), a second call of layer 0
        bad = xb[:, 0] == 100
        extra = torch.zeros(xb.shape[0], dtype=DT)
        extra[bad] = ((h[bad] - h[bad].detach()) ** 2).sum(dim=1).sqrt()
        return out.pow(2) + extra
    return model, x, loss_fn


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_nonfinite_raise_by_default_and_drop_option(where):
    model, x, loss_fn = _nan_case(where)
    x[2, 0] = 200.0 if where == "loss" else 100.0  # example 2 is bad
    C = 0.5
    with pytest.raises(NonFiniteGradientError, match="per-example (losses|gradients) are NaN/inf"):
        clipped_gradient_sum(model, loss_fn, (x,), C)
    for p in model.parameters():
        assert p.grad is None
    got = clipped_gradient_sum(model, loss_fn, (x,), C, nonfinite="drop")
    good = torch.tensor([0, 1, 3, 4])
    want = reference_clipped_sum(model, per_example_grads(model, loss_fn, (x[good],), 4), C)
    assert all(torch.isfinite(t).all() for t in got.values())
    assert_close(got, want)  # exactly the other examples' clipped sum: the bad one adds 0


def test_engine_leaves_existing_grads_and_model_untouched():
    model = nn.Sequential(nn.Linear(3, 2))
    model[0].weight.grad = torch.ones(2, 3)
    clipped_gradient_sum(model, lambda m, x: m(x).sum(dim=1), torch.randn(4, 3), 1.0)
    assert torch.equal(model[0].weight.grad, torch.ones(2, 3))
    assert "forward" not in model[0].__dict__  # forwards restored
    out = model(torch.randn(2, 3)).sum()
    out.backward()
    assert model[0].bias.grad is not None  # plain training still works afterwards


def test_unet_attention_selection():
    """A tiny real UNet with every attention module + class embedder trainable."""
    from dpldm.config import UNetConfig
    from dpldm.models.selection import apply_finetune
    from dpldm.models.unet import UNet

    torch.manual_seed(0)
    cfg = UNetConfig(in_channels=2, model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                     num_heads=2, context_dim=8, num_classes=3)
    unet = UNet(cfg).to(DT)
    names = apply_finetune(unet, "attention:all")
    # the sinusoidal timestep embedding is built in fp32; feed the (frozen) MLP in fp64
    unet.time_embed.register_forward_pre_hook(lambda m, args: (args[0].to(DT),))
    # zero-initialised proj_out / output conv would make every gradient vanish: randomise all
    loss_fn, (z, y, t), B = unet_k_case(unet, DT)
    grads = per_example_grads(unet, loss_fn, (z, y, t), B)
    C = sorted(norms_of(grads))[1]
    got = clipped_gradient_sum(unet, loss_fn, (z, y, t), C)
    assert set(got) == set(names)
    assert_close(got, reference_clipped_sum(unet, grads, C))


def test_layers_called_with_keyword_input():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)).to(DT)
    x = torch.randn(5, 3, dtype=DT)
    loss_fn = lambda m, b: m[1](input=m[0](input=b[0])).pow(3).sum(dim=1)  # noqa: E731
    grads = per_example_grads(model, loss_fn, (x,), 5)
    C = sorted(norms_of(grads))[2]
    assert_close(clipped_gradient_sum(model, loss_fn, (x,), C), reference_clipped_sum(model, grads, C))
