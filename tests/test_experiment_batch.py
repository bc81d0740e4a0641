"""`dpldm experiment batch` (dpldm/experiments/batch.py, batch_point.py): the plan against the
issue's numbers, sigma per point against Opacus' own calibration, sigma*C/B, the peak-memory reader
against a child that allocates a known amount, the report's claims, and one --quick run end to end."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dpldm.errors import UserError
from dpldm.experiments import batch
from dpldm.experiments.batch_point import peak_rss_mb
from dpldm.experiments.common import Stat

ROOT = Path(__file__).resolve().parents[1]
RECIPE_BATCHES = [125, 250, 500, 1000, 2000, 4000]


# -- the plan -------------------------------------------------------------------------------------------

def test_plan_fixed_examples_and_fixed_steps():
    plan = batch.make_plan(RECIPE_BATCHES, ["examples", "steps"], 4000, 1000 * 100, 100)
    assert plan["examples"] == [(125, 800), (250, 400), (500, 200), (1000, 100), (2000, 50), (4000, 25)]
    assert plan["steps"] == [(b, 100) for b in RECIPE_BATCHES]
    assert all(b * t == 100_000 for b, t in plan["examples"])


def test_points_share_the_recipe_point_and_keep_repetitions_whole():
    plan = batch.make_plan(RECIPE_BATCHES, ["examples", "steps"], 4000, 100_000, 100)
    pts = batch.points_of(plan, [10.0, 1.0], 2)
    assert len(pts) == 2 * 2 * 11  # (1000, 100) is in both modes: run once
    assert len({p.key for p in pts}) == len(pts)
    assert [p.rep for p in pts] == [0] * 22 + [1] * 22
    assert {(p.batch, p.steps) for p in pts if p.batch == 1000} == {(1000, 100)}
    assert batch.Point(10.0, 4000, 25, 0).key == "eps=10@B=4000@T=25@rep=0"


def test_sample_rate_is_batch_over_n():
    result = {"finetune": {"privacy": {"sample_rate": 0.25, "noise_multiplier": 1.5, "max_grad_norm": 1e-3,
                                       "expected_batch_size": 1000.0, "epsilon": 9.99, "accountant": "prv"},
                           "wall_s": 12.0, "peak_rss_mb": 700.0, "resumed": False},
              "eval": {"accuracy": 0.5, "fid": None}}
    row = batch.row_of(batch.Point(10.0, 1000, 100, 0), result, 4000, True)
    assert row["sample_rate"] == 1000 / 4000 and row["examples_processed"] == 100_000
    assert row["noise_per_coordinate"] == pytest.approx(1.5 * 1e-3 / 1000)
    assert row["accuracy"] == 0.5 and row["wall_s"] == 12.0
    assert batch.row_of(batch.Point(10.0, 1000, 100, 0), result, 4000, False)["wall_s"] is None
    with pytest.raises(RuntimeError, match="q="):
        batch.row_of(batch.Point(10.0, 500, 100, 0), result, 4000, True)


@pytest.mark.parametrize("batches, n, flag_text", [([125, 8000], 4000, "exceeds the N=4000"),
                                                    ([125, 300], 4000, "does not divide")])
def test_plan_refusals_are_one_line_naming_the_flag(batches, n, flag_text):
    with pytest.raises(UserError) as e:
        batch.make_plan(batches, ["examples", "steps"], n, 100_000, 100)
    assert str(e.value).startswith("--batches") and flag_text in str(e.value) and "\n" not in str(e.value)


def test_non_dividing_batch_is_fine_at_fixed_steps():
    assert batch.make_plan([300], ["steps"], 4000, 100_000, 100) == {"steps": [(300, 100)]}


def test_noise_per_coordinate():
    assert batch.noise_per_coordinate(1.4697, 1e-3, 1000) == pytest.approx(1.4697e-6)
    assert batch.noise_per_coordinate(2.0, 0.5, 4.0) == 0.25


# -- peak memory --------------------------------------------------------------------------------------

def test_peak_memory_reader_sees_a_known_allocation():
    code = ("import numpy as np; from dpldm.experiments.batch_point import peak_rss_mb as p; "
            "a, r = p(), p('/nonexistent'); x = np.ones(300 * 2**20 // 8); x[::512] += 1; "
            "print(a, r, p(), p('/nonexistent'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    before, before_ru, after, after_ru = map(float, out.stdout.split())
    assert after - before == pytest.approx(300, abs=30)  # VmHWM: this process's own, whatever the parent holds
    assert after_ru >= after - 1 and before_ru >= before - 1  # the getrusage fallback: an upper bound (fork)
    assert peak_rss_mb() > 0


# -- the report's claims --------------------------------------------------------------------------------

def _row(b, t, npc, acc, peak=600.0, rep=0):
    return {"batch": b, "steps": t, "noise_per_coordinate": npc, "accuracy": acc, "peak_rss_mb": peak,
            "num_examples": 4000, "rep": rep}


def test_verdict_names_the_cheapest_equal_noise_batch():
    plan = {"steps": [(250, 100), (1000, 100), (4000, 100)]}
    runs = {batch.Point(1.0, 250, 100, 0).key: _row(250, 100, 1.9e-5, 0.50),
            batch.Point(1.0, 1000, 100, 0).key: _row(1000, 100, 0.98e-5, 0.61),
            batch.Point(1.0, 4000, 100, 0).key: _row(4000, 100, 0.95e-5, 0.63)}
    (line,) = batch.prediction_lines(runs, plan, [1.0], 1)
    assert "cheapest batch at equal noise per coordinate, B=1000 (0.25x" in line
    assert "-2.0 points" in line and "one repetition" in line
    runs = {k: v for k, v in runs.items() if "B=1000" not in k}
    assert "do not test the equivalence" in batch.prediction_lines(runs, plan, [1.0], 1)[0]


def test_verdict_uses_the_spread_of_repetitions():
    line = [(1000, 100, Stat(1e-5, None, 2), Stat(0.60, 0.02, 2)), (4000, 100, Stat(1e-5, None, 2), Stat(0.61, 0.01, 2))]
    assert "within the combined spread 2.2" in batch.verdict(line)
    line[0] = (1000, 100, Stat(1e-5, None, 2), Stat(0.50, 0.02, 2))
    assert "outside the combined spread" in batch.verdict(line)


def test_report_shows_every_epsilon_of_the_folder():
    from argparse import Namespace

    runs = {"a": {"epsilon_target": 10.0}, "b": {"epsilon_target": 1.0}, "c": {"epsilon_target": 5.0}}
    assert batch.report_epsilons(Namespace(epsilons=[1.0]), runs) == [1.0, 10.0, 5.0]


def test_memory_summary_checks_ten_percent():
    runs = {"a": {"peak_rss_mb": 600.0}, "b": {"peak_rss_mb": 650.0}, "c": {"peak_rss_mb": 900.0, "resumed": True}}
    assert "8.3%, within the 10%" in batch.memory_summary(runs, ["a", "b", "c"])
    runs["b"]["peak_rss_mb"] = 700.0
    assert "NOT within" in batch.memory_summary(runs, ["a", "b"])


# -- end to end --------------------------------------------------------------------------------------------

def test_registered():
    from dpldm.experiments import EXPERIMENTS

    assert EXPERIMENTS.get("batch", ("",))[0] == "dpldm.experiments.batch"


def _main(argv):
    from dpldm.cli import main

    return main(["experiment", "batch", *argv])


def test_bad_flags_refused_before_anything_is_written(tmp_path, capsys):
    for argv, text in ((["--batches", "300"], "--batches: 300 exceeds the N=200"),
                       (["--batches", "8", "8"], "--batches: 8 given twice"),
                       (["--batches", "24"], "--batches: 24 does not divide"),
                       (["--set", "privacy.noise_multiplier=1.0"], "calibrates sigma per point")):
        assert _main(["--quick", "--out", str(tmp_path / "out"), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert text in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_quick_end_to_end(tmp_path, capsys, monkeypatch):
    from opacus.accountants.utils import get_noise_multiplier

    out = tmp_path / "batch"
    assert _main(["--quick", "--out", str(out), "--threads", "1"]) == 0
    for name in ("results.json", "results.md", "batch.png"):
        assert (out / name).is_file(), name
    data = json.loads((out / "results.json").read_text())
    assert data["experiment"] == "batch"
    want = {(8, 4), (16, 2), (32, 1), (8, 1), (16, 1)}  # E = 32 (fixed examples), T = 1 (fixed steps)
    runs = data["runs"]
    assert {(r["batch"], r["steps"]) for r in runs.values()} == want and len(runs) == len(want)
    for r in runs.values():
        assert r["sample_rate"] == r["batch"] / 200
        sigma = get_noise_multiplier(target_epsilon=10.0, target_delta=1e-5, sample_rate=r["batch"] / 200,
                                     steps=r["steps"], accountant="rdp", epsilon_tolerance=0.01)
        assert r["noise_multiplier"] == pytest.approx(sigma, rel=1e-6)
        assert r["noise_per_coordinate"] == pytest.approx(r["noise_multiplier"] * r["max_grad_norm"] / r["batch"])
        assert r["epsilon"] <= 10.0 and r["wall_s"] > 0 and 0 <= r["accuracy"] <= 1
    peaks = [r["peak_rss_mb"] for r in runs.values()]
    assert max(peaks) / min(peaks) - 1 <= 0.10  # flat in the batch (chunked accumulation)
    report = (out / "results.md").read_text()
    assert "within the 10% acceptance" in report and "chosen on the public proxy at B = 1000" in report
    assert not list(out.glob("*.spec.json")) and not list(out.glob("*.result.json"))

    def no_compute(*a, **k):
        raise AssertionError("a finished point was computed again")
    monkeypatch.setattr(batch, "run_child", no_compute)
    assert _main(["--quick", "--out", str(out), "--threads", "1"]) == 0
    assert json.loads((out / "results.json").read_text())["runs"] == runs
    capsys.readouterr()
    before = (out / "results.json").read_bytes()
    assert _main(["--quick", "--out", str(out), "--set", "train.lr=0.001"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before
