"""The experiments layer (dpldm/experiments/): the results store, figures, statistics, and the epsilon
and ablation experiments end to end in --quick mode through `dpldm experiment ...`.

References: numpy for mean / sample std and for the table's numbers over results.json; the store
against hand-made files (another experiment, other settings, a broken file, a malformed run); the
figure is a real PNG; the quick runs' keys against the plan written out by hand; a second invocation
computes nothing; the ablation's trainable-parameter counts against the parameter names of the UNet.
"""
from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from cli_harness import run_in_process
from dpldm.cli import main as dpldm_main
from dpldm.errors import UserError
from dpldm.experiments import common, figures, store


# -- store ---------------------------------------------------------------------------------------------

def test_store_records_resumes_and_logs_each_invocation(tmp_path):
    s = store.ResultStore(tmp_path / "out", "demoexp", {"a": 1, "b": {"c": [1, 2]}}).open(["dpldm", "x"])
    assert s.runs == {}
    s.record("cell1", {"accuracy": 0.5})
    s2 = store.ResultStore(tmp_path / "out", "demoexp", {"b": {"c": [1, 2]}, "a": 1}).open(["dpldm", "y"])
    assert s2.runs == {"cell1": {"accuracy": 0.5}}  # the same settings in another key order: resumed
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [i["command"] for i in data["invocations"]] == ["dpldm x", "dpldm y"]
    inv = data["invocations"][-1]
    assert inv["machine"]["cores"] and inv["machine"]["torch"] and "started" in inv
    assert inv["commit"] is None or re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", inv["commit"])
    assert data["experiment"] == "demoexp" and data["settings_sha256"] == store.fingerprint({"a": 1, "b": {"c": [1, 2]}})


def test_store_refuses_other_settings_naming_the_key_and_changes_nothing(tmp_path):
    out = tmp_path / "out"
    store.ResultStore(out, "e", {"recipe": {"lr": 1e-3}, "n": 5}).open().record("k", {"x": 1})
    before = (out / "results.json").read_bytes()
    with pytest.raises(UserError, match=r"other settings \(recipe\.lr: 0\.001 -> 0\.002\)"):
        store.ResultStore(out, "e", {"recipe": {"lr": 2e-3}, "n": 5}).open()
    with pytest.raises(UserError, match="holds the 'e' experiment, not 'f'"):
        store.ResultStore(out, "f", {"recipe": {"lr": 1e-3}, "n": 5}).open()
    assert (out / "results.json").read_bytes() == before


@pytest.mark.parametrize("content, message", [
    ("{not json", "not a readable results file"),
    ("[1, 2]", "expected a JSON object"),
    ('{"schema": 7, "runs": {}}', "schema 7 is not understood"),
    ('{"schema": 2, "runs": {"k": 3}}', "run 'k' is not a run"),
])
def test_store_refuses_a_broken_file(tmp_path, content, message):
    (tmp_path / "results.json").write_text(content)
    with pytest.raises(UserError, match=re.escape(message)):
        store.ResultStore(tmp_path, "e", {}).open()
    assert (tmp_path / "results.json").read_text() == content


def test_store_refuses_an_out_path_through_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        store.ResultStore(tmp_path / "f" / "out", "e", {}).open()


# -- statistics and figures -------------------------------------------------------------------------------

def test_stat_matches_numpy_and_ignores_missing_values():
    vals = [0.91, 0.87, None, 0.95, float("nan")]
    s = common.stat(vals)
    ref = np.array([0.91, 0.87, 0.95])
    assert s.n == 3 and math.isclose(s.mean, ref.mean()) and math.isclose(s.std, ref.std(ddof=1))
    assert common.stat([0.5]).std is None and common.stat([]).mean is None
    assert s.text(100, unit="%") == f"{100 * ref.mean():.1f} ± {100 * ref.std(ddof=1):.1f}%"


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_figures_are_pngs_and_skip_missing_points(tmp_path):
    s = figures.Series("a", [1, 2, 3], [0.5, None, 0.7], [0.1, None, None])
    assert figures._finite(s) == ([1.0, 3.0], [0.5, 0.7], [0.1, 0.0])
    p = figures.line_panels(tmp_path / "f.png", [("acc (%)", [s]), ("fid", [])], xlabel="eps", title="t",
                            xscale="log", xticks=[(1, "1"), (3, "∞")])
    w, h = _png_size(p)
    assert w > 600 and h > 300
    b = figures.grouped_bars(tmp_path / "b.png", ["g1", "g2"], [figures.Series("e1", [0, 1], [50, 60], [2, None])],
                             ylabel="acc", xlabel="range", title="t")
    assert _png_size(b)[0] > 300
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temporary left


def test_check_positive_names_the_flag():
    common.check_positive([1.0, math.inf], "--epsilons", allow_inf=True)
    with pytest.raises(UserError, match="--epsilons: every value must be a finite number > 0, got inf"):
        common.check_positive([math.inf], "--epsilons")
    with pytest.raises(UserError, match="--epsilons: 1 given twice"):
        common.check_positive([1.0, 1.0], "--epsilons")
    with pytest.raises(UserError, match="--batches: every value must be an integer"):
        common.check_positive([2.5], "--batches", integer=True)


# -- the epsilon and ablation experiments, --quick, through the CLI -------------------------------------------

def _table_cells(md: str) -> dict[str, list[str]]:
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| variant") and "---" not in ln]
    return {f"{c[0]}@{c[1]}": c for c in ([x.strip() for x in r.strip("|").split("|")] for r in rows)}


@pytest.mark.slow
def test_epsilon_quick_end_to_end_and_resume(tmp_path):
    out = tmp_path / "eps"
    argv = ["experiment", "epsilon", "--quick", "--out", str(out), "--threads", "1"]
    rc, stdout, err = run_in_process(dpldm_main, argv)
    assert rc == 0, err[-3000:]
    data = json.loads((out / "results.json").read_text())
    expected = {"nonprivate-attention", "nonprivate-attention@rep=1", "nonprivate-classifier",
                "nonprivate-classifier@rep=1"} | {f"{v}@eps=1@rep={r}" for v in ("dp-attention", "dp-classifier")
                                                  for r in (0, 1)}
    assert set(data["runs"]) == expected and data["experiment"] == "epsilon"
    assert data["invocations"][0]["command"] == "dpldm " + " ".join(argv)
    for key, row in data["runs"].items():
        assert 0.0 <= row["accuracy"] <= 1.0
        if key.startswith("dp-"):
            assert row["epsilon"] <= 1.0 + 1e-9  # spent within the target
        else:
            assert row["epsilon"] == math.inf
    # two repetitions are two private runs: distinct folders and trained weights
    assert (out / "dp-attention@eps=1@rep=0" / "model").is_dir() and (out / "dp-attention@eps=1@rep=1" / "model").is_dir()
    cells = _table_cells((out / "results.md").read_text())
    accs = [data["runs"][f"dp-attention@eps=1@rep={r}"]["accuracy"] for r in (0, 1)]
    want = f"{100 * np.mean(accs):.1f} ± {100 * np.std(accs, ddof=1):.1f}%"
    assert cells["dp-attention (attention:all)@1"][5] == want
    assert cells["nonprivate-classifier@—"][2] == "∞ (non-private)"
    assert _png_size(out / "epsilon_curve.png")[0] > 600
    assert "![epsilon_curve](epsilon_curve.png)" in (out / "results.md").read_text()
    # resumed: nothing computed again
    rc, stdout, err = run_in_process(dpldm_main, argv)
    assert rc == 0 and stdout.count(": cached") == len(expected) and " ...\n" not in stdout
    # another recipe value: refused, nothing changed
    before = (out / "results.json").read_bytes()
    rc, _, err = run_in_process(dpldm_main, argv + ["--set", "train.lr=0.1"])
    assert rc == 2 and "other settings" in err and "recipe.train.lr" in err
    assert (out / "results.json").read_bytes() == before


@pytest.mark.slow
def test_ablation_quick_trains_each_range_with_its_parameter_count(tmp_path):
    from dpldm.config import load_config
    from dpldm.experiments.common import DEFAULT_CONFIG
    from dpldm.models.selection import apply_finetune, count_parameters
    from dpldm.models.unet import UNet

    out = tmp_path / "abl"
    rc, stdout, err = run_in_process(dpldm_main, ["experiment", "ablation", "--quick", "--out", str(out),
                                                  "--threads", "1"])
    assert rc == 0, err[-3000:]
    data = json.loads((out / "results.json").read_text())
    specs = data["ablation_specs"]
    assert set(data["runs"]) == {f"{v}@eps=1@rep=0" for v in specs}
    unet_cfg = load_config(DEFAULT_CONFIG, []).unet
    counts = {}
    for variant, spec in specs.items():
        unet = UNet(unet_cfg)
        apply_finetune(unet, spec)
        counts[variant] = count_parameters(unet)[1]
        assert data["runs"][f"{variant}@eps=1@rep=0"]["trainable_parameters"] == counts[variant], variant
    assert counts["dp-attention-last"] < counts["dp-attention-decoder"] < counts["dp-attention"] < counts["dp-full"]
    assert counts["dp-full"] == sum(p.numel() for p in UNet(unet_cfg).parameters())
    table = (out / "results.md").read_text()
    for variant, spec in specs.items():
        assert f"| {variant} ({spec}) | 1 |" in table and f"{counts[variant]:,}" in table
    assert _png_size(out / "ablation.png")[0] > 300


def test_bad_flags_are_one_line_errors(tmp_path):
    for argv, message in [
        (["experiment", "epsilon", "--epsilons", "0", "--out", str(tmp_path / "a")], "--epsilons: every value"),
        (["experiment", "ablation", "--epsilons", "inf", "--out", str(tmp_path / "b")], "finite number > 0, got inf"),
        (["experiment", "epsilon", "--threads", "0", "--out", str(tmp_path / "c")], "--threads must lie in"),
        (["experiment", "epsilon", "--repeats", "0", "--out", str(tmp_path / "d")], "--repeats must be >= 1"),
    ]:
        rc, _, err = run_in_process(dpldm_main, argv)
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert not any(tmp_path.iterdir())  # nothing written


def test_readme_names_every_experiment_and_its_commands_parse():
    """README's `## Experiments` block: one line per registered experiment, each parses as it stands."""
    import shlex

    from dpldm.cli import build_parser
    from dpldm.experiments import EXPERIMENTS

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"## Experiments\n.*?```bash\n(.*?)```", text, flags=re.S).group(1)
    lines = [ln.split("#")[0].strip() for ln in block.splitlines() if ln.startswith("dpldm experiment")]
    named = set()
    for line in lines:
        argv = shlex.split(line)[1:]
        args = build_parser("experiment").parse_args(argv)
        assert args.command == "experiment" and args.experiment in EXPERIMENTS
        named.add(args.experiment)
    assert named == set(EXPERIMENTS)
    for fig in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text.split("## Results at a glance", 1)[1].split("##", 1)[0]):
        assert (Path(__file__).resolve().parents[1] / fig).is_file(), fig
