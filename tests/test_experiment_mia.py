"""`dpldm experiment mia` (dpldm/experiments/mia.py) and its attacks and metrics
(dpldm/experiments/mia_attacks.py), against independent references: sklearn's roc_auc_score and
roc_curve, a brute-force loop over thresholds for TPR at a fixed FPR, the (epsilon, delta)-DP
trade-off bound at hand-computed points and at randomized response (whose exact trade-off curve
IS the bound at delta = 0), Phi(d / sqrt 2) for two unit Gaussians d apart, the loss score against
a per-example loop calling the UNet directly and against dpldm.diffusion.loss.per_example_loss,
PIA against its formula written out per example; then the --quick experiment end to end (files,
a second invocation computes nothing, other settings and bad flags are refused in one line).
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dpldm.experiments import mia_attacks as A

# -- metrics ----------------------------------------------------------------------------------------------


def _scores_with_ties(seed: int, n1: int = 300, n0: int = 400):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 12, n1) + 1.0, rng.integers(0, 10, n0).astype(float)  # heavy ties, shifted


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_sklearn_with_ties(seed):
    from sklearn.metrics import roc_auc_score

    m, n = _scores_with_ties(seed)
    want = roc_auc_score(np.r_[np.ones(m.size), np.zeros(n.size)], np.r_[m, n])
    assert A.auc(m, n) == pytest.approx(want, abs=1e-12)
    assert A.auc(np.ones(5), np.ones(7)) == 0.5  # all tied: one half


def test_roc_curve_matches_sklearn():
    from sklearn.metrics import roc_curve

    m, n = _scores_with_ties(3)
    fpr, tpr, _ = roc_curve(np.r_[np.ones(m.size), np.zeros(n.size)], np.r_[m, n], drop_intermediate=False)
    got_f, got_t = A.roc_curve(m, n)
    np.testing.assert_allclose(got_f, fpr)
    np.testing.assert_allclose(got_t, tpr)


def _tpr_brute_force(m, n, target):
    """Every threshold (each distinct score and +inf), rule member iff score >= thr."""
    best = 0.0
    for thr in [math.inf, *np.unique(np.r_[m, n])]:
        if np.mean(n >= thr) <= target + 1e-12:
            best = max(best, float(np.mean(m >= thr)))
    return best


@pytest.mark.parametrize("seed", [0, 4])
@pytest.mark.parametrize("target", [0.0, 0.001, 0.01, 0.0625, 0.1, 0.5, 0.99, 1.0])
def test_tpr_at_fpr_matches_a_loop_over_thresholds(seed, target):
    m, n = _scores_with_ties(seed, 64, 80)
    assert A.tpr_at_fpr(m, n, target) == pytest.approx(_tpr_brute_force(m, n, target))
    rng = np.random.default_rng(seed)
    m, n = rng.normal(1, 1, 50), rng.normal(0, 1, 1000)  # continuous scores: 1000 non-members
    assert A.tpr_at_fpr(m, n, target) == pytest.approx(_tpr_brute_force(m, n, target))


@pytest.mark.parametrize("d", [0.5, 1.0, 2.0])
def test_two_gaussians_give_phi_of_d_over_sqrt2(d):
    from scipy.stats import norm

    rng = np.random.default_rng(7)
    m, n = rng.normal(d, 1, 40_000), rng.normal(0, 1, 40_000)
    assert A.auc(m, n) == pytest.approx(norm.cdf(d / math.sqrt(2)), abs=0.006)
    # and TPR at FPR f: 1 - Phi(Phi^-1(1 - f) - d)
    assert A.tpr_at_fpr(m, n, 0.01) == pytest.approx(1 - norm.cdf(norm.ppf(0.99) - d), abs=0.02)


def test_bootstrap_interval_contains_the_estimate_and_is_seeded():
    rng = np.random.default_rng(0)
    m, n = rng.normal(0.3, 1, 200), rng.normal(0, 1, 200)
    lo, hi = A.bootstrap_ci(m, n, A.auc, 300, seed=5)
    assert lo < A.auc(m, n) < hi and hi - lo < 0.2
    assert A.bootstrap_ci(m, n, A.auc, 300, seed=5) == (lo, hi)
    assert A.bootstrap_ci(m, n, A.auc, 300, seed=6) != (lo, hi)


def test_dp_bound_closed_form():
    e = math.e
    assert A.dp_tpr_bound(0.01, 1.0, 0.0) == pytest.approx(e * 0.01)
    assert A.dp_tpr_bound(0.01, 1.0, 1e-5) == pytest.approx(e * 0.01 + 1e-5)
    assert A.dp_tpr_bound(0.5, 1.0, 0.0) == pytest.approx(1 - 0.5 / e)  # the upper branch
    assert A.dp_tpr_bound(0.0, 2.0, 1e-3) == pytest.approx(1e-3)  # delta: what a test may get for free
    assert A.dp_tpr_bound(0.001, 10.0, 1e-5) == pytest.approx(1 - math.exp(-10) * (1 - 1e-5 - 0.001))
    assert A.dp_tpr_bound(0.01, 10.0, 1e-5) == pytest.approx(1 - math.exp(-10) * (1 - 1e-5 - 0.01))
    assert A.dp_tpr_bound(0.3, math.inf, 0.0) == 1.0 and A.dp_tpr_bound(0.999, 1.0, 0.01) == 1.0
    assert A.dp_tpr_bound(0.2, 0.0, 0.0) == pytest.approx(0.2)  # 0-DP: no test beats chance
    np.testing.assert_allclose(A.dp_tpr_bound(np.array([0.01, 0.5]), 1.0, 0.0), [e * 0.01, 1 - 0.5 / e])


@pytest.mark.parametrize("eps", [0.5, 1.0, 3.0])
def test_randomized_response_is_tight_on_the_bound(eps):
    """Randomized response (report the bit truthfully with p = e^eps / (1 + e^eps)) is eps-DP; the
    test "member iff the output is 1" has FPR 1 - p and TPR p: exactly on the bound, and its AUC
    (p) equals the area under the bound."""
    p = math.exp(eps) / (1 + math.exp(eps))
    assert A.dp_tpr_bound(1 - p, eps, 0.0) == pytest.approx(p)
    rng = np.random.default_rng(1)
    m, n = (rng.random(200_000) < p).astype(float), (rng.random(200_000) < 1 - p).astype(float)
    fpr, tpr = A.roc_curve(m, n)
    assert np.all(tpr <= A.dp_tpr_bound(fpr, eps, 0.0) + 0.005)  # a valid bound (up to sampling)
    assert A.dp_auc_bound(eps, 0.0) == pytest.approx(p)
    assert A.auc(m, n) == pytest.approx(p, abs=0.005)


def test_dp_auc_bound_is_the_area_under_the_bound():
    xs = np.linspace(0, 1, 2_000_001)
    for eps, delta in ((1.0, 1e-5), (0.3, 0.01), (5.0, 1e-3)):
        ys = A.dp_tpr_bound(xs, eps, delta)
        assert A.dp_auc_bound(eps, delta) == pytest.approx(float(np.sum((ys[1:] + ys[:-1]) / 2) / (xs.size - 1)),
                                                           abs=1e-9)
    assert A.dp_auc_bound(0.0, 0.0) == pytest.approx(0.5) and A.dp_auc_bound(math.inf, 0.0) == 1.0


def test_evaluate_verdicts():
    rng = np.random.default_rng(0)
    m, n = rng.normal(3, 1, 500), rng.normal(0, 1, 500)  # a strong attack
    row = A.evaluate(m, n, 1.0, 1e-5, (0.01, 0.001), n_boot=100)
    assert row["under_bound"] == "NO" and row["auc"] > row["auc_bound"] > 0.5
    assert row["bound"]["0.01"] == pytest.approx(math.e * 0.01 + 1e-5)
    assert A.evaluate(m, n, math.inf, 0.0, (0.01,), n_boot=20)["under_bound"] == "yes"
    assert A.verdict(0.03, 0.01, 0.027) == "yes (within CI)" and A.verdict(0.02, 0.0, 0.027) == "yes"
    assert A.verdict(0.05, 0.03, 0.027) == "NO"


# -- scores ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    from tiny_ldm import make_ldm

    ldm = make_ldm()
    g = torch.Generator().manual_seed(3)
    z0 = torch.randn(5, *ldm.latent_shape, generator=g)  # (5, 2, 8, 8)
    y = torch.tensor([0, 1, 2, 1, 0])
    return ldm, z0, y


def test_fixed_draws_share_the_noise_across_timesteps_and_are_seeded():
    d = A.fixed_draws([3, 7], 4, (2, 8, 8), seed=11)
    assert d.t.tolist() == [3] * 4 + [7] * 4 and d.noise.shape == (8, 2, 8, 8)
    torch.testing.assert_close(d.at(3).noise, d.at(7).noise)
    torch.testing.assert_close(A.fixed_draws([7], 4, (2, 8, 8), seed=11).noise, d.at(7).noise)
    assert not torch.equal(A.fixed_draws([7], 4, (2, 8, 8), seed=12).noise, d.at(7).noise)


def test_loss_scores_match_a_per_example_loop(tiny):
    from dpldm.diffusion.loss import per_example_loss

    ldm, z0, y = tiny
    unet, sch = ldm.sampling_unet(), ldm.schedule
    draws = A.fixed_draws([0, 5, 19], 2, ldm.latent_shape, seed=0)  # M = 6
    got = A.loss_scores(unet, sch, z0, y, draws, batch=4)  # (5,): rows and draws split over calls
    ab = sch.alphas_cumprod
    with torch.no_grad():
        for i in range(z0.shape[0]):
            losses = []
            for t, eps in zip(draws.t.tolist(), draws.noise):
                x_t = math.sqrt(ab[t]) * z0[i] + math.sqrt(1 - ab[t]) * eps  # (Z, h, w)
                pred = unet(x_t[None], torch.tensor([t]), y[i:i + 1])[0]
                losses.append(float(((pred - eps) ** 2).mean()))
            assert float(got[i]) == pytest.approx(np.mean(losses), rel=1e-5)
            ref = per_example_loss(unet, z0[i:i + 1], y[i:i + 1], sch, K=len(draws), t=draws.t, noise=draws.noise)
            assert float(got[i]) == pytest.approx(float(ref[0]), rel=1e-5)
    torch.testing.assert_close(A.loss_scores(unet, sch, z0, y, draws, batch=512), got)
    mat = A.loss_matrix(unet, sch, z0, y, draws, batch=1)  # one UNet row per call
    torch.testing.assert_close(mat[:, 2:4].mean(1), A.loss_scores(unet, sch, z0, y, draws.at(5)), rtol=1e-5, atol=1e-7)


def test_pia_matches_its_formula(tiny):
    ldm, z0, y = tiny
    unet, ab = ldm.sampling_unet(), ldm.schedule.alphas_cumprod
    got = A.pia_matrix(unet, ldm.schedule, z0, y, [4, 12], p=4.0, batch=2)  # (5, 2)
    with torch.no_grad():
        for i in range(z0.shape[0]):
            eps0 = unet(z0[i:i + 1], torch.tensor([0]), y[i:i + 1])
            for k, t in enumerate([4, 12]):
                x_t = math.sqrt(ab[t]) * z0[i:i + 1] + math.sqrt(1 - ab[t]) * eps0
                want = float((unet(x_t, torch.tensor([t]), y[i:i + 1]) - eps0).abs().pow(4).mean())
                assert float(got[i, k]) == pytest.approx(want, rel=2e-4)  # float32; |.|^4 amplifies rounding


def test_encode_examples_is_the_trainers_preprocessing(tiny):
    ldm = tiny[0]
    imgs = np.random.default_rng(0).integers(0, 256, (3, 16, 16)).astype(np.uint8)
    x = torch.from_numpy(imgs).float().div(127.5).sub(1.0)[:, None]  # (3, 1, 16, 16) in [-1, 1]
    torch.testing.assert_close(A.encode_examples(ldm, imgs), ldm.encode(x))


# -- the experiment ------------------------------------------------------------------------------------

def test_registered():
    from dpldm.experiments import EXPERIMENTS

    assert EXPERIMENTS.get("mia", ("",))[0] == "dpldm.experiments.mia"


def _main(argv):
    from dpldm.cli import main

    return main(["experiment", "mia", *argv])


def test_bad_flags_refused_in_one_line_before_anything_is_written(tmp_path, capsys):
    for argv, text in ((["--members", "0"], "--members must be >= 1"),
                       (["--members", "5000"], "--members 5000: the private source"),
                       (["--epsilons", "0"], "--epsilons: every value must be"),
                       (["--epsilons", "1", "1"], "--epsilons: 1 given twice"),
                       (["--model", "3"], "expected EPS=FOLDER"),
                       (["--model", f"5={tmp_path}"], "epsilon 5 is not among --epsilons"),
                       (["--model", f"1={tmp_path / 'nope'}"], "is not a folder")):
        assert _main(["--quick", "--out", str(tmp_path / "out"), *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert text in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_quick_end_to_end(tmp_path, capsys, monkeypatch):
    from dpldm.experiments import mia

    out = tmp_path / "mia"
    assert _main(["--quick", "--out", str(out), "--threads", "1"]) == 0
    for name in ("results.json", "results.md", "mia_roc.png"):
        assert (out / name).is_file(), name
    assert (out / "mia_roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "results.json").read_text())
    runs = data["runs"]
    models = ["public", "eps=1", "eps=10", "eps=inf", "control"]
    want = {"calibration", *(f"scores:{m}" for m in models),
            *(f"metrics:{a}:{m}" for a in ("loss", "calibrated", "pia") for m in models
              if (a, m) != ("calibrated", "public"))}
    assert set(runs) == want and data["experiment"] == "mia"
    q = mia.QUICK
    assert set(runs["calibration"]["chosen"].values()) <= set(q.grid)
    for m in models:
        s = runs[f"scores:{m}"]["scores"]
        mem = "control_members" if m == "control" else "members"
        assert len(s[mem]["loss"]) == (10 * q.control_per_class if m == "control" else q.members)
        assert len(s["nonmembers"]["pia"]) == q.members
    assert runs["scores:eps=1"]["epsilon"] <= 1.0 + 1e-9 and runs["scores:eps=inf"]["epsilon"] == math.inf
    row = runs["metrics:loss:eps=1"]
    assert row["bound"]["0.01"] == pytest.approx(A.dp_tpr_bound(0.01, row["epsilon"], row["delta"]))
    mem, non = mia.attack_scores(runs["scores:eps=10"]["scores"], runs["scores:public"]["scores"], "calibrated",
                                 "members")
    assert runs["metrics:calibrated:eps=10"]["auc"] == pytest.approx(A.auc(mem, non))
    report = (out / "results.md").read_text()
    assert "Timestep choice on public data" in report and "Positive control" in report and "PIA" in report
    printed = capsys.readouterr().out
    assert all(f"[mia] {m} (" in printed for m in models)

    def no_compute(*a, **k):
        raise AssertionError("a finished cell was computed again")
    for mod, fn in ((mia.utility, "run_dp_finetune"), (mia.utility, "run_nonprivate_finetune"), (A, "loss_matrix"),
                    (A, "pia_matrix"), (A, "evaluate"), (mia, "calibrate")):
        monkeypatch.setattr(mod, fn, no_compute)
    assert _main(["--quick", "--out", str(out), "--threads", "1"]) == 0
    assert json.loads((out / "results.json").read_text())["runs"] == runs
    capsys.readouterr()
    before = (out / "results.json").read_bytes()
    assert _main(["--quick", "--out", str(out), "--members", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "other settings" in err and "protocol.members: 12 -> 5" in err and "\n" not in err
    assert (out / "results.json").read_bytes() == before


def test_reused_model_must_match_the_cell_and_the_private_data(tmp_path):
    from tiny_ldm import TINY, save_tiny

    from dpldm.config import load_config
    from dpldm.errors import UserError
    from dpldm.experiments import mia

    rep = {"epsilon": 0.93, "epsilon_target": 1.0, "delta": 1e-5, "delta_total": 2e-5, "private": True}
    save_tiny(tmp_path / "m", extra={"privacy": rep})
    cfg = load_config(None, TINY)
    ldm, got = mia.reused_model(str(tmp_path / "m"), 1.0, cfg)
    assert got == rep and mia.privacy_of(got, cfg) == (0.93, 2e-5)
    with pytest.raises(UserError, match="trained at epsilon 1, passed as 10"):
        mia.reused_model(str(tmp_path / "m"), 10.0, cfg)
    with pytest.raises(UserError, match="its members are not this experiment's members"):
        mia.reused_model(str(tmp_path / "m"), 1.0, load_config(None, [*TINY, 'data.private="digits"']))
