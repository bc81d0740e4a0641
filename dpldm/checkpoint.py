"""Checkpoints: tensors in safetensors, everything else (config, step, privacy ledger, RNG
state) in a JSON sidecar inside the same folder, each written atomically.

Layout of one checkpoint folder `step_000123/`:
    tensors.safetensors   model / EMA / optimizer tensors, flat names ("model.x", "ema.x", "opt.x")
    meta.json             {"kind": ..., "step": ..., "config": {...}, ... } -- written LAST
A folder whose meta.json is missing or unreadable is incomplete and is never loaded.
"""
from __future__ import annotations

from dpldm.errors import InputError

import hashlib
import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dpldm.utils.io import FILE_MODE, atomic_path, atomic_write_text, fsync_dir

TENSORS = "tensors.safetensors"
META = "meta.json"
SECRET_FILE_MODE, SECRET_DIR_MODE = 0o600, 0o700  # checkpoints holding a private run's seeds


class CheckpointError(InputError, RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not match what loads it."""


def save_checkpoint(folder: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                    private: bool = False) -> Path:
    """Write `tensors` and `meta` into `folder` atomically (tensors first, meta.json last).

    Modes: the folder and files follow the umask (a released model is as readable as the user's
    other files); `private` (the checkpoint holds secrets) makes them 0700 / 0600 from creation."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mode = SECRET_FILE_MODE if private else FILE_MODE
    if private:
        folder.chmod(SECRET_DIR_MODE)
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(folder / TENSORS, mode) as tmp:
        save_file(flat, str(tmp))
    meta = dict(meta)
    meta["tensors_sha256"] = sha256_file(folder / TENSORS)
    atomic_write_text(folder / META, json.dumps(meta, indent=2, sort_keys=True) + "\n", mode)
    return folder


def load_checkpoint(folder: str | Path, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint folder; raise CheckpointError naming the file when anything is off."""
    folder = Path(folder)
    meta_path, tensor_path = folder / META, folder / TENSORS
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    meta = read_json_object(meta_path, "incomplete checkpoint")
    if not tensor_path.is_file():
        raise CheckpointError(f"{tensor_path}: missing")
    if verify and meta.get("tensors_sha256") and meta["tensors_sha256"] != sha256_file(tensor_path):
        raise CheckpointError(f"{tensor_path}: checksum does not match {meta_path} (corrupt or truncated)")
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{tensor_path}: unreadable safetensors file ({e})") from None
    return tensors, meta


def read_json_object(path: Path, missing: str) -> dict[str, Any]:
    """A JSON object from `path`; CheckpointError naming the file when it is missing (`missing`
    says what that means), not JSON, or not an object."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing ({missing})")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return obj


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in state.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    p = prefix + "."
    return {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}


# -- rotating step checkpoints inside a run folder ---------------------------------------------

def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


_STEP_NAME = re.compile(r"step_(\d{8,})")
_PARTIAL, _DELETING = ".partial", ".deleting"  # suffixes of folders being written / being removed


def checkpoint_step(folder: str | Path) -> int:
    """The step number of a `step_XXXXXXXX` folder (as listed by list_step_checkpoints)."""
    m = _STEP_NAME.fullmatch(Path(folder).name)
    if m is None:
        raise ValueError(f"{folder}: not a step checkpoint folder (step_XXXXXXXX)")
    return int(m.group(1))


def list_step_checkpoints(run_dir: str | Path) -> list[Path]:
    """Step checkpoint folders, oldest first. Folders still being written (`.partial`) or being
    removed (`.deleting`), e.g. left behind by a killed run, are never listed."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)]  # by step number (names grow past 8 digits after step 99,999,999)


def save_step_checkpoint(run_dir: str | Path, step: int, tensors: dict[str, torch.Tensor],
                         meta: dict[str, Any], keep: int = 3, private: bool = False) -> Path:
    """Save `step_XXXXXXXX/` and delete all but the newest `keep` checkpoints.

    Crash safety: the folder is written as `step_XXXXXXXX.partial/` (each file: temporary name,
    fsync, rename, fsync of the folder; meta.json last), renamed into place, and the checkpoints
    folder is fsynced, so a kill at any point leaves either the complete new checkpoint or none
    (plus a `.partial` leftover that is never listed and is removed by the next save). Old
    checkpoints are first renamed to `.deleting` (atomic) and then removed, so a kill during the
    clean-up never leaves a half-deleted folder that looks like a checkpoint.

    `private`: the checkpoint holds secrets (the sampling and diffusion seeds of a DP run): its
    folder is 0700 and its files 0600 from the moment they are created (never readable by others,
    whatever the umask); other checkpoints follow the umask."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an integer >= 1, got {keep!r}")
    folder = step_dir(run_dir, step)
    root = folder.parent
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.iterdir():  # leftovers of a killed run
        if stale.is_dir() and stale.name.endswith((_PARTIAL, _DELETING)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = folder.with_name(folder.name + _PARTIAL)
    save_checkpoint(tmp, tensors, {**meta, "step": step}, private=private)
    if folder.exists():  # the same step again (e.g. after falling back past a corrupt one)
        _remove(folder)
    tmp.rename(folder)
    fsync_dir(root)
    for old in list_step_checkpoints(run_dir)[:-keep]:
        _remove(old)
    return folder


def _remove(folder: Path) -> None:
    """Take a checkpoint out of the listing atomically, then delete it."""
    trash = folder.with_name(folder.name + _DELETING)
    if trash.exists():
        shutil.rmtree(trash, ignore_errors=True)
    folder.rename(trash)
    fsync_dir(folder.parent)
    shutil.rmtree(trash, ignore_errors=True)


def load_latest_checkpoint(run_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path] | None:
    """The newest loadable step checkpoint; a corrupt newest one falls back to the one before,
    with a warning. None when the run has no checkpoint yet."""
    for folder in reversed(list_step_checkpoints(run_dir)):
        try:
            tensors, meta = load_checkpoint(folder)
            return tensors, meta, folder
        except CheckpointError as e:
            warnings.warn(f"skipping unusable checkpoint: {e}", stacklevel=2)
    return None
