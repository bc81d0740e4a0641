"""The results protocol of `make results` (dpldm/experiments/utility.py, issue 16 item 4).

Checked against independent references: the table's mean +- sample std and the margin to the direct
DP classifier against numpy on hand-made results; the ablation's module numbers against the module
names of the UNet (a different route than the tool's) on two UNet layouts; and one real `--quick`
run of the whole protocol: every (variant, epsilon, repetition) is in results.json, each repetition
is its own private run (distinct folders, different trained weights), the trained parameter counts
match the stored specs, the printed table agrees with numpy over results.json, and a second
invocation computes nothing.
"""
from __future__ import annotations

import importlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def load_tool():
    return importlib.import_module("dpldm.experiments.utility")


tool = load_tool()
from dpldm.experiments.results_data import TABLE_HEADER  # noqa: E402  (importable once the tool put the repo on sys.path)


def demo_unet_config():
    from dpldm.config import load_config

    return load_config(str(REPO / "configs" / "demo.toml")).unet


def row(variant, eps, rep, acc, **kw):
    return {"variant": variant, "epsilon_target": eps, "rep": rep, "seed": rep, "accuracy": acc, **kw}


def table_rows(text: str) -> dict[tuple[str, str], list[str]]:
    """{(variant cell, epsilon cell): cells} of a markdown table printed by the tool."""
    lines = text.split(TABLE_HEADER, 1)[1].strip().splitlines()[1:]
    out = {}
    for line in lines:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        out[(cells[0], cells[1])] = cells
    return out


# -- aggregation and formatting --------------------------------------------------------------------

def test_aggregate_against_numpy():
    """Mean and sample std (ddof 1) per (variant, epsilon), n, the direct classifier at the same epsilon
    and the margin with its standard error, all against numpy; rows ordered once-only variants first,
    then by epsilon; a single run has no std."""
    acc = {("dp-attention", 1.0): [0.71, 0.75, 0.78], ("dp-attention", 10.0): [0.90, 0.93, 0.915],
           ("dp-classifier", 1.0): [0.74, 0.70, 0.73], ("dp-classifier", 10.0): [0.92, 0.91],
           ("dp-full", 10.0): [0.86]}
    fid = {("dp-attention", 10.0): [66.0, 61.5, 70.25]}
    runs = {"public": row("public", None, 0, 0.638, fid=78.6, kid=0.0354, epsilon=0.0)}
    for (v, e), accs in acc.items():
        for r, a in enumerate(accs):
            runs[tool.run_key(v, e, r)] = row(v, e, r, a, epsilon=e * 0.999, fid=fid.get((v, e), [None] * 3)[r],
                                              seconds=10.0 * (r + 1))
    rows = tool.aggregate(runs)
    assert [(r.variant, r.epsilon_target) for r in rows] == [
        ("public", None), ("dp-attention", 1.0), ("dp-classifier", 1.0), ("dp-attention", 10.0), ("dp-full", 10.0),
        ("dp-classifier", 10.0)]
    by = {(r.variant, r.epsilon_target): r for r in rows}
    for (v, e), accs in acc.items():
        r = by[(v, e)]
        assert r.runs == len(accs) and r.accuracy.n == len(accs)
        assert r.accuracy.mean == pytest.approx(np.mean(accs), abs=1e-12)
        if len(accs) > 1:
            assert r.accuracy.std == pytest.approx(np.std(accs, ddof=1), abs=1e-12)
        else:
            assert r.accuracy.std is None
    a = by[("dp-attention", 10.0)]
    assert a.fid.mean == pytest.approx(np.mean(fid[("dp-attention", 10.0)]))
    assert a.fid.std == pytest.approx(np.std(fid[("dp-attention", 10.0)], ddof=1))
    assert a.seconds.mean == pytest.approx(20.0)
    for e in (1.0, 10.0):
        ours, direct = np.array(acc[("dp-attention", e)]), np.array(acc[("dp-classifier", e)])
        r = by[("dp-attention", e)]
        assert r.direct.mean == pytest.approx(direct.mean()) and r.direct.n == len(direct)
        assert r.margin == pytest.approx(ours.mean() - direct.mean())
        se = math.sqrt(ours.var(ddof=1) / len(ours) + direct.var(ddof=1) / len(direct))
        assert r.margin_se == pytest.approx(se)
    full = by[("dp-full", 10.0)]  # one run: a margin without a standard error
    assert full.margin == pytest.approx(0.86 - np.mean(acc[("dp-classifier", 10.0)])) and full.margin_se is None
    assert by[("public", None)].direct is None and by[("dp-classifier", 1.0)].direct is None
    assert by[("public", None)].fid.std is None and by[("public", None)].fid.mean == pytest.approx(78.6)


def test_markdown_table_cells():
    """Exact cells of a small table: mean +- std in percent, n, the direct classifier beside the row,
    the margin in points, the spent epsilon, the spec in the variant cell."""
    runs = {"public": row("public", None, 0, 0.638, epsilon=0.0, trainable_parameters=0),
            "nonprivate-attention": row("nonprivate-attention", None, 0, 0.939, epsilon=float("inf"),
                                        finetune="attention:all", trainable_parameters=617368, fid=55.0,
                                        fid_n_samples=200, kid=0.0198, seconds=545.0)}
    for r, (a, d) in enumerate([(0.90, 0.92), (0.94, 0.91), (0.92, 0.93)]):
        runs[tool.run_key("dp-attention-last", 10, r)] = row("dp-attention-last", 10.0, r, a, epsilon=9.994,
                                                             finetune="attention:6-7", trainable_parameters=69968,
                                                             fid=60.0 + r, fid_n_samples=200, kid=0.02, seconds=100.0)
        runs[tool.run_key("dp-classifier", 10, r)] = row("dp-classifier", 10.0, r, d, epsilon=9.99,
                                                         trainable_parameters=268362, seconds=50.0)
    cells = table_rows(tool.markdown_table(tool.aggregate(runs)))
    assert cells[("public", "—")] == ["public", "—", "0 (no private data)", "0", "1", "63.8%", "—", "—", "—", "—",
                                      "—"]
    assert cells[("nonprivate-attention (attention:all)", "—")] == [
        "nonprivate-attention (attention:all)", "—", "∞ (non-private)", "617,368", "1", "93.9%", "55.0 (200)",
        "0.0198", "—", "—", "545"]
    # ours 92.0 +- 2.0, direct 92.0 +- 1.0: margin +0.0 +- sqrt(4/3 + 1/3) = 1.29
    assert cells[("dp-attention-last (attention:6-7)", "10")] == [
        "dp-attention-last (attention:6-7)", "10", "9.99", "69,968", "3", "92.0 ± 2.0%", "61.0 ± 1.0 (200)",
        "0.0200 ± 0.0000", "92.0 ± 1.0% (n=3)", "+0.0 ± 1.3", "100 ± 0"]
    assert cells[("dp-classifier", "10")][5] == "92.0 ± 1.0%" and cells[("dp-classifier", "10")][8] == "—"


# -- the ablation's module numbers -------------------------------------------------------------------

def numbers_by_name(unet, prefixes: tuple[str, ...]) -> list[int]:
    """1-based forward-order numbers of the SpatialTransformers whose module path starts with a prefix
    (named_modules: a different route than the tool's identity test)."""
    from dpldm.models.attention import SpatialTransformer

    names = [n for n, m in unet.named_modules() if isinstance(m, SpatialTransformer)]
    return [k + 1 for k, n in enumerate(names) if n.startswith(prefixes)]


@pytest.mark.parametrize("layout", ["demo", "levels1_res2"])
def test_ablation_specs_from_the_model(layout):
    """decoder = middle + output-block attention modules, last = the last two output-block ones; the
    demo UNet (7 modules) gives 3-7 and 6-7; a UNet with attention only at level 1 and 2 res blocks
    (2 encoder, 1 middle, 3 decoder modules) gives 3-6 and 5-6; apply_finetune trains exactly those."""
    from dataclasses import replace

    from dpldm.models.selection import apply_finetune
    from dpldm.models.unet import UNet

    cfg = demo_unet_config()
    expected = {"demo": ("attention:3-7", "attention:6-7"), "levels1_res2": ("attention:3-6", "attention:5-6")}[layout]
    if layout == "levels1_res2":
        cfg = replace(cfg, attention_levels=[1], num_res_blocks=2)
    unet = UNet(cfg)
    specs = tool.ablation_specs(unet)
    assert specs["dp-attention"] == "attention:all" and specs["dp-full"] == "all"
    assert (specs["dp-attention-decoder"], specs["dp-attention-last"]) == expected
    dec = numbers_by_name(unet, ("middle_block", "output_blocks"))
    assert specs["dp-attention-decoder"] == "attention:" + tool.ranges_text(dec)
    assert specs["dp-attention-last"] == "attention:" + tool.ranges_text(numbers_by_name(unet, ("output_blocks",))[-2:])
    trained = apply_finetune(unet, specs["dp-attention-last"])
    assert trained and all(n.startswith(("output_blocks", "label_embedder")) for n in trained)
    assert any(n.startswith("label_embedder") for n in trained)


def test_ranges_text():
    assert tool.ranges_text([3, 4, 5, 7]) == "3-5,7"
    assert tool.ranges_text([6, 7]) == "6-7"
    assert tool.ranges_text([2]) == "2"
    assert tool.ranges_text([9, 1, 2, 10, 11, 4]) == "1-2,4,9-11"


# -- plan, cache, resume, migration (fake runs) ---------------------------------------------------------

def fake_runs(monkeypatch, calls: list):
    def fake(variant, eps, rep, cfg, specs, args, out):
        calls.append(tool.run_key(variant, eps, rep))
        assert cfg.privacy.epsilon == (eps if eps is not None else cfg.privacy.epsilon)
        return {"variant": variant, "epsilon_target": eps, "rep": rep, "seed": rep,
                "accuracy": 0.5 + 0.01 * rep + (eps or 0) / 100, "epsilon": eps or 0.0,
                "finetune": specs.get(variant)}
    monkeypatch.setattr(tool, "run_one", fake)


def test_plan_cache_and_resume(tmp_path, monkeypatch, capsys):
    """Every private variant R times per epsilon (repetition-major order), once-only variants once;
    an interrupted invocation resumes with exactly the missing runs; a further one computes nothing
    and changes nothing in results.json but its log of invocations."""
    calls: list[str] = []
    fake_runs(monkeypatch, calls)
    out = tmp_path / "res"
    argv = ["--out", str(out), "--epsilons", "1", "5", "10", "--repeats", "2", "--threads", "1", "--no-fid"]
    assert tool.main(argv) == 0
    expected = ["public", "nonprivate-attention"] + [tool.run_key(v, e, r) for r in (0, 1) for e in (1.0, 5.0, 10.0)
                                                     for v in tool.PRIVATE]
    assert calls == expected
    data = json.loads((out / "results.json").read_text())
    assert set(data["runs"]) == set(expected) and data["schema"] == 2
    # interruption: drop three runs (as if the process died before them)
    for k in (tool.run_key("dp-full", 5, 1), tool.run_key("dp-classifier", 10, 1), "public"):
        del data["runs"][k]
    (out / "results.json").write_text(json.dumps(data))
    calls.clear()
    assert tool.main(argv) == 0
    assert calls == ["public", tool.run_key("dp-full", 5, 1), tool.run_key("dp-classifier", 10, 1)]
    before = json.loads((out / "results.json").read_text())
    calls.clear()
    assert tool.main(argv) == 0
    after = json.loads((out / "results.json").read_text())
    assert calls == [] and after["runs"] == before["runs"] and after["settings"] == before["settings"]
    assert after["invocations"][:-1] == before["invocations"]  # only this invocation was logged
    assert after["invocations"][-1]["command"].endswith(" ".join(argv)) and len(after["invocations"]) == 3
    text = capsys.readouterr().out
    assert text.count(": cached") >= len(expected)
    assert (out / "results.md").read_text().strip() in text


def test_legacy_results_migrated(tmp_path, monkeypatch):
    """A schema-1 results.json (flat, one run per key) is read as repetition 0 of each run: not
    computed again, and shown in the table, marked (its settings were not recorded)."""
    out = tmp_path / "res"
    out.mkdir()
    legacy = {"public": {"epsilon": 0.0, "trainable_parameters": 0, "accuracy": 0.638, "fid": 78.6},
              "dp-attention@eps=10": {"epsilon": 9.99, "accuracy": 0.901, "fid": 66.1, "trainable_parameters": 617368},
              "dp-classifier@eps=10": {"epsilon": 9.99, "accuracy": 0.915, "fid": None}}
    (out / "results.json").write_text(json.dumps(legacy))
    from dpldm.experiments.results_data import read_results

    data = read_results(out / "results.json")
    assert set(data["runs"]) == {"public", "dp-attention@eps=10@rep=0", "dp-classifier@eps=10@rep=0"}
    assert data["runs"]["dp-attention@eps=10@rep=0"]["epsilon_target"] == 10.0
    assert data["runs"]["dp-attention@eps=10@rep=0"]["finetune"] == "attention:all"
    calls: list[str] = []
    fake_runs(monkeypatch, calls)
    assert tool.main(["--out", str(out), "--epsilons", "10", "--repeats", "2", "--threads", "1", "--no-fid",
                      "--variants", "public", "dp-attention", "dp-classifier"]) == 0
    assert calls == ["dp-attention@eps=10@rep=1", "dp-classifier@eps=10@rep=1"]
    table = (out / "results.md").read_text()
    cells = table_rows(table)
    ours = [0.901, 0.5 + 0.01 + 0.1]
    assert cells[("dp-attention (attention:all) †", "10")][5] == (
        f"{100 * np.mean(ours):.1f} ± {100 * np.std(ours, ddof=1):.1f}%")
    assert ("public †", "—") in cells and table.rstrip().endswith(tool.LEGACY_NOTE)  # marked: settings unknown


# -- the whole protocol, for real (--quick) -------------------------------------------------------------

@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("results") / "quick"
    from cli_harness import run_in_process

    rc, stdout, stderr = run_in_process(tool.main, ["--quick", "--out", str(out), "--threads", "1"])
    assert rc == 0, stderr[-3000:]
    return out, stdout


def test_quick_protocol_runs(quick):
    """Every (variant, epsilon, repetition) of the default quick protocol is in results.json; each
    private repetition is a fresh run in its own folder, seeded for sampling/CNN with its index, at
    most its target epsilon; the two repetitions' trained weights differ (noise from the OS); the
    trained parameter count matches the stored spec."""
    from safetensors.torch import load_file

    from dpldm.models.selection import apply_finetune, count_parameters
    from dpldm.models.unet import UNet

    out, stdout = quick
    data = json.loads((out / "results.json").read_text())
    runs = data["runs"]
    eps_list, reps = tool.QUICK_EPSILONS, range(tool.QUICK_REPEATS)
    expected = {"public", "nonprivate-attention"} | {tool.run_key(v, e, r) for v in tool.PRIVATE for e in eps_list
                                                     for r in reps}
    assert set(runs) == expected
    unet_cfg = demo_unet_config()
    specs = tool.ablation_specs(UNet(unet_cfg))
    assert data["ablation_specs"] == specs
    for v in tool.GENERATIVE_PRIVATE:
        assert f"[utility]   {v}: {specs[v]}" in stdout
    for key, r in runs.items():
        if r["variant"] in tool.ONCE:
            continue
        assert r["seed"] == r["rep"] and r["epsilon_target"] in eps_list
        assert 0 < r["epsilon"] <= r["epsilon_target"] * 1.001, (key, r["epsilon"])
        assert 0.0 <= r["accuracy"] <= 1.0
    for v in tool.GENERATIVE_PRIVATE:
        unet = UNet(unet_cfg)
        apply_finetune(unet, specs[v])
        trainable = count_parameters(unet)[1]
        for e in eps_list:
            dirs = [Path(runs[tool.run_key(v, e, r)]["run_dir"]) for r in reps]
            assert len(set(dirs)) == len(dirs) and all((d / "model" / "meta.json").is_file() for d in dirs)
            for r in reps:
                assert runs[tool.run_key(v, e, r)]["finetune"] == specs[v]
                assert runs[tool.run_key(v, e, r)]["trainable_parameters"] == trainable
            w = [load_file(str(d / "model" / "tensors.safetensors")) for d in dirs]
            trained = {n for n, p in unet.named_parameters() if p.requires_grad}
            frozen = [n for n, _ in unet.named_parameters() if n not in trained]
            assert all(torch.equal(w[0][f"unet.{n}"], w[1][f"unet.{n}"]) for n in frozen), (v, e)  # untouched
            assert any(not torch.equal(w[0][f"unet.{n}"], w[1][f"unet.{n}"]) for n in trained), (v, e)  # own noise


def test_quick_table_matches_results(quick):
    """The printed table == results.md; each (variant, epsilon) row: n = repetitions, accuracy mean +- std
    as numpy computes it over results.json, the direct classifier at the SAME epsilon beside it, and
    the margin = the difference of the two means."""
    out, stdout = quick
    runs = json.loads((out / "results.json").read_text())["runs"]
    table = (out / "results.md").read_text().strip()
    assert table in stdout
    cells = table_rows(table)
    specs = json.loads((out / "results.json").read_text())["ablation_specs"]
    for e in tool.QUICK_EPSILONS:
        direct = np.array([runs[tool.run_key("dp-classifier", e, r)]["accuracy"] for r in range(tool.QUICK_REPEATS)])
        for v in tool.GENERATIVE_PRIVATE:
            ours = np.array([runs[tool.run_key(v, e, r)]["accuracy"] for r in range(tool.QUICK_REPEATS)])
            c = cells[(f"{v} ({specs[v]})", f"{e:g}")]
            assert c[4] == str(tool.QUICK_REPEATS)
            assert c[5] == f"{100 * ours.mean():.1f} ± {100 * ours.std(ddof=1):.1f}%"
            assert c[8] == f"{100 * direct.mean():.1f} ± {100 * direct.std(ddof=1):.1f}% (n={len(direct)})"
            margin = round(100 * (ours.mean() - direct.mean()), 1) + 0.0  # + 0.0: no "-0.0"
            assert re.match(rf"^{re.escape(f'{margin:+.1f}')} ± ", c[9]), c[9]
    assert set(cells) == {(f"{v} ({specs[v]})" if v in specs else v, f"{e:g}") for v in tool.PRIVATE
                          for e in tool.QUICK_EPSILONS} | {("public", "—"), ("nonprivate-attention (attention:all)",
                                                                                "—")}


def test_quick_second_invocation_computes_nothing(quick, monkeypatch):
    """Resume: run again with the same flags; nothing is trained or sampled, results.json is unchanged."""
    from cli_harness import run_in_process

    out, _ = quick
    before = json.loads((out / "results.json").read_text())

    def boom(*a, **k):
        raise AssertionError("a cached run was computed again")

    monkeypatch.setattr(tool, "run_one", boom)
    rc, stdout, stderr = run_in_process(tool.main, ["--quick", "--out", str(out), "--threads", "1"])
    assert rc == 0, stderr
    after = json.loads((out / "results.json").read_text())
    assert after["runs"] == before["runs"] and after["invocations"][:-1] == before["invocations"]
    n = 2 + len(tool.PRIVATE) * len(tool.QUICK_EPSILONS) * tool.QUICK_REPEATS
    assert stdout.count(": cached") == n
