"""Bad input to `dpldm sample`, `dpldm privacy` and `dpldm export` (docs/errors.md, section
"Sampling, privacy and export (issue 13)"): each row runs the real entry point `dpldm.cli.main`
in-process and must give exit code 2, ONE line `dpldm <command>: error: ...` naming the problem
(progress lines may precede it), no traceback, and no partial output: the output path is not
created, an existing one is left byte-for-byte unchanged, and no temporary is left beside it."""
from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import traceback
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import pytest

import dpldm.cli
from dpldm.cli import main
from tiny_ldm import EXPORTABLE, TINY, save_tiny
from cli_harness import tree_hash

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Sampling, privacy and export (issue 13)"


class Env:
    def __init__(self, root: Path) -> None:
        self.root = root

    @cached_property
    def tiny(self) -> Path:  # diffusion.timesteps = 20, 5 classes
        return save_tiny(self.root / "tiny", TINY)

    @cached_property
    def exportable(self) -> Path:
        return save_tiny(self.root / "exportable", EXPORTABLE, seed=1)

    @cached_property
    def hub(self) -> Path:
        from dpldm.interop.diffusers_folder import export_diffusers
        from dpldm.models.ldm import load_ldm

        return export_diffusers(load_ldm(self.exportable), self.root / "hub")

    def broken_hub(self, name: str, how: Callable[[Path], None]) -> Path:
        folder = self.root / f"hub_{name}"
        if not folder.exists():
            shutil.copytree(self.hub, folder)
            how(folder)
        return folder


def _mismatch(folder: Path) -> None:
    path = folder / "unet" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["cross_attention_dim"] = 32
    path.write_text(json.dumps(cfg))


def _truncate(folder: Path) -> None:
    w = folder / "vae" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])


@dataclass
class Row:
    id: str
    what: str
    argv: Callable[[Env, Path], list[str]]  # (env, out path) -> argv
    needle: str
    prepare: str = ""  # "file" | "dir": the output path exists before the run (must stay unchanged)


def smp(e: Env, o: Path, *extra: str, model: Path | None = None) -> list[str]:
    return ["sample", "--checkpoint", str(model or e.tiny), "--out", str(o), "--device", "cpu", *extra]


def npz(o: Path) -> Path:
    return o.with_suffix(".npz")


def loop(path: Path) -> Path:
    """`path` as a loop of two symbolic links (path -> path.2 -> path)."""
    other = path.with_name(path.name + ".2")
    path.symlink_to(other.name)
    other.symlink_to(path.name)
    return path


PRIV = ["--delta", "1e-5", "--sample-rate", "0.01"]

ROWS = [
    # dpldm sample
    Row("sample-guidance-nan", "`--guidance nan` (wrote a black PNG)", lambda e, o: smp(e, o, "--guidance", "nan"),
        "--guidance must be a finite number, got nan"),
    Row("sample-guidance-negative", "negative guidance", lambda e, o: smp(e, o, "--guidance", "-1"),
        "--guidance must be >= 0 (0 = unconditional, 1 = conditional only), got -1"),
    Row("sample-eta-negative", "negative DDIM eta", lambda e, o: smp(e, o, "--eta", "-0.5"),
        "--eta must lie in [0, 1] (0 = deterministic DDIM, 1 = DDPM-like), got -0.5"),
    Row("sample-eta-inf", "infinite eta", lambda e, o: smp(e, o, "--eta", "inf"), "--eta must be a finite number, got inf"),
    Row("sample-eta-ddpm", "`--eta` with `--sampler ddpm`", lambda e, o: smp(e, o, "--sampler", "ddpm", "--eta", "0.5"),
        "--eta applies to --sampler ddim only"),
    Row("sample-steps-zero", "`--steps 0` (silently ran 50)", lambda e, o: smp(e, o, "--steps", "0"),
        "--steps must be >= 1, got 0"),
    Row("sample-steps-above-T", "more steps than the model's 20 timesteps", lambda e, o: smp(e, o, "--steps", "21"),
        "--steps must lie in [1, 20] (diffusion.timesteps of the model), got 21"),
    Row("sample-per-class-zero", "`--per-class 0`", lambda e, o: smp(e, o, "--per-class", "0"),
        "--per-class must be >= 1, got 0"),
    Row("sample-class-twice", "`--classes 1,1`", lambda e, o: smp(e, o, "--classes", "1,1"),
        "--classes: '1,1' names a class twice"),
    Row("sample-out-is-folder", "`--format npz --out` an existing folder",
        lambda e, o: smp(e, o, "--format", "npz"), "is a folder, but --format npz writes a file", prepare="dir"),
    Row("sample-out-is-file", "`--format png-dir --out` an existing file",
        lambda e, o: smp(e, o, "--format", "png-dir"), "is a file, but --format png-dir writes a folder", prepare="file"),
    Row("sample-npz-suffix", "`--format npz --out x.zip`",
        lambda e, o: smp(e, o.with_suffix(".zip"), "--format", "npz"),
        "--format npz needs a name ending in .npz (what dpldm evaluate reads)"),
    Row("sample-out-exists", "output exists, no `--overwrite`", lambda e, o: smp(e, o, "--format", "grid"),
        "already exists; pass --overwrite to replace it", prepare="file"),
    Row("sample-no-cuda", "`--device cuda:7` on a machine without it",
        lambda e, o: smp(e, o, "--device", "cuda:7"), "--device=cuda:7: "),
    # dpldm privacy
    Row("privacy-sigma-too-small-prv", "`--noise-multiplier 0.01` (tried to allocate 26 GiB)",
        lambda e, o: ["privacy", "--noise-multiplier", "0.01", *PRIV, "--steps", "100"],
        "PRV accountant: sigma=0.01, q=0.01, 100 steps, delta=1e-05 needs a grid of 3.52e+09 points (limit 16777216"),
    Row("privacy-steps-huge-prv", "`--steps 1000000000` (tried to allocate 34 GiB)",
        lambda e, o: ["privacy", "--noise-multiplier", "1", *PRIV, "--steps", "1000000000"],
        "1000000000 steps, delta=1e-05 needs a grid of 1.89e+12 points"),
    Row("privacy-epsilon-runaway-prv", "`--epsilon 1000` (hung)",
        lambda e, o: ["privacy", "--epsilon", "1000", "--delta", "1e-5", "--sample-rate", "0.04", "--steps", "750"],
        "calibrating sigma for epsilon=1000 at delta=1e-05, q=0.04, steps=750 reached sigma=0.1562, which needs a grid"),
    Row("privacy-calibration-time-limit", "calibration past `--time-limit`",
        lambda e, o: ["privacy", "--epsilon", "3", *PRIV, "--steps", "100", "--time-limit", "1e-9"],
        "(time limit 1e-09 s) at sigma=20"),
    Row("privacy-bad-time-limit", "`--time-limit 0`",
        lambda e, o: ["privacy", "--epsilon", "3", *PRIV, "--steps", "100", "--time-limit", "0"],
        "--time-limit must be a finite number of seconds > 0, got 0.0"),
    Row("privacy-prv-numerical", "delta too small for PRV's floating point",
        lambda e, o: ["privacy", "--noise-multiplier", "0.5", "--delta", "1e-300", "--sample-rate", "0.001",
                      "--steps", "1"], "PRV accountant cannot evaluate sigma=0.5, q=0.001, 1 steps, delta=1e-300 (Opacus: "),
    Row("privacy-sigma-negative", "`--noise-multiplier -1`",
        lambda e, o: ["privacy", "--noise-multiplier", "-1", *PRIV, "--steps", "10"],
        "noise multiplier sigma must be a finite number > 0, got -1.0"),
    Row("privacy-sigma-nan", "`--noise-multiplier nan`",
        lambda e, o: ["privacy", "--noise-multiplier", "nan", *PRIV, "--steps", "10"],
        "noise multiplier sigma must be a finite number > 0, got nan"),
    Row("privacy-steps-zero", "`--steps 0`", lambda e, o: ["privacy", "--noise-multiplier", "1", *PRIV, "--steps", "0"],
        "steps must be an integer >= 1, got 0"),
    # dpldm export / importing a diffusers folder
    Row("export-not-expressible", "a model whose GroupNorm group counts differ (widths 16/32/48)",
        lambda e, o: ["export", "--checkpoint", str(e.tiny), "--out", str(o)],
        "cannot export exactly to diffusers: unet: its GroupNorms have different group counts (16 for 16 channels, "
        "32 for 32 channels)"),
    Row("export-shipped-public-model", "the shipped glyph model (widths 40/80)",
        lambda e, o: ["export", "--checkpoint", "dpldm/assets/public_glyphs", "--out", str(o)],
        "cannot export exactly to diffusers: unet: its GroupNorms have different group counts"),
    Row("export-out-exists", "`--out` exists, no `--overwrite`",
        lambda e, o: ["export", "--checkpoint", str(e.exportable), "--out", str(o)],
        "already exists; pass --overwrite to replace it", prepare="dir"),
    Row("export-out-is-file", "`--out` is a file",
        lambda e, o: ["export", "--checkpoint", str(e.exportable), "--out", str(o), "--overwrite"],
        "is a file; export writes a folder", prepare="file"),
    Row("export-onto-itself", "`--out` is the `--checkpoint` folder",
        lambda e, o: ["export", "--checkpoint", str(e.hub), "--out", str(e.hub), "--overwrite"],
        "is the --checkpoint folder itself"),
    Row("export-missing-checkpoint", "`--checkpoint` folder does not exist",
        lambda e, o: ["export", "--checkpoint", str(e.root / "nope"), "--out", str(o)], "nope: checkpoint folder not found"),
    Row("export-dpldm-no-ema", "`--format dpldm --no-ema`",
        lambda e, o: ["export", "--checkpoint", str(e.hub), "--format", "dpldm", "--no-ema", "--out", str(o)],
        "--no-ema and --verify apply to --format diffusers only"),
    Row("export-checkpoint-symlink-loop", "`--checkpoint` a loop of symbolic links (was: RuntimeError traceback)",
        lambda e, o: ["export", "--checkpoint", str(loop(o.with_name("model"))), "--out", str(o)],
        "--checkpoint {outs}/model: a loop of symbolic links (resolving it never reaches a file or folder)"),
    Row("export-out-symlink-loop", "`--out` a loop of symbolic links (was: RuntimeError traceback)",
        lambda e, o: ["export", "--checkpoint", str(e.exportable), "--out", str(loop(o)), "--overwrite"],
        "--out {outs}/out: a loop of symbolic links (resolving it never reaches a file or folder); fix or remove "
        "the link, or choose another path"),
    Row("import-config-mismatch", "diffusers folder whose unet/config.json disagrees with dpldm.json",
        lambda e, o: smp(e, npz(o), "--format", "npz", model=e.broken_hub("mismatch", _mismatch)),
        "unet/config.json: does not match"),
    Row("import-truncated-weights", "diffusers folder with truncated vae weights",
        lambda e, o: smp(e, npz(o), "--format", "npz", model=e.broken_hub("trunc", _truncate)),
        "vae/diffusion_pytorch_model.safetensors: unreadable safetensors file"),
    Row("import-no-class-embedder", "diffusers folder without class_embedder/",
        lambda e, o: smp(e, npz(o), "--format", "npz", model=e.broken_hub(
            "noemb", lambda f: shutil.rmtree(f / "class_embedder"))),
        "class_embedder/embedding.safetensors: missing"),
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return Env(tmp_path_factory.mktemp("bad_inputs_cli"))


@pytest.fixture
def with_export(monkeypatch):
    """`dpldm export` through the real entry point, registered as the lead adds it to COMMANDS."""
    if "export" not in dpldm.cli.COMMANDS:
        monkeypatch.setitem(dpldm.cli.COMMANDS, "export", ("dpldm.export", "export a model (diffusers, dpldm)"))


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row: Row, env: Env, tmp_path: Path, with_export):
    out_dir = tmp_path / "outs"
    out_dir.mkdir()
    out = out_dir / "out"
    if row.prepare == "file":
        out.write_bytes(b"already here")
    elif row.prepare == "dir":
        out.mkdir()
        (out / "mine.txt").write_text("keep")
    argv = row.argv(env, out)
    before = {p.name: tree_hash(p) for p in out_dir.iterdir()}
    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            code = main(argv)
    except SystemExit as e:
        code = e.code
    except Exception:  # noqa: BLE001 - what the interpreter would print
        code, _ = 1, err.write(traceback.format_exc())
    stderr = err.getvalue()
    assert "Traceback" not in stderr, stderr[-2000:]
    assert code == 2, (code, stderr)
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ": error: " in ln]
    assert len(errors) == 1 and errors[0] == lines[-1], lines  # ONE error line, last
    assert re.match(rf"dpldm {argv[0]}: error: ", errors[0]), errors[0]
    assert row.needle.replace("{outs}", str(out_dir)) in errors[0], errors[0]
    assert {p.name: tree_hash(p) for p in out_dir.iterdir()} == before  # nothing created, changed or left behind


def test_every_row_is_documented():
    doc = (REPO / "docs" / "errors.md").read_text()
    assert SECTION in doc
    section = doc[doc.index(SECTION):]
    missing = [r.id for r in ROWS if f"`{r.id}`" not in section]
    assert not missing, f"rows missing from docs/errors.md ({SECTION}): {missing}"
