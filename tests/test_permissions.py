"""Released files follow the user's umask; only files holding secrets are 0600 / 0700.

Under umask 022 a released file must be 0644 and a folder 0755 (readable by the group and others,
like any file the user makes); under 077, 0600 / 0700. Released: native model folders
(save_ldm: tensors.safetensors is written by safetensors, which creates 0600 files on its own),
`dpldm export` (diffusers and dpldm formats), `dpldm sample` (grid, npz, png-dir), reports
(atomic_write_text: `dpldm evaluate --json`, the demo's report). Secret: a private run's step
checkpoints (the Poisson and diffusion seeds) are 0700 / 0600 under umask 022 too, from the moment
they are created; a step checkpoint of a public or not-private run follows the umask."""
from __future__ import annotations

import contextlib
import io
import os
import stat
from pathlib import Path

import pytest
import torch

from dpldm.checkpoint import save_step_checkpoint
from dpldm.cli import main
from dpldm.utils.io import atomic_write_text
from tiny_ldm import EXPORTABLE, save_tiny


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def modes(root: Path) -> dict[str, int]:
    """root and every entry below it -> permission bits."""
    return {p.relative_to(root.parent).as_posix(): mode(p) for p in [root, *sorted(root.rglob("*"))]}


def cli(*argv: str) -> int:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return main(list(argv))


@pytest.mark.parametrize("mask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_released_files_follow_the_umask(mask, tmp_path):
    want_file, want_dir = 0o666 & ~mask, 0o777 & ~mask
    with umask(mask):
        model = save_tiny(tmp_path / "model", EXPORTABLE)
        assert cli("export", "--checkpoint", str(model), "--out", str(tmp_path / "hub"), "--device", "cpu") == 0
        assert cli("export", "--checkpoint", str(model), "--format", "dpldm", "--out", str(tmp_path / "native"),
                   "--device", "cpu") == 0
        common = ["sample", "--checkpoint", str(model), "--classes", "0,1", "--per-class", "1", "--steps", "2",
                  "--device", "cpu"]
        assert cli(*common, "--out", str(tmp_path / "grid.png")) == 0
        assert cli(*common, "--format", "npz", "--out", str(tmp_path / "s.npz")) == 0
        assert cli(*common, "--format", "png-dir", "--out", str(tmp_path / "pngs")) == 0
        atomic_write_text(tmp_path / "reports" / "eval.json", "{}\n")  # what evaluate --json and the demo use
    released = {}
    for name in ("model", "hub", "native", "pngs", "reports"):
        released.update(modes(tmp_path / name))
    released.update({n: mode(tmp_path / n) for n in ("grid.png", "s.npz")})
    for must in ("model/tensors.safetensors", "model/meta.json", "model/README.md", "hub/.dpldm-output.json",
                 "hub/unet/diffusion_pytorch_model.safetensors", "hub/README.md", "native/tensors.safetensors",
                 "pngs/0/000000.png", "pngs/samples.json", "reports/eval.json", "grid.png", "s.npz"):
        assert must in released, must
    wrong = {k: oct(v) for k, v in released.items()
             if v != (want_dir if (tmp_path / k).is_dir() else want_file)}
    assert not wrong, f"umask {mask:03o}: expected {want_file:o}/{want_dir:o}, got {wrong}"


@pytest.mark.parametrize("mask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_private_step_checkpoints_stay_secret_other_checkpoints_follow_the_umask(mask, tmp_path):
    tensors = {"w": torch.zeros(3)}
    with umask(mask):
        secret = save_step_checkpoint(tmp_path / "private_run", 1, tensors, {"kind": "x"}, private=True)
        public = save_step_checkpoint(tmp_path / "public_run", 1, tensors, {"kind": "x"}, private=False)
    assert mode(secret) == 0o700 and {mode(f) for f in secret.iterdir()} == {0o600}
    assert sorted(f.name for f in secret.iterdir()) == ["meta.json", "tensors.safetensors"]
    assert mode(public) == 0o777 & ~mask and {mode(f) for f in public.iterdir()} == {0o666 & ~mask}


def test_a_secret_checkpoint_is_never_readable_while_it_is_written(tmp_path, monkeypatch):
    """The folder is 0700 and each file 0600 before any byte of the tensors is written."""
    import dpldm.checkpoint as ck

    seen = []
    real = ck.save_file

    def spy(tensors, path, *a, **k):
        seen.append((mode(Path(path).parent), mode(Path(path))))
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ck, "save_file", spy)
    with umask(0o022):
        save_step_checkpoint(tmp_path / "run", 1, {"w": torch.ones(2)}, {"kind": "x"}, private=True)
    assert seen == [(0o700, 0o600)]
