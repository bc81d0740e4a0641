"""The one-run audit (Steinke, Nasr, Jagielski 2023): the statistics against closed forms and a
direct loop, its validity on randomised response (a mechanism that is exactly epsilon-DP), the
white-box scores against the exact sampling/clipping/scaling arithmetic, and the acceptance test:
the real DP configuration is not flagged, the no-noise and no-clip negative controls are."""
import json
import math

import numpy as np
import pytest
from scipy import stats

from dpldm.cli import main
from dpldm.privacy.accountant import compute_epsilon
from dpldm.privacy.engine import CLIP_EPS
from dpldm.privacy.audit import (AuditConfig, audit_from_scores, count_correct, epsilon_lower_bound, guess_grid,
                                 run_audit, tail_bound, train_with_canaries)

SIGMA, Q, STEPS, DELTA = 5.0, 0.5, 10, 1e-5  # claimed epsilon ~ 1.3 (PRV)


# -- statistics -------------------------------------------------------------------------------------

def _tail_reference(m, r, v, eps, delta):
    """The theorem's bound written out term by term (cdf differences, explicit loop over i)."""
    p = math.exp(eps) / (1 + math.exp(eps))
    head = 1.0 - stats.binom.cdf(v - 1, r, p)
    worst = 0.0
    for i in range(1, m + 1):  # the theorem's max runs over i = 1..m
        window = stats.binom.cdf(v - 1, r, p) - (stats.binom.cdf(v - i - 1, r, p) if v - i - 1 >= 0 else 0.0)
        worst = max(worst, window / i)
    return min(1.0, head + 2 * m * delta * worst)


@pytest.mark.parametrize("m,r,v,eps,delta", [(100, 40, 30, 0.7, 1e-3), (200, 200, 150, 1.5, 1e-5),
                                             (50, 10, 10, 3.0, 1e-2), (300, 120, 61, 0.0, 1e-4),
                                             (100, 60, 45, 2.0, 0.0)])
def test_tail_bound_matches_direct_formula(m, r, v, eps, delta):
    assert tail_bound(m, r, v, eps, delta) == pytest.approx(_tail_reference(m, r, v, eps, delta), rel=1e-9, abs=1e-15)


def test_pure_dp_tail_is_binomial_tail_and_delta_only_adds():
    for v in (30, 34, 38):
        p = 1 / (1 + math.exp(-1.2))
        assert tail_bound(80, 40, v, 1.2, 0.0) == pytest.approx(stats.binom.sf(v - 1, 40, p), rel=1e-12)
        assert tail_bound(80, 40, v, 1.2, 1e-4) > tail_bound(80, 40, v, 1.2, 0.0)


@pytest.mark.parametrize("r", [10, 100, 1000])
def test_lower_bound_closed_form_when_every_guess_is_right(r):
    # delta = 0, v = r: P[Binom(r, p) >= r] = p^r < beta  <=>  p < beta^(1/r)  =>  eps = logit(beta^(1/r))
    p = 0.05 ** (1 / r)
    assert epsilon_lower_bound(r, r, r, 0.0, 0.05) == pytest.approx(math.log(p / (1 - p)), abs=1e-5)


def test_lower_bound_sits_where_the_tail_crosses_beta_and_falls_with_delta():
    m, r, v = 1000, 400, 330
    eps = epsilon_lower_bound(m, r, v, 1e-5, 0.05)
    assert 0 < eps < 10
    assert tail_bound(m, r, v, eps, 1e-5) < 0.05 <= tail_bound(m, r, v, eps + 1e-4, 1e-5)
    assert epsilon_lower_bound(m, r, v, 1e-3, 0.05) < eps < epsilon_lower_bound(m, r, v, 0.0, 0.05)
    assert epsilon_lower_bound(m, r, r // 2, 1e-5, 0.05) == 0.0  # coin-flip accuracy proves nothing


def test_count_correct_against_a_loop():
    rng = np.random.default_rng(3)
    included = rng.random(50) < 0.5
    order = rng.permutation(50)
    for k_pos, k_neg in guess_grid(50):
        guess = np.zeros(50, dtype=int)
        guess[order[:k_pos]] = 1
        if k_neg:
            guess[order[-k_neg:]] = -1
        right = sum((g == 1 and s) or (g == -1 and not s) for g, s in zip(guess, included))
        assert count_correct(order, included, k_pos, k_neg) == (k_pos + k_neg, right)


def test_randomised_response_validity_and_power():
    """eps0-randomised response is exactly eps0-DP per canary: the bound must exceed eps0 in at
    most ~5% of runs (valid) and should come close to it (the audit is tight for RR)."""
    rng = np.random.default_rng(0)
    eps0, m, trials = 1.0, 400, 60
    p_right = math.exp(eps0) / (1 + math.exp(eps0))
    bounds = []
    for t in range(trials):
        s = rng.random(m) < 0.5
        out = np.where(rng.random(m) < p_right, s, ~s)  # the mechanism's output per canary
        res = audit_from_scores(out.astype(float), s, 0.0, grid=[(m // 2, m - m // 2)], seed=t)
        bounds.append(res.epsilon_lower_bound)
    bounds = np.array(bounds)
    assert (bounds > eps0).sum() <= 8  # P[Binom(60, 0.05) > 8] < 1%
    assert bounds.mean() > 0.4 * eps0


# -- the training run -------------------------------------------------------------------------------

def _cfg(**kw):
    base = dict(canaries=1000, noise_multiplier=SIGMA, delta=DELTA, steps=STEPS, sample_rate=Q, seed=0)
    base.update(kw)
    return AuditConfig(**base)


def _times_sampled(run, steps):
    rows = np.arange(run.included.shape[0]) + run.first_canary_row
    counts = np.zeros(rows.shape[0])
    for t in range(steps):
        counts += np.isin(rows, run.ledger.plan.indices(t).numpy())
    return counts


@pytest.mark.parametrize("control", ["no-noise", "no-clip"])
def test_whitebox_scores_are_the_exact_clipped_scaled_sum(control):
    """Without noise (or without clipping, with noise removed by a second noise-free run) the
    score of canary j is lr * (norm after clipping) / (q*N) * (times j was Poisson-sampled)."""
    cfg = _cfg(canaries=200, real_examples=20, control=control, noise_multiplier=SIGMA)
    run = train_with_canaries(cfg)
    n = _times_sampled(run, STEPS)
    raw = cfg.canary_norm * cfg.max_grad_norm  # the canary's gradient norm before clipping
    after = raw if control == "no-clip" else raw * min(1.0, cfg.max_grad_norm / (raw + CLIP_EPS))  # Opacus' rule
    assert after == pytest.approx(cfg.max_grad_norm if control == "no-noise" else raw, rel=1e-6)
    expect = np.where(run.included, cfg.lr * after / (Q * cfg.num_examples) * n, 0.0)
    if control == "no-noise":
        np.testing.assert_allclose(run.scores, expect, rtol=1e-9, atol=1e-12)
    else:  # noise is still there: its std per coordinate is lr * sigma * C * sqrt(T) / (q*N)
        resid = run.scores - expect
        sd = cfg.lr * SIGMA * cfg.max_grad_norm * math.sqrt(STEPS) / (Q * cfg.num_examples)
        assert abs(resid.mean()) < 4 * sd / math.sqrt(len(resid))
        assert resid.std() == pytest.approx(sd, rel=0.15)


def test_whitebox_noise_std_matches_sigma_c_over_expected_batch():
    cfg = _cfg(canaries=600, real_examples=20)
    run = train_with_canaries(cfg)
    out = run.scores[~run.included]  # excluded canaries: pure noise
    sd = cfg.lr * SIGMA * cfg.max_grad_norm * math.sqrt(STEPS) / (Q * cfg.num_examples)
    assert out.std() == pytest.approx(sd, rel=0.12)
    assert run.noise_draws == STEPS


@pytest.fixture(scope="module")
def claimed():
    return compute_epsilon(SIGMA, Q, STEPS, DELTA, "prv")


def test_real_configuration_is_not_flagged(claimed):
    rep = run_audit(_cfg())
    assert rep["epsilon_claimed"] == pytest.approx(claimed, rel=1e-9)
    assert rep["epsilon_lower_bound"] <= rep["epsilon_lower_bound_uncorrected"] <= claimed
    assert rep["as_expected"] and rep["control"] == "none"
    assert 400 < rep["canaries_included"] < 600


@pytest.mark.parametrize("control", ["no-noise", "no-clip"])
def test_negative_controls_are_flagged(control, claimed):
    rep = run_audit(_cfg(control=control))
    assert rep["epsilon_claimed"] == pytest.approx(claimed, rel=1e-9)  # the broken run still claims it
    assert rep["epsilon_lower_bound"] > 2 * claimed
    assert rep["as_expected"]


def test_blackbox_real_not_flagged_and_no_clip_flagged(claimed):
    real = run_audit(_cfg(mode="blackbox"))
    assert real["epsilon_lower_bound"] <= claimed
    leak = run_audit(_cfg(mode="blackbox", control="no-clip"))
    assert leak["epsilon_lower_bound"] > 2 * claimed


# -- CLI ------------------------------------------------------------------------------------------------

def test_cli_json(capsys):
    code = main(["audit", "--canaries", "200", "--real-examples", "10", "--noise-multiplier", "5.0", "--steps", "3",
                 "--control", "no-noise", "--seed", "1", "--json"])
    rep = json.loads(capsys.readouterr().out)
    assert code == 0 and rep["as_expected"]
    assert rep["epsilon_lower_bound"] > 0 and rep["canaries"] == 200 and rep["steps"] == 3


def test_cli_text_prints_claimed_and_empirical(capsys):
    code = main(["audit", "--canaries", "100", "--real-examples", "10", "--noise-multiplier", "2.0", "--steps", "2",
                 "--seed", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "claimed epsilon" in out and "empirical epsilon >=" in out and "result: consistent" in out


def test_cli_flags_an_undetected_leak_with_exit_1(capsys):
    # two canaries cannot show anything: the control is "not detected" -> exit 1, said clearly
    code = main(["audit", "--canaries", "2", "--real-examples", "0", "--noise-multiplier", "1.0", "--steps", "1",
                 "--control", "no-noise", "--seed", "0", "--delta", "1e-3"])
    assert code == 1
    assert "AUDIT TOO WEAK" in capsys.readouterr().out


@pytest.mark.parametrize("argv,needle", [
    (["--epsilon", "0"], "epsilon must be a finite number > 0"),
    (["--epsilon", "-1"], "epsilon must be a finite number > 0"),
    (["--noise-multiplier", "1", "--delta", "0.01"], "must be < 1/N"),
    (["--noise-multiplier", "1", "--canaries", "1"], "--canaries must be an integer >= 2"),
    (["--noise-multiplier", "1", "--sample-rate", "1.5"], "sample rate q must lie in (0, 1]"),
    (["--noise-multiplier", "1", "--steps", "0"], "steps must be an integer >= 1"),
])
def test_cli_bad_arguments(argv, needle, capsys):
    assert main(["audit", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.startswith("dpldm audit: error:") and err.count("\n") == 1
