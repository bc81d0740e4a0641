"""Accounting through Opacus' accountants; calibration; the ledger's JSON state and resume."""
from __future__ import annotations

import json
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from dpldm.config import PrivacyConfig
from dpldm.privacy import PoissonPlan, PrivacyLedger, PrivacyParameterError, calibrate_noise, compute_epsilon
from dpldm.privacy.accountant import check_delta

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order")


@pytest.mark.parametrize("name,cls", [("prv", PRVAccountant), ("rdp", RDPAccountant)])
def test_epsilon_equals_opacus_own(name, cls):
    sigma, q, steps, delta = 1.1, 0.04, 120, 1e-5
    theirs = cls()
    for _ in range(steps):
        theirs.step(noise_multiplier=sigma, sample_rate=q)
    want = theirs.get_epsilon(delta=delta)
    assert compute_epsilon(sigma, q, steps, delta, name) == pytest.approx(want, rel=1e-9)
    ledger = PrivacyLedger(noise_multiplier=sigma, max_grad_norm=1.0, plan=PoissonPlan(1000, q, 0), delta=delta,
                           accountant=name)
    assert ledger.epsilon_spent() == 0.0
    for _ in range(steps):
        ledger.step()
    assert ledger.epsilon_spent() == pytest.approx(want, rel=1e-9)
    assert 0.5 < want < 5


def test_prv_is_tighter_than_rdp():
    args = (1.0, 0.02, 500, 1e-5)
    assert compute_epsilon(*args, "prv") < compute_epsilon(*args, "rdp")


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_calibration_round_trips(accountant):
    eps, delta, q, steps = 4.0, 1e-5, 0.05, 60
    sigma = calibrate_noise(eps, delta, q, steps, accountant)
    got = compute_epsilon(sigma, q, steps, delta, accountant)
    assert eps - 0.02 <= got <= eps  # opacus' binary search lands within 0.01 below the target
    assert compute_epsilon(sigma * 0.95, q, steps, delta, accountant) > eps  # and sigma is not loose


def test_ledger_state_round_trip_continues_identically():
    ledger = PrivacyLedger.create(num_examples=500, sample_rate=0.05, max_grad_norm=0.7, delta=1e-4,
                                  noise_multiplier=1.2, seed=77)
    for _ in range(4):
        ledger.step()
    state = json.loads(json.dumps(ledger.state_dict()))  # plain JSON
    resumed = PrivacyLedger.from_state_dict(state)
    assert resumed.steps_done == 4 and resumed.epsilon_spent() == ledger.epsilon_spent()
    for _ in range(3):
        assert (resumed.plan.indices(resumed.steps_done) == ledger.plan.indices(ledger.steps_done)).all()
        resumed.step()
        ledger.step()
    assert resumed.state_dict() == ledger.state_dict()
    assert resumed.epsilon_spent() == ledger.epsilon_spent()
    assert resumed.epsilon_spent() > PrivacyLedger.from_state_dict(state).epsilon_spent()  # nothing forgotten


def test_ledger_load_refuses_inconsistent_state():
    ledger = PrivacyLedger.create(num_examples=100, sample_rate=0.1, max_grad_norm=1.0, delta=1e-3,
                                  noise_multiplier=1.0, seed=1)
    ledger.step()
    bad = ledger.state_dict()
    bad["steps_done"] = 0  # would forget a spent step
    with pytest.raises(PrivacyParameterError, match="inconsistent"):
        PrivacyLedger.from_state_dict(bad)
    bad = ledger.state_dict()
    bad["sampling"] = "shuffle"
    with pytest.raises(PrivacyParameterError, match="poisson"):
        PrivacyLedger.from_state_dict(bad)
    bad = ledger.state_dict()
    bad["accountant"] = "gdp"
    with pytest.raises(PrivacyParameterError, match="accountant"):
        PrivacyLedger.from_state_dict(bad)


def test_ledger_from_config_calibrates_sigma():
    cfg = PrivacyConfig(epsilon=5.0, delta=1e-4, expected_batch_size=50, steps=40, accountant="rdp")
    ledger = PrivacyLedger.from_config(cfg, num_examples=1000, seed=3)
    assert ledger.sample_rate == 0.05 and ledger.expected_batch_size == pytest.approx(50)
    assert ledger.noise_multiplier == pytest.approx(calibrate_noise(5.0, 1e-4, 0.05, 40, "rdp"))
    assert ledger.epsilon_after(40) <= 5.0


def test_bad_inputs_give_clear_errors():
    plan = PoissonPlan(100, 0.1, 0)
    with pytest.raises(PrivacyParameterError, match="epsilon"):
        calibrate_noise(0.0, 1e-5, 0.1, 10)
    with pytest.raises(PrivacyParameterError, match="epsilon"):
        calibrate_noise(-1.0, 1e-5, 0.1, 10)
    with pytest.raises(PrivacyParameterError, match="1/N"):
        PrivacyLedger(noise_multiplier=1.0, max_grad_norm=1.0, plan=plan, delta=0.01)
    with pytest.raises(PrivacyParameterError, match="1/N"):
        check_delta(1e-3, 1000)
    with pytest.raises(PrivacyParameterError, match="delta"):
        compute_epsilon(1.0, 0.1, 10, 0.0)
    for C in (0.0, -1.0, float("inf")):
        with pytest.raises(PrivacyParameterError, match="max_grad_norm"):
            PrivacyLedger(noise_multiplier=1.0, max_grad_norm=C, plan=plan, delta=1e-3)
    for q in (0.0, 1.01, -0.5, float("nan")):
        with pytest.raises(PrivacyParameterError, match="sample rate"):
            compute_epsilon(1.0, q, 10, 1e-5)
    with pytest.raises(PrivacyParameterError, match="noise multiplier"):
        PrivacyLedger(noise_multiplier=0.0, max_grad_norm=1.0, plan=plan, delta=1e-3)
    with pytest.raises(PrivacyParameterError, match="steps"):
        compute_epsilon(1.0, 0.1, 0, 1e-5)
    with pytest.raises(PrivacyParameterError, match="accountant"):
        compute_epsilon(1.0, 0.1, 10, 1e-5, "gdp")
    with pytest.raises(PrivacyParameterError, match="PoissonPlan"):  # shuffled batches are not Poisson
        PrivacyLedger(noise_multiplier=1.0, max_grad_norm=1.0, plan=object(), delta=1e-3)
    with pytest.raises(PrivacyParameterError, match="too low|cannot reach"):
        calibrate_noise(1e-6, 1e-10, 1.0, 10_000, "rdp")


class _Run:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def _cli(capsys):
    """`dpldm privacy ...` through the real entry point, in process."""
    from dpldm.cli import main

    def run(*args):
        rc = main(["privacy", *args])
        out = capsys.readouterr()
        return _Run(rc, out.out, out.err)
    return run


def test_cli_json_calibrate_and_report(_cli):
    r = _cli("--epsilon", "3", "--delta", "1e-5", "--sample-rate", "0.04", "--steps", "100", "--accountant", "rdp",
             "--json")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 1  # ONE JSON object
    out = json.loads(r.stdout)
    assert set(out) == {"noise_multiplier", "epsilon", "delta", "sample_rate", "steps", "accountant"}
    assert out["noise_multiplier"] == pytest.approx(calibrate_noise(3, 1e-5, 0.04, 100, "rdp"))
    assert out["epsilon"] <= 3 and out["accountant"] == "rdp" and out["steps"] == 100
    r = _cli("--noise-multiplier", "1.0", "--delta", "1e-5", "--sample-rate", "0.04", "--steps", "100", "--json")
    out = json.loads(r.stdout)
    assert out["epsilon"] == pytest.approx(compute_epsilon(1.0, 0.04, 100, 1e-5, "prv"))
    assert out["accountant"] == "prv"
    r = _cli("--noise-multiplier", "1.0", "--delta", "1e-5", "--sample-rate", "0.04", "--steps", "100")
    assert r.returncode == 0 and "epsilon spent" in r.stdout


def test_cli_bad_input_exit_2(_cli):
    r = _cli("--epsilon", "3", "--delta", "1e-3", "--sample-rate", "0.04", "--steps", "100", "--num-examples", "5000")
    assert r.returncode == 2 and "1/N" in r.stderr
    r = _cli("--epsilon", "3", "--delta", "1e-5", "--sample-rate", "1.5", "--steps", "100")
    assert r.returncode == 2 and "sample rate" in r.stderr


# -- bounds, progress and warnings (issue 13) -----------------------------------------------------

@pytest.mark.parametrize("accountant,eps,q,steps", [("prv", 4.0, 0.05, 60), ("rdp", 8.0, 0.02, 300)])
def test_calibration_is_opacus_search(accountant, eps, q, steps):
    """The bounded search evaluates the same sigmas as Opacus' get_noise_multiplier: same result."""
    from opacus.accountants.utils import get_noise_multiplier

    lines = []
    ours = calibrate_noise(eps, 1e-5, q, steps, accountant, progress=lines.append)
    theirs = get_noise_multiplier(target_epsilon=eps, target_delta=1e-5, sample_rate=q, steps=steps,
                                  accountant=accountant, epsilon_tolerance=0.01)
    assert ours == theirs
    assert len(lines) >= 3 and all("calibrating sigma" in ln for ln in lines)  # one line per evaluation
    assert f"sigma={ours:.6g}" in "".join(lines)


def test_prv_grid_points_predicts_opacus_domain():
    from opacus.accountants import PRVAccountant

    from dpldm.privacy.accountant import prv_grid_points

    for sigma, q, steps, delta in [(1.0, 0.01, 1000, 1e-5), (0.6, 0.04, 300, 1e-6), (2.0, 0.2, 50, 1e-3)]:
        acc = PRVAccountant()
        domain = acc._get_domain(prvs=[_prv(sigma, q)], num_self_compositions=[steps], eps_error=0.01,
                                 delta_error=delta / 1000)
        assert prv_grid_points([(sigma, q, steps)], delta) == pytest.approx(domain.size, abs=3)


def _prv(sigma, q):
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV

    return PoissonSubsampledGaussianPRV(q, sigma)


def test_prv_refuses_a_grid_past_the_limit_without_allocating():
    """sigma=0.01 (issue 13: a 26 GiB allocation) and 1e9 steps: a clear error within seconds."""
    import resource
    import time

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with pytest.raises(PrivacyParameterError, match=r"PRV accountant: sigma=0.01, q=0.01, 100 steps.*grid of 3.5\de\+09 points.*--accountant rdp"):
        compute_epsilon(0.01, 0.01, 100, 1e-5, "prv")
    with pytest.raises(PrivacyParameterError, match=r"1000000000 steps.*limit"):
        compute_epsilon(1.0, 0.01, 10**9, 1e-5, "prv")
    assert time.perf_counter() - t0 < 10
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 200_000  # KiB: nothing big allocated
    # the limit is a parameter: a normal case passes at the default and fails below its own size
    assert compute_epsilon(1.0, 0.04, 100, 1e-5, "prv") > 0
    with pytest.raises(PrivacyParameterError, match="limit 1000,"):
        compute_epsilon(1.0, 0.04, 100, 1e-5, "prv", max_points=1000)


def test_rdp_accounts_what_prv_refuses_and_equals_opacus():
    want = RDPAccountant()
    want.history = [(1.0, 0.01, 10**9)]
    assert compute_epsilon(1.0, 0.01, 10**9, 1e-5, "rdp") == pytest.approx(want.get_epsilon(delta=1e-5), rel=1e-12)


def test_calibration_runaway_is_bounded():
    """--epsilon 1000 (issue 13: hung): PRV stops at the grid limit; RDP calibrates, as Opacus."""
    import time

    from opacus.accountants.utils import get_noise_multiplier

    t0 = time.perf_counter()
    with pytest.raises(PrivacyParameterError, match=r"calibrating sigma for epsilon=1000 .* reached sigma=.*grid"):
        calibrate_noise(1000, 1e-5, 0.04, 750, "prv")
    assert time.perf_counter() - t0 < 60
    sigma = calibrate_noise(1000, 1e-5, 0.04, 750, "rdp")
    assert sigma == get_noise_multiplier(target_epsilon=1000, target_delta=1e-5, sample_rate=0.04, steps=750,
                                         accountant="rdp", epsilon_tolerance=0.01)
    with pytest.raises(PrivacyParameterError, match=r"gave up after .* \(time limit 1e-09 s\)"):
        calibrate_noise(3, 1e-5, 0.04, 100, "rdp", time_limit=1e-9)


def test_prv_numerical_failures_are_parameter_errors():
    with pytest.raises(PrivacyParameterError, match=r"PRV accountant cannot evaluate .*delta=1e-300 .*Opacus: "):
        compute_epsilon(0.5, 0.001, 1, 1e-300, "prv")
    with pytest.raises(PrivacyParameterError, match="PRV accountant cannot evaluate"):
        compute_epsilon(1000.0, 0.001, 1, 0.99, "prv")


def test_prv_runs_without_the_optimal_order_warning():
    """Opacus' PRV sizes its grid with RDP bounds, which warn at large sigma -- e.g. the first
    sigma (20) of every calibration search: noise about a by-product, silenced (only it)."""
    import warnings

    sigma, q, steps, delta = 5.0, 0.04, 100, 1e-5
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        acc = PRVAccountant()
        acc.history = [(sigma, q, steps)]
        want = acc.get_epsilon(delta=delta)
    assert any("Optimal order" in str(w.message) for w in theirs)  # Opacus' PRV emits it (domain sizing)
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        got = compute_epsilon(sigma, q, steps, delta, "prv")
        ledger = PrivacyLedger(noise_multiplier=sigma, max_grad_norm=1.0, plan=PoissonPlan(1000, q, 0),
                               delta=delta, accountant="prv")
        for _ in range(3):
            ledger.step()
        ledger.epsilon_spent()
        calibrate_noise(4.0, delta, q, 60, "prv")
        warnings.warn("another warning", UserWarning)  # only the optimal-order one is silenced
    assert got == want
    assert [str(w.message) for w in ours] == ["another warning"]


def test_ledger_epsilon_spent_is_bounded():
    ledger = PrivacyLedger(noise_multiplier=0.05, max_grad_norm=1.0, plan=PoissonPlan(1000, 0.5, 0), delta=1e-5,
                           accountant="prv")
    for _ in range(50):
        ledger.step()
    with pytest.raises(PrivacyParameterError, match="grid of"):
        ledger.epsilon_spent()


def test_cli_bounds_and_note(_cli):
    r = _cli("--noise-multiplier", "0.01", "--delta", "1e-5", "--sample-rate", "0.01", "--steps", "100")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "grid of" in r.stderr
    r = _cli("--noise-multiplier", "0.01", "--delta", "1e-5", "--sample-rate", "0.01", "--steps", "100",
             "--accountant", "rdp", "--json")
    assert r.returncode == 0
    want = RDPAccountant()
    want.history = [(0.01, 0.01, 100)]
    assert json.loads(r.stdout)["epsilon"] == pytest.approx(want.get_epsilon(delta=1e-5), rel=1e-12)
    assert r.stderr.count("\n") == 1 and "note: the RDP optimal order is the smallest alpha" in r.stderr
    r = _cli("--epsilon", "3", "--delta", "1e-5", "--sample-rate", "0.04", "--steps", "100", "--time-limit", "0")
    assert r.returncode == 2 and "--time-limit" in r.stderr


def test_cli_progress_lines_and_grid_flag(_cli, monkeypatch):
    import dpldm.privacy.cli as pcli

    monkeypatch.setattr(pcli, "PROGRESS_AFTER_S", 0.0)  # as if the accounting had run long
    r = _cli("--epsilon", "4", "--delta", "1e-5", "--sample-rate", "0.05", "--steps", "60", "--json")
    assert r.returncode == 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) >= 3 and all(ln.startswith("dpldm privacy: calibrating sigma (PRV): evaluation ") for ln in lines)
    assert json.loads(r.stdout)["noise_multiplier"] == calibrate_noise(4.0, 1e-5, 0.05, 60, "prv")
    r = _cli("--epsilon", "4", "--delta", "1e-5", "--sample-rate", "0.05", "--steps", "60", "--json", "--quiet")
    assert r.returncode == 0 and r.stderr == ""
    r = _cli("--noise-multiplier", "1", "--delta", "1e-5", "--sample-rate", "0.05", "--steps", "60",
             "--max-grid-points", "1000")
    assert r.returncode == 2 and "limit 1000," in r.stderr and len(r.stderr.strip().splitlines()) == 1
