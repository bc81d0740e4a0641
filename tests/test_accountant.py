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
