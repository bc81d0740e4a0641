"""The bad-input table (docs/errors.md): every malformed input, given to the real CLI, must give a
clear one-line error naming the problem, a non-zero exit code and no partial output.

Most rows call `dpldm.cli.main([...])` in-process (cheap; an exception escaping `main` is what
the interpreter would print as a traceback with exit code 1, and is treated as such); rows marked
`via="subprocess"` run `python -m dpldm ...` for real. A row for a check that does not exist yet
can carry `xfail=<reason>` (strict: it fails as XPASS once fixed, so the marker gets removed)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from dpldm.checkpoint import list_step_checkpoints
from dpldm.cli import main
from dpldm.config import load_config
from dpldm.data.codec import encode_payload, sample_key
from dpldm.data.testing import plant_shard
from dpldm.models.ldm import LatentDiffusion, save_ldm
from cli_harness import run_in_process, tree_hash

REPO = Path(__file__).resolve().parents[1]
MODEL = [
    "autoencoder.base_channels=8", "autoencoder.channel_mult=[1, 2]", "autoencoder.latent_channels=2",
    "unet.in_channels=2", "unet.model_channels=16", "unet.channel_mult=[1, 2]", "unet.attention_levels=[1]",
    "unet.num_heads=2", "unet.context_dim=16", "unet.num_classes=5", "data.image_size=16", "data.num_classes=3",
]
RUN = ["privacy.expected_batch_size=8", "privacy.steps=2", "privacy.noise_multiplier=1.0", "privacy.delta=1e-3",
       "privacy.accountant=\"rdp\"", "privacy.physical_batch_size=4", "train.threads=1", "train.deterministic=true", "train.not_private=true",
       "train.checkpoint_every=1"]
N = 40



class Env:
    """Artifacts shared by the rows, built on first use: a tiny public LDM, a private .npz,
    image and latent shard folders, a second autoencoder, a 3-channel model, a 1-step run."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._n = 0

    def fresh(self, name: str) -> Path:
        self._n += 1
        return self.root / f"{name}_{self._n}"

    @cached_property
    def public(self) -> Path:
        torch.manual_seed(0)
        return save_ldm(self.root / "public", LatentDiffusion(load_config(None, MODEL), scale_factor=0.7))

    @cached_property
    def public_other(self) -> Path:  # same architecture, other weights: another autoencoder
        torch.manual_seed(1)
        return save_ldm(self.root / "public_other", LatentDiffusion(load_config(None, MODEL), scale_factor=0.7))

    @cached_property
    def rgb_model(self) -> Path:  # an autoencoder for 3-channel images
        torch.manual_seed(2)
        cfg = load_config(None, MODEL + ["autoencoder.in_channels=3", "data.channels=3"])
        return save_ldm(self.root / "rgb_model", LatentDiffusion(cfg, scale_factor=0.7))

    def npz(self, name: str, **arrays) -> Path:
        path = self.root / f"{name}.npz"
        np.savez(path, **arrays)
        return path

    @cached_property
    def private(self) -> Path:
        rng = np.random.default_rng(0)
        return self.npz("private", images=rng.integers(0, 256, size=(N, 16, 16), dtype=np.uint8),
                        labels=np.arange(N) % 3)

    @cached_property
    def images(self) -> Path:
        _ok(main(["data", "import", "--source", str(self.private), "--out", str(self.root / "images"),
                  "--shard-size", "20"]))
        return self.root / "images"

    @cached_property
    def latents(self) -> Path:
        _ok(main(["data", "encode", "--shards", str(self.images), "--autoencoder", str(self.public),
                  "--out", str(self.root / "latents")]))
        return self.root / "latents"

    @cached_property
    def latents_other(self) -> Path:
        _ok(main(["data", "encode", "--shards", str(self.images), "--autoencoder", str(self.public_other),
                  "--out", str(self.root / "latents_other")]))
        return self.root / "latents_other"

    def copy(self, src: Path, name: str) -> Path:
        dst = self.fresh(name)
        shutil.copytree(src, dst)
        return dst

    @cached_property
    def one_step_run(self) -> Path:
        out = self.root / "one_step"
        _ok(main(ft(self, out, "--max-steps", "1")))
        assert [p.name for p in list_step_checkpoints(out)] == ["step_00000001"]
        return out


def _ok(code: int) -> None:
    assert code == 0, f"set-up command failed with {code}"


def ft(env: Env, out: Path, *extra: str, sets: tuple[str, ...] = (), private: Path | None = None,
       init: Path | None = None) -> list[str]:
    argv = ["finetune", "--init", str(init or env.public), "--private", str(private or env.private),
            "--out", str(out), "--no-wandb"]
    for s in MODEL + RUN + list(sets):
        argv += ["--set", s]
    return argv + list(extra)


# -- what the rows build --------------------------------------------------------------------------

def _config_file(env: Env, text: str) -> Path:
    path = env.fresh("recipe").with_suffix(".toml")
    path.write_text(text)
    return path


def _image_sample(i: int, cls: bytes | None = None, drop: str | None = None) -> dict:
    rng = np.random.default_rng(i)
    s = {"__key__": sample_key(i), "npy": encode_payload(rng.integers(0, 256, (16, 16), dtype=np.uint8), "npy"),
         "cls": cls if cls is not None else str(i % 3).encode()}
    if drop:
        del s[drop]
    return s


def _planted_images(env: Env, bad: dict) -> Path:
    """The image shards with shard 0 rewritten (consistently indexed) so sample 3 is `bad`."""
    folder = env.copy(env.images, "images_bad")
    samples = [_image_sample(i) for i in range(20)]
    samples[3] = bad
    plant_shard(folder, 0, samples)
    return folder


def _nan_latents(env: Env) -> Path:
    folder = env.copy(env.latents, "latents_nan")
    rng = np.random.default_rng(0)
    samples = []
    for i in range(20):
        z = rng.normal(size=(2, 8, 8)).astype(np.float32)
        z[1, 2, 3] = np.nan  # every example of shard 0, so the first Poisson batch meets one
        samples.append({"__key__": sample_key(i), "npy": encode_payload(z, "npy"), "cls": str(i % 3).encode()})
    plant_shard(folder, 0, samples)
    return folder


def _corrupt_bytes(path: Path) -> None:
    b = bytearray(path.read_bytes())
    b[len(b) // 2: len(b) // 2 + 64] = b"\xff" * 64
    path.write_bytes(bytes(b))


def _truncate(path: Path, keep: float = 0.4) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


# -- the table ------------------------------------------------------------------------------------------

@dataclass
class Row:
    id: str
    what: str
    argv: Callable[[Env, Path], list[str]]  # (env, out) -> argv; `out` is where output must NOT appear
    needle: str  # the one-line error must contain this
    xfail: str | None = None
    via: str = "inprocess"
    clean: str = "absent"  # absent: `out` never created | no-run-output: no model/ nor checkpoints in `out` |
    #                        no-manifest: `out` is not a complete shard folder (restartable progress only)


def _resume_all_corrupt(env: Env, out: Path) -> list[str]:
    shutil.copytree(env.one_step_run, out)
    _truncate(out / "checkpoints" / "step_00000001" / "tensors.safetensors", 0.5)
    return ft(env, out, "--resume")


def _resume_newest_corrupt(env: Env, out: Path) -> list[str]:
    shutil.copytree(env.one_step_run, out)
    newer = out / "checkpoints" / "step_00000002"
    shutil.copytree(out / "checkpoints" / "step_00000001", newer)
    _truncate(newer / "tensors.safetensors", 0.5)  # the newest of two is corrupt, the older one loads
    return ft(env, out, "--resume")


def _resume_changed(env: Env, out: Path) -> list[str]:
    shutil.copytree(env.one_step_run, out)
    return ft(env, out, "--resume", sets=("privacy.max_grad_norm=0.7",))


def _resume_other_data(env: Env, out: Path) -> list[str]:
    shutil.copytree(env.one_step_run, out)
    rng = np.random.default_rng(1)  # the same N = 40, other images
    other = env.npz("other_private", images=rng.integers(0, 256, size=(N, 16, 16), dtype=np.uint8),
                    labels=np.arange(N) % 3)
    return ft(env, out, "--resume", private=other)


def _resume_changed_lr(env: Env, out: Path) -> list[str]:
    shutil.copytree(env.one_step_run, out)
    return ft(env, out, "--resume", sets=("train.lr=0.5",))


def _out_is_a_file(env: Env, out: Path) -> list[str]:
    out.write_text("a user's file\n")
    return ft(env, out)


_HELD_LOCKS: list = []  # kept open for the rest of the session: "another run" holds the folder


def _busy_folder(env: Env, out: Path) -> list[str]:
    from dpldm.train.run_folder import RunFolderLock

    shutil.copytree(env.one_step_run, out)
    _HELD_LOCKS.append(RunFolderLock(out).acquire())
    return ft(env, out, "--resume")


def _corrupt_init(env: Env, out: Path) -> list[str]:
    init = env.copy(env.public, "public_corrupt")
    _truncate(init / "tensors.safetensors", 0.5)
    return ft(env, out, init=init)


def _corrupt_latent_shard(env: Env, out: Path) -> list[str]:
    folder = env.copy(env.latents, "latents_corrupt")
    _corrupt_bytes(folder / "shard-000000.tar")
    return ft(env, out, private=folder)


def _encode(shards: Path, out: Path, ae: Path) -> list[str]:
    return ["data", "encode", "--shards", str(shards), "--autoencoder", str(ae), "--out", str(out)]


def _corrupt_image_shards(env: Env, out: Path) -> list[str]:
    folder = env.copy(env.images, "images_corrupt")
    _corrupt_bytes(folder / "shard-000001.tar")
    return _encode(folder, out, env.public)


def _truncated_image_shards(env: Env, out: Path) -> list[str]:
    folder = env.copy(env.images, "images_trunc")
    _truncate(folder / "shard-000000.tar")
    return _encode(folder, out, env.public)


ROWS = [
    # configs
    Row("config-unknown-key", "config: unknown key `privacy.epsilonn`",
        lambda e, o: ft(e, o, sets=("privacy.epsilonn=3",)), "privacy.epsilonn: unknown key", via="subprocess"),
    Row("config-wrong-type", "config: wrong type `privacy.steps = \"ten\"`",
        lambda e, o: ft(e, o, sets=('privacy.steps="ten"',)), "privacy.steps: expected an integer, got 'ten'"),
    Row("config-bad-value", "config: bad value `privacy.max_grad_norm = -1`",
        lambda e, o: ft(e, o, sets=("privacy.max_grad_norm=-1",)), "privacy.max_grad_norm: must be > 0"),
    Row("config-unknown-section", "config file: unknown section `[privcy]`",
        lambda e, o: ft(e, o, "--config", str(_config_file(e, "[privcy]\nepsilon = 1.0\n"))),
        "unknown section [privcy]"),
    Row("config-not-toml", "config file: not TOML",
        lambda e, o: ft(e, o, "--config", str(_config_file(e, "[privacy\nepsilon = \n"))), "not valid TOML"),
    Row("config-missing-file", "config file does not exist",
        lambda e, o: ft(e, o, "--config", str(e.root / "nope.toml")), "nope.toml: config file not found"),
    Row("config-inconsistent", "config: `unet.in_channels` != `autoencoder.latent_channels`",
        lambda e, o: ft(e, o, sets=("unet.in_channels=3",)), "unet.in_channels: must equal autoencoder.latent_channels"),
    Row("epsilon-zero", "privacy: epsilon <= 0 (`privacy.epsilon = 0`)",
        lambda e, o: ft(e, o, sets=("privacy.epsilon=0",)), "privacy.epsilon: must be > 0"),
    Row("epsilon-negative-audit", "`dpldm audit --epsilon -1`",
        lambda e, o: ["audit", "--epsilon", "-1"], "epsilon must be a finite number > 0"),
    Row("delta-too-large", "privacy: delta >= 1/N (`privacy.delta = 0.05` with N = 40)",
        lambda e, o: ft(e, o, sets=("privacy.delta=0.05",)), "must be < 1/N = 0.025"),
    Row("delta-too-large-privacy-cli", "`dpldm privacy --delta 0.5 --num-examples 10`",
        lambda e, o: ["privacy", "--epsilon", "1", "--delta", "0.5", "--sample-rate", "0.1", "--steps", "10",
                      "--num-examples", "10"], "must be < 1/N = 0.1"),
    Row("private-smaller-than-batch", "private set (N = 40) smaller than `privacy.expected_batch_size = 100`",
        lambda e, o: ft(e, o, sets=("privacy.expected_batch_size=100",)), "expected_batch_size=100 exceeds the N=40"),
    # CLI arguments
    Row("cli-unknown-command", "`dpldm frobnicate`", lambda e, o: ["frobnicate"], "invalid choice: 'frobnicate'"),
    Row("cli-unknown-flag", "`dpldm finetune --bogus`", lambda e, o: ft(e, o, "--bogus"),
        "unrecognized arguments: --bogus"),
    Row("cli-bad-int", "`dpldm finetune --max-steps ten`", lambda e, o: ft(e, o, "--max-steps", "ten"),
        "argument --max-steps: invalid int value: 'ten'"),
    Row("cli-negative-max-steps", "`dpldm finetune --max-steps -1`", lambda e, o: ft(e, o, "--max-steps", "-1"),
        "--max-steps"),
    Row("cli-sample-bad-class", "`dpldm sample --classes 9` for a 5-class model",
        lambda e, o: ["sample", "--checkpoint", str(e.public), "--classes", "9", "--out", str(o)],
        "--classes: [9] outside 0..4"),
    # private data: sources
    Row("npz-missing", "private .npz does not exist", lambda e, o: ft(e, o, private=e.root / "nope.npz"),
        "nope.npz: .npz file not found"),
    Row("npz-missing-labels", "private .npz without a `labels` array",
        lambda e, o: ft(e, o, private=e.npz("nolabels", images=np.zeros((N, 16, 16), np.uint8))),
        "missing array 'labels'"),
    Row("npz-empty", "private .npz with no examples",
        lambda e, o: ft(e, o, private=e.npz("empty", images=np.zeros((0, 16, 16), np.uint8),
                                             labels=np.zeros(0, np.int64))),
        "no examples"),
    Row("npz-nan-import", "NaN pixels in a .npz (`dpldm data import`)",
        lambda e, o: ["data", "import", "--source",
                      str(e.npz("nan", images=np.full((N, 16, 16), np.nan, np.float32), labels=np.arange(N) % 3)),
                      "--out", str(o)], "example 0 has NaN/inf pixels"),
    Row("npz-wrong-image-size", "private images 8x8 for a 16x16 model",
        lambda e, o: ft(e, o, private=e.npz("small", images=np.zeros((N, 8, 8), np.uint8), labels=np.arange(N) % 3)),
        "has images (1, 8, 8), the model expects (1, 16, 16)"),
    Row("npz-label-out-of-range", "private label 6 for a model with 5 classes",
        lambda e, o: ft(e, o, private=e.npz("labels7", images=np.zeros((N, 16, 16), np.uint8),
                                             labels=np.arange(N) % 7)),
        "has label 6 >= the model's 5 classes"),
    # shards
    Row("shard-corrupt-tar", "image shard with overwritten bytes (`dpldm data encode`)", _corrupt_image_shards,
        "shard-000001.tar", clean="no-manifest"),
    Row("shard-truncated-tar", "truncated image shard (`dpldm data encode`)", _truncated_image_shards,
        "truncated", clean="no-manifest"),
    Row("shard-missing-key", "image shard sample without its `.cls` member",
        lambda e, o: _encode(_planted_images(e, _image_sample(3, drop="cls")), o, e.public),
        "[sample '00000003']: missing .cls member", clean="no-manifest"),
    Row("shard-label-out-of-range", "image shard sample with label 7 of 3 classes",
        lambda e, o: _encode(_planted_images(e, _image_sample(3, cls=b"7")), o, e.public),
        "[sample '00000003']: label 7 out of range [0, 3)", clean="no-manifest"),
    Row("shard-corrupt-latents-finetune", "latent shard with overwritten bytes, given to `dpldm finetune`",
        _corrupt_latent_shard, "sha256 differs from the index", clean="no-run-output"),
    Row("shard-nan-latents-finetune", "latent shard samples with a NaN, given to `dpldm finetune`",
        lambda e, o: ft(e, o, private=_nan_latents(e)), "non-finite value(s) (NaN/inf)", clean="no-run-output"),
    # autoencoder / model mismatches
    Row("latents-other-autoencoder", "latent shards encoded by another autoencoder than the LDM's",
        lambda e, o: ft(e, o, private=e.latents_other), "latents were encoded by autoencoder"),
    Row("autoencoder-wrong-channels", "`dpldm data encode` with a 3-channel autoencoder on 1-channel images",
        lambda e, o: _encode(e.images, o, e.rgb_model), "encoder failed on images of shape (20, 1, 16, 16)", clean="no-manifest"),
    Row("image-shards-as-latents", "image shards passed where latents are expected",
        lambda e, o: ft(e, o, private=e.images), "holds images, not latents"),
    Row("recipe-does-not-match-init", "recipe model sections differ from the --init checkpoint",
        lambda e, o: ft(e, o, sets=("unet.model_channels=24", "unet.num_heads=3")),
        "does not match the recipe: unet.model_channels: recipe 24 != checkpoint 16"),
    # checkpoints
    Row("init-missing", "`--init` folder does not exist", lambda e, o: ft(e, o, init=e.root / "nope"),
        "checkpoint folder not found"),
    Row("init-corrupt", "`--init` checkpoint with truncated safetensors", _corrupt_init,
        "checksum does not match"),
    Row("sample-missing-checkpoint", "`dpldm sample --checkpoint` folder does not exist",
        lambda e, o: ["sample", "--checkpoint", str(e.root / "nope"), "--out", str(o)],
        "checkpoint folder not found"),
    Row("resume-all-checkpoints-corrupt", "`--resume` when every step checkpoint is corrupt", _resume_all_corrupt,
        "none of its 1 step checkpoint(s) can be loaded"),
    Row("resume-newest-checkpoint-corrupt", "`--resume` when the newest of several step checkpoints is corrupt",
        _resume_newest_corrupt, "newest checkpoint cannot be loaded"),
    Row("resume-config-changed", "`--resume` with a changed privacy section", _resume_changed,
        "settings that define the run changed (privacy.max_grad_norm: checkpoint 1.0 != now 0.7)"),
    # the one trainer: privacy fails closed, run folders, devices (issues 11, 13)
    Row("deterministic-without-not-private", "`train.deterministic = true` without `--not-private`",
        lambda e, o: ft(e, o, sets=("train.not_private=false",)), "the run is NOT private"),
    Row("sigma-above-target-epsilon", "explicit `privacy.noise_multiplier` spending more than `privacy.epsilon`",
        lambda e, o: ft(e, o, sets=("privacy.noise_multiplier=0.3", "privacy.epsilon=1.0")),
        "above the target privacy.epsilon=1"),
    Row("resume-other-private-data", "`--resume` on other private data of the same N", _resume_other_data,
        "it trained on other private data"),
    Row("resume-changed-lr", "`--resume` with `--set train.lr=...` changed", _resume_changed_lr,
        "train.lr: checkpoint 0.001 != now 0.5"),
    Row("out-is-a-file", "`--out` names an existing file", _out_is_a_file, "exists and is not a folder"),
    Row("run-folder-busy", "`--out` held by another running trainer", _busy_folder, "in use by another dpldm run"),
    Row("device-missing-gpu", "`--device cuda:99` (no such GPU here)", lambda e, o: ft(e, o, "--device", "cuda:99"),
        "cuda:99"),
    Row("device-bad-spec", "`--device gpu`", lambda e, o: ft(e, o, "--device", "gpu"),
        "train.device: expected auto (a CUDA GPU when present, else CPU) | cpu | cuda | cuda:N, got 'gpu'"),
    Row("synthetic-latents-zero", "`--synthetic-latents 0` (would silently train on the real set)",
        lambda e, o: ft(e, o, "--synthetic-latents", "0"), "--synthetic-latents must be >= 1"),
    Row("precision-unknown", "`--precision fp16`", lambda e, o: ft(e, o, "--precision", "fp16"),
        "argument --precision: invalid choice: 'fp16'"),
]


# -- running a row ---------------------------------------------------------------------------------------

def _in_process(argv: list[str]) -> tuple[int, str, str]:
    return run_in_process(main, argv)


def _subprocess(argv: list[str]) -> tuple[int, str, str]:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "dpldm", *argv], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return Env(tmp_path_factory.mktemp("bad_inputs"))


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id, marks=[pytest.mark.xfail(strict=True, reason=r.xfail)]
                                              if r.xfail else []) for r in ROWS])
def test_bad_input(row: Row, env: Env):
    out = env.fresh(f"out_{row.id}")
    argv = row.argv(env, out)
    before = tree_hash(out) if out.exists() else None
    code, stdout, stderr = (_subprocess if row.via == "subprocess" else _in_process)(argv)
    assert code != 0, f"exit code 0 for bad input; stdout tail: {stdout[-500:]}"
    assert "Traceback" not in stderr, stderr[-2000:]
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip() and not ln.startswith(("usage:", "  ", "finetune:"))
             and "Warning" not in ln and "warnings.warn" not in ln]
    assert lines, "no error message"
    found = re.search(r"dpldm[\w -]*: error: .*", lines[-1])  # (a progress line may precede it without a newline)
    assert found, lines[-1]
    msg = found.group(0)
    assert row.needle in msg, msg
    assert code == 2, code
    # no partial output
    if before is not None:  # a run folder prepared by the row: nothing already written is lost or changed
        assert tree_hash(out) == before
        assert not (out / "model").exists()
    elif row.clean == "absent":
        assert not out.exists(), sorted(p.name for p in out.rglob("*"))
    elif row.clean == "no-manifest":
        assert not (out / "manifest.json").exists() and not (out / "index.json").exists()
    else:
        assert not (out / "model").exists() and not list_step_checkpoints(out)


def test_every_row_is_documented():
    doc = (REPO / "docs" / "errors.md").read_text()
    missing = [r.id for r in ROWS if f"`{r.id}`" not in doc]
    assert not missing, f"rows missing from docs/errors.md: {missing}"
    assert len(ROWS) >= 15
