"""`--overwrite` never deletes what dpldm did not write (docs/errors.md, "Output folders and
--overwrite"; dpldm.utils.io.check_output_dir).

Each row runs `dpldm export` or `dpldm sample --format png-dir` through `dpldm.cli.main` against
one target the issue names -- the user's own folder, `--out RUN` holding the model being read,
the checkpoint itself, a parent of the input, `--out .`, a folder above the cwd, $HOME, a dpldm
folder of another kind or holding a file dpldm did not write, a path below a file -- and must
give exit code 2, ONE line `dpldm <command>: error: ...` naming the path and why, and leave
every file under the test root (and the working directory) byte-for-byte unchanged, with no
temporary left behind. The positive cases: a folder the same command wrote before is replaced,
atomically (a failure midway leaves the old one whole)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from dpldm.cli import main
from dpldm.utils.io import MARKER, read_marker
from tiny_ldm import EXPORTABLE, save_tiny
from cli_harness import run_in_process

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Output folders and --overwrite"


def run_cli(argv: list[str]) -> tuple[int, str]:
    code, _, err = run_in_process(main, argv)
    return code, err


def tree(root: Path) -> dict[str, str]:
    """Every entry below `root` -> sha256 of its bytes (files), 'dir' or the link target."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = f"link:{os.readlink(p)}" if p.is_symlink() else "dir" if p.is_dir() else \
            hashlib.sha256(p.read_bytes()).hexdigest()
    return out


class World:
    """root/runs/ft/{model/, metrics.jsonl}: a run folder holding the model that is read;
    root/mine/: the user's folder; root/prev_hub, root/prev_png: folders dpldm wrote before."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.run = root / "runs" / "ft"
        self.model = save_tiny(self.run / "model", EXPORTABLE, seed=1)
        (self.run / "metrics.jsonl").write_text('{"step": 1}\n')
        (self.run / "config.json").write_text('{"train": {"lr": 0.001}}\n')
        self.mine = root / "mine"
        (self.mine / "sub").mkdir(parents=True)
        (self.mine / "thesis.tex").write_text("years of work")
        (self.mine / "sub" / "data.csv").write_text("1,2,3\n")
        (self.mine / "data.npz").write_bytes(b"PK\x05\x06" + bytes(18))  # an (empty) zip archive of the user's
        self.prev_hub = root / "prev_hub"
        assert run_cli(export(self, self.prev_hub))[0] == 0
        self.prev_png = root / "prev_png"
        assert run_cli(png(self, self.prev_png))[0] == 0
        self.extra_hub, self.extra_png = root / "extra_hub", root / "extra_png"  # the user then added a file
        for src, dst in ((self.prev_hub, self.extra_hub), (self.prev_png, self.extra_png)):
            shutil.copytree(src, dst)
            (dst / "notes.md").write_text("my notes")
        (root / "afile").write_text("a file")
        self.home = root / "home"  # $HOME for the rows that need it: a dpldm export, to show that is not why
        shutil.copytree(self.prev_hub, self.home)
        self.deep = self.prev_hub / "unet"  # a cwd below a dpldm folder


def export(w: World, out: Path | str, *extra: str, checkpoint: Path | None = None) -> list[str]:
    return ["export", "--checkpoint", str(checkpoint or w.model), "--out", str(out), "--device", "cpu", *extra]


def png(w: World, out: Path | str, *extra: str, checkpoint: Path | None = None) -> list[str]:
    return ["sample", "--checkpoint", str(checkpoint or w.model), "--out", str(out), "--format", "png-dir",
            "--classes", "0", "--per-class", "1", "--steps", "2", "--device", "cpu", *extra]


def grid(w: World, out: Path | str, *extra: str, checkpoint: Path | None = None) -> list[str]:
    """`dpldm sample` writing a file (the default grid PNG)."""
    return ["sample", "--checkpoint", str(checkpoint or w.model), "--out", str(out), "--classes", "0",
            "--per-class", "1", "--steps", "2", "--device", "cpu", *extra]


CMDS = {"export": export, "sample": png}


@dataclass
class Row:
    id: str
    what: str
    command: str  # "export" | "sample"
    argv: Callable[[World], list[str]]  # the command's own flags come from CMDS
    needle: str
    cwd: Callable[[World], Path] | None = None
    home: bool = False  # HOME=w.home


def rows() -> list[Row]:
    out = []
    for cmd in ("export", "sample"):
        c = CMDS[cmd]
        same_kind = (lambda w: w.prev_hub) if cmd == "export" else (lambda w: w.prev_png)
        other_kind = (lambda w: w.prev_png) if cmd == "export" else (lambda w: w.prev_hub)
        extra = (lambda w: w.extra_hub) if cmd == "export" else (lambda w: w.extra_png)
        out += [
            Row(f"overwrite-{cmd}-user-folder", "`--out` is the user's own folder (no dpldm marker)", cmd,
                lambda w, c=c: c(w, w.mine, "--overwrite"),
                "mine: was not written by dpldm (no .dpldm-output.json); --overwrite only replaces a folder dpldm "
                "wrote"),
            Row(f"overwrite-{cmd}-run-folder", "`--out RUN` where the model read is RUN/model", cmd,
                lambda w, c=c: c(w, w.run, "--overwrite"), "runs/ft: contains the input --checkpoint "),
            Row(f"overwrite-{cmd}-checkpoint-via-run", "`--checkpoint RUN --out RUN/model` (the model read)", cmd,
                lambda w, c=c: c(w, w.model, "--overwrite", checkpoint=w.run),
                "runs/ft/model: is the input --checkpoint "),
            Row(f"overwrite-{cmd}-parent-of-input", "`--out` a folder above the run folder", cmd,
                lambda w, c=c: c(w, w.root / "runs", "--overwrite"), "runs: contains the input --checkpoint "),
            Row(f"overwrite-{cmd}-cwd", "`--out .` inside a folder dpldm wrote of the same kind", cmd,
                lambda w, c=c: c(w, ".", "--overwrite"), "--out .: is the working directory;",
                cwd=same_kind),
            Row(f"overwrite-{cmd}-parent-of-cwd", "`--out ..` from a subfolder of a dpldm folder", cmd,
                lambda w, c=c: c(w, "..", "--overwrite"), "--out ..: is the working directory or a folder above it",
                cwd=lambda w: w.deep),
            Row(f"overwrite-{cmd}-home", "`--out $HOME`", cmd, lambda w, c=c: c(w, w.home, "--overwrite"),
                "home: is $HOME or a folder above it", home=True),
            Row(f"overwrite-{cmd}-other-kind", "`--out` a folder dpldm wrote of another kind", cmd,
                lambda w, c=c, o=other_kind: c(w, o(w), "--overwrite"),
                "folder, not a " + ("diffusers-export" if cmd == "export" else "png-samples")),
            Row(f"overwrite-{cmd}-foreign-file", "`--out` a folder dpldm wrote, to which the user added a file", cmd,
                lambda w, c=c, e=extra: c(w, e(w), "--overwrite"),
                "holds 'notes.md', which dpldm did not write there"),
            Row(f"overwrite-{cmd}-below-a-file", "`--out` below an existing file", cmd,
                lambda w, c=c: c(w, w.root / "afile" / "out"), "afile/out: cannot create it, "),
        ]
    out.append(Row("overwrite-export-dpldm-format-user-folder", "`--format dpldm --out` the user's own folder",
                   "export", lambda w: export(w, w.mine, "--format", "dpldm", "--overwrite"),
                   "mine: was not written by dpldm"))
    # file outputs (grid, npz): never onto a file of an input, and --overwrite replaces only what dpldm sample wrote
    out += [
        Row("overwrite-sample-grid-onto-weights", "grid `--out` the model's own weights (was: a PNG written over "
            "them, exit 0; the next load failed its checksum)", "sample",
            lambda w: grid(w, w.model / "tensors.safetensors", "--overwrite"),
            "tensors.safetensors: is a file of the input --checkpoint "),
        Row("overwrite-sample-grid-onto-run-config", "grid `--out RUN/config.json` with `--checkpoint RUN` (was: "
            "replaced, exit 0)", "sample", lambda w: grid(w, w.run / "config.json", "--overwrite", checkpoint=w.run),
            "runs/ft/config.json: is a file of the input --checkpoint "),
        Row("overwrite-sample-grid-user-file", "grid `--out` a file dpldm did not write (here the run's config.json "
            "with `--checkpoint RUN/model`)", "sample", lambda w: grid(w, w.run / "config.json", "--overwrite"),
            "config.json: exists and was not written by `dpldm sample --format grid`; --overwrite only replaces "
            "an output dpldm sample wrote"),
        Row("overwrite-sample-npz-user-file", "npz `--out` an .npz dpldm did not write", "sample",
            lambda w: grid(w, w.mine / "data.npz", "--format", "npz", "--overwrite"),
            "data.npz: exists and was not written by `dpldm sample --format npz`"),
    ]
    return out


ROWS = rows()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(tmp_path_factory.mktemp("overwrite"))


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_overwrite_refusal(row: Row, world: World, monkeypatch):
    if row.cwd is not None:
        monkeypatch.chdir(row.cwd(world))
    if row.home:
        monkeypatch.setenv("HOME", str(world.home))
    argv = row.argv(world)
    before = tree(world.root)
    code, stderr = run_cli(argv)
    assert "Traceback" not in stderr, stderr[-2000:]
    assert code == 2, (code, stderr)
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ": error: " in ln]
    assert len(errors) == 1 and errors[0] == lines[-1], lines  # ONE error line, last (progress may precede it)
    assert re.match(rf"dpldm {argv[0]}: error: --out ", errors[0]), errors[0]
    assert row.needle in errors[0], errors[0]
    assert tree(world.root) == before  # nothing created, changed, deleted or left behind


def test_every_row_is_documented():
    doc = (REPO / "docs" / "errors.md").read_text()
    assert SECTION in doc
    section = doc[doc.index(SECTION):]
    section = section[:section.find("\n## ", 1) if "\n## " in section[1:] else len(section)]
    missing = [r.id for r in ROWS if f"`{r.id}`" not in section]
    assert not missing, f"rows missing from docs/errors.md ({SECTION}): {missing}"


# -- what --overwrite may replace --------------------------------------------------------------------

def test_marker_names_the_kind_and_every_entry(world: World):
    hub = read_marker(world.prev_hub)
    assert hub["kind"] == "diffusers-export"
    assert set(hub["entries"]) == {p.relative_to(world.prev_hub).as_posix() for p in world.prev_hub.rglob("*")} - {MARKER}
    assert "unet/diffusion_pytorch_model.safetensors" in hub["entries"] and "README.md" in hub["entries"]
    pngs = read_marker(world.prev_png)
    assert pngs["kind"] == "png-samples" and sorted(pngs["entries"]) == ["0", "0/000000.png", "samples.json"]


@pytest.mark.parametrize("cmd", ["export-diffusers", "export-dpldm", "sample"])
def test_overwriting_what_the_same_command_wrote_works_and_is_atomic(cmd, world: World, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = {"export-diffusers": export(world, out), "export-dpldm": export(world, out, "--format", "dpldm"),
             "sample": png(world, out)}[cmd]
    assert run_cli(first)[0] == 0
    kind = read_marker(out)["kind"]
    assert kind == {"export-diffusers": "diffusers-export", "export-dpldm": "dpldm-model", "sample": "png-samples"}[cmd]
    before = tree(out)
    code, err = run_cli(first)  # without --overwrite: refused, unchanged
    assert code == 2 and "already exists; pass --overwrite" in err and tree(out) == before

    # a failure while the replacement is being written leaves the old folder whole and no temporary
    import dpldm.utils.io as io_mod

    real = io_mod.write_marker

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io_mod, "write_marker", boom)
    assert run_cli(first + ["--overwrite"])[0] != 0
    assert tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    monkeypatch.setattr(io_mod, "write_marker", real)

    second = first + ["--overwrite"] + (["--classes", "1"] if cmd == "sample" else ["--no-ema"] if cmd ==
                                        "export-diffusers" else [])
    assert run_cli(second)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # replaced in place, nothing left beside it
    assert read_marker(out)["kind"] == kind
    if cmd == "sample":
        assert sorted(p.name for p in out.iterdir()) == [MARKER, "1", "samples.json"]  # class 1 only now
    elif cmd == "export-diffusers":
        assert json.loads((out / "dpldm.json").read_text())["weights"] == "raw"
    else:
        assert tree(out) == before  # the same model again: byte-identical
    # an empty existing folder holds nothing to lose: filled with --overwrite
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli([a if a != str(out) else str(empty) for a in first] + ["--overwrite"])[0] == 0
    assert read_marker(empty)["kind"] == kind
