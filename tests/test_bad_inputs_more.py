"""The bad-input table, part 4 (docs/errors.md, "Every flag and config key (issue 17)"): bad values
for the config keys and the flags of every command (NaN, inf, negative, zero, huge, wrong type,
empty, paths that are folders / files / below a file), models that can only sample NaN (zero or
NaN scale factor, NaN weights, infinite guidance), diffusers folders whose configs dpldm would
otherwise ignore or mis-read, and a WANDB_MODE that cannot work.

Each row runs the real entry point `dpldm.cli.main` in-process and must give exit code 2, ONE line
`dpldm <command>: error: ...` (the last line on stderr) naming the problem, no traceback, and
nothing written or changed: the row's folder (holding the output path and what the row prepared)
hashes the same before and after; rows whose error comes after the trainer opened its run folder
(`clean="no-run-output"`) may leave that folder, but never a model/ or a step checkpoint.
Shared artifacts (tiny models, a diffusers export, small .npz sets) are built once per module."""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from dpldm.checkpoint import list_step_checkpoints
from dpldm.cli import main
from test_bad_inputs import Env, ft
from tiny_ldm import EXPORTABLE, TINY, make_ldm, save_tiny
from cli_harness import run_in_process, tree_hash

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Every flag and config key (issue 17)"


class MoreEnv(Env):
    """test_bad_inputs.Env (a public LDM and a private .npz for `ft`) plus sampling models,
    evaluation sets and a diffusers export."""

    @cached_property
    def tiny(self) -> Path:  # perturbed weights (no zero-initialised output layer), 20 timesteps
        return save_tiny(self.root / "tiny", TINY)

    def tiny_variant(self, name: str, how: Callable[[dict], None]) -> Path:
        """A copy of `tiny` whose meta.json is changed by `how` (the tensors' checksums still hold)."""
        folder = self.root / f"tiny_{name}"
        if not folder.exists():
            shutil.copytree(self.tiny, folder)
            meta = json.loads((folder / "meta.json").read_text())
            how(meta)
            (folder / "meta.json").write_text(json.dumps(meta))  # NaN/Infinity are written as JSON does
        return folder

    def tiny_weights(self, name: str, how: Callable) -> Path:
        """`tiny` saved again after `how(ldm)` changed its weights (a valid checkpoint of bad weights)."""
        folder = self.root / f"tinyw_{name}"
        if not folder.exists():
            from dpldm.models.ldm import save_ldm

            ldm = make_ldm(TINY)
            with torch.no_grad():
                how(ldm)
            save_ldm(folder, ldm)
        return folder

    @cached_property
    def hub(self) -> Path:
        from dpldm.interop.diffusers_folder import export_diffusers
        from dpldm.models.ldm import load_ldm

        return export_diffusers(load_ldm(save_tiny(self.root / "exportable", EXPORTABLE, seed=1)), self.root / "hub")

    def broken_hub(self, name: str, part: str, key: str, value) -> Path:
        """A copy of the diffusers export with `part`'s config key set to `value`."""
        folder = self.root / f"hub_{name}"
        if not folder.exists():
            shutil.copytree(self.hub, folder)
            path = folder / part
            cfg = json.loads(path.read_text())
            cfg[key] = value
            path.write_text(json.dumps(cfg))
        return folder

    @cached_property
    def syn(self) -> Path:  # synthetic samples with labels, as `dpldm sample --format npz` writes them
        rng = np.random.default_rng(3)
        return self.npz("syn", images=rng.integers(0, 256, (30, 16, 16), dtype=np.uint8), labels=np.arange(30) % 3)

    @cached_property
    def real_test(self) -> Path:
        rng = np.random.default_rng(4)
        return self.npz("real_test", images=rng.integers(0, 256, (15, 16, 16), dtype=np.uint8),
                        labels=np.arange(15) % 3)

    @cached_property
    def image_shards(self) -> Path:
        return self.images


def _file(o: Path, name: str = "a_file") -> Path:
    """A user's file beside the output path (the row's folder is hashed: it must stay unchanged)."""
    path = o.parent / name
    path.write_text("the user's file\n")
    return path


def _copy(src: Path, o: Path) -> Path:
    """A copy of a shared input in the row's folder (hashed: an output landing on it would show)."""
    path = o.parent / src.name
    shutil.copyfile(src, path)
    return path


def _labelled(o: Path, name: str, labels: list[int]) -> Path:
    """An .npz of len(labels) 16x16 images in the row's folder, labelled `labels`."""
    path = o.parent / f"{name}.npz"
    np.savez(path, images=np.random.default_rng(5).integers(0, 256, (len(labels), 16, 16), dtype=np.uint8),
             labels=np.array(labels, dtype=np.int64))
    return path


def _config(o: Path, data: bytes) -> Path:
    path = o.parent / "recipe.toml"
    path.write_bytes(data)
    return path


def smp(e: MoreEnv, o: Path, *extra: str, model: Path | None = None, suffix: str = ".png") -> list[str]:
    return ["sample", "--checkpoint", str(model or e.tiny), "--out", str(o.with_suffix(suffix)), "--device", "cpu",
            "--quiet", *extra]


def prv(*extra: str) -> list[str]:
    base = {"--delta": "1e-5", "--sample-rate": "0.01", "--steps": "10"}
    args = list(extra)
    for k, v in base.items():
        if k not in args:
            args += [k, v]
    return ["privacy", *args]


def ev(e: MoreEnv, *extra: str) -> list[str]:
    return ["evaluate", "--samples", str(e.syn), "--real-test", str(e.real_test), "--no-fid", "--quiet",
            "--no-cache", *extra]


def demo(o: Path, *extra: str) -> list[str]:
    return ["demo", "--out", str(o), "--no-wandb", *extra]


def imp(o: Path, *extra: str, source: str = "glyphs") -> list[str]:
    return ["data", "import", "--source", source, "--out", str(o), *extra]


def hub_smp(e: MoreEnv, o: Path, name: str, part: str, key: str, value) -> list[str]:
    return smp(e, o, "--format", "npz", model=e.broken_hub(name, part, key, value), suffix=".npz")


def _drop(argv: list[str], flag: str, values: int = 0) -> list[str]:
    """argv without `flag` (and the `values` arguments after it)."""
    i = argv.index(flag)
    return argv[:i] + argv[i + 1 + values:]


def _nan_weight(ldm) -> None:
    next(ldm.ae.parameters())[0].fill_(float("nan"))


def _inf_ema(ldm) -> None:
    next(ldm.ema.averaged.module.parameters()).view(-1)[0] = float("inf")


@dataclass
class Row:
    id: str
    what: str
    argv: Callable[[MoreEnv, Path], list[str]]  # (env, out) -> argv; `out` lies in the row's own folder
    needle: str
    clean: str = "absent"  # absent: the row's folder is unchanged | no-run-output: see the module doc
    environ: dict = field(default_factory=dict)  # environment variables set for the row (None: unset)


ROWS = [
    # -- config files and --set (every trainer reads them through dpldm.config) --------------------------
    Row("config-not-utf8", "recipe file that is not UTF-8 (was: UnicodeDecodeError traceback)",
        lambda e, o: ft(e, o, "--config", str(_config(o, b"[privacy]\nepsilon = 3 # \xff\xfe\n"))),
        "not UTF-8 text (byte 24: invalid start byte)"),
    Row("config-is-folder", "`--config` names a folder",
        lambda e, o: ft(e, o, "--config", str(o.parent)), "is a folder, not a config file"),
    Row("config-section-not-table", "recipe with `diffusion = 3` instead of a `[diffusion]` table",
        lambda e, o: ft(e, o, "--config", str(_config(o, b"diffusion = 3\n"))), "[diffusion]: expected a table, got int"),
    Row("config-lr-inf", "`train.lr = inf` (was: NaN losses, traceback at step 1)",
        lambda e, o: ft(e, o, sets=("train.lr=inf",)), "train.lr: expected a finite number, got inf"),
    Row("config-lr-nan", "`train.lr = nan`", lambda e, o: ft(e, o, sets=("train.lr=nan",)),
        "train.lr: expected a finite number, got nan"),
    Row("config-lr-huge", "`train.lr = 1e30`", lambda e, o: ft(e, o, sets=("train.lr=1e30",)),
        "train.lr: must lie in (0, 10], got 1e+30"),
    Row("config-weight-decay-product", "`train.weight_decay = 2000` with lr 1e-3 (AdamW flips the weights' sign)",
        lambda e, o: ft(e, o, sets=("train.weight_decay=2000",)),
        "train.lr * train.weight_decay must be < 1"),
    Row("config-epsilon-nan", "`privacy.epsilon = nan`", lambda e, o: ft(e, o, sets=("privacy.epsilon=nan",)),
        "privacy.epsilon: expected a finite number, got nan"),
    Row("config-delta-inf", "`privacy.delta = inf`", lambda e, o: ft(e, o, sets=("privacy.delta=inf",)),
        "privacy.delta: expected a finite number, got inf"),
    Row("config-clip-huge-int", "`privacy.max_grad_norm` an integer beyond float range",
        lambda e, o: ft(e, o, sets=("privacy.max_grad_norm=" + "9" * 400,)),
        "privacy.max_grad_norm: expected a finite number, got an integer of 400 digits (beyond float range)"),
    Row("config-bool-as-int", "`unet.num_heads = true`", lambda e, o: ft(e, o, sets=("unet.num_heads=true",)),
        "unet.num_heads: expected an integer, got True"),
    Row("config-float-as-int", "`privacy.steps = 2.5`", lambda e, o: ft(e, o, sets=("privacy.steps=2.5",)),
        "privacy.steps: expected an integer, got 2.5"),
    Row("config-list-as-int", "`data.image_size = [16]`", lambda e, o: ft(e, o, sets=("data.image_size=[16]",)),
        "data.image_size: expected an integer, got [16]"),
    Row("config-string-as-float", "`privacy.delta = \"small\"`",
        lambda e, o: ft(e, o, sets=('privacy.delta="small"',)), "privacy.delta: expected a number, got 'small'"),
    Row("config-int-as-list", "`unet.channel_mult = 2`", lambda e, o: ft(e, o, sets=("unet.channel_mult=2",)),
        "unet.channel_mult: expected a list, got 2"),
    Row("config-attention-out-of-range", "`train.finetune = \"attention:99-100\"` (was: ValueError traceback)",
        lambda e, o: ft(e, o, sets=('train.finetune="attention:99-100"',)),
        "range 99-100 lies outside 1..4 (this UNet has 4 attention modules)"),
    Row("config-attention-reversed", "`train.finetune = \"attention:5-2\"` (was: ValueError traceback)",
        lambda e, o: ft(e, o, sets=('train.finetune="attention:5-2"',)), "train.finetune: finetune spec "
        "'attention:5-2': empty range 5-2"),
    Row("config-attention-empty", "`train.finetune = \"attention:\"`",
        lambda e, o: ft(e, o, sets=('train.finetune="attention:"',)), "no module numbers after 'attention:'"),
    Row("config-attention-negative", "`train.finetune = \"attention:-1\"`",
        lambda e, o: ft(e, o, sets=('train.finetune="attention:-1"',)), "'-1' is not a module number or a range A-B"),
    Row("config-attention-zero", "`train.finetune = \"attention:0-2\"`",
        lambda e, o: ft(e, o, sets=('train.finetune="attention:0-2"',)), "module numbers start at 1, got 0"),
    Row("config-attention-words", "`train.finetune = \"attention:a-b\"`",
        lambda e, o: ft(e, o, sets=('train.finetune="attention:a-b"',)), "'a-b' is not a module number"),
    Row("config-finetune-unknown", "`train.finetune = \"everything\"`",
        lambda e, o: ft(e, o, sets=('train.finetune="everything"',)),
        "train.finetune: expected all | attention:all | attention:A-B[,C,...]"),
    Row("config-set-no-section", "`--set lr=1`", lambda e, o: ft(e, o, "--set", "lr=1"),
        "--set 'lr=1': expected section.key=value"),
    Row("config-set-empty-key", "`--set privacy.=3`", lambda e, o: ft(e, o, "--set", "privacy.=3"),
        "--set 'privacy.=3': expected section.key=value"),
    Row("config-set-two-values", "`--set` value with a newline smuggling a second key",
        lambda e, o: ft(e, o, "--set", "privacy.steps=2\nepsilon = 1"),
        "the value must be one TOML value on one line"),
    Row("config-timesteps-huge", "`diffusion.timesteps = 10**12`",
        lambda e, o: ft(e, o, sets=("diffusion.timesteps=1000000000000",)),
        "diffusion.timesteps: must lie in [2, 100000], got 1000000000000"),
    Row("config-width-huge", "`unet.model_channels = 2**30`",
        lambda e, o: ft(e, o, sets=("unet.model_channels=1073741824",)),
        "unet.channel_mult: widths model_channels * mult must be <= 8192"),
    Row("config-channel-mult-zero", "`unet.channel_mult = [1, 0]`",
        lambda e, o: ft(e, o, sets=("unet.channel_mult=[1, 0]",)), "unet.channel_mult: entries must be positive"),
    Row("config-too-many-levels", "`unet.channel_mult` with 9 levels",
        lambda e, o: ft(e, o, sets=("unet.channel_mult=[1,1,1,1,1,1,1,1,1]",)),
        "unet.channel_mult: must have 1..8 entries, got 9"),
    Row("config-image-size-huge", "`data.image_size = 2**20`",
        lambda e, o: ft(e, o, sets=("data.image_size=1048576",)), "data.image_size: must be a multiple of 8 in [8, 8192]"),
    Row("config-num-classes-huge", "`unet.num_classes = 10**12` (an embedding table of 10**12 rows)",
        lambda e, o: ft(e, o, sets=("unet.num_classes=1000000000000",)),
        "unet.num_classes: must lie in [1, 1000000], got 1000000000000"),
    Row("config-eta-above-one", "`diffusion.eta = 2`", lambda e, o: ft(e, o, sets=("diffusion.eta=2",)),
        "diffusion.eta: must lie in [0, 1], got 2.0"),
    Row("config-guidance-inf", "`diffusion.guidance_scale = inf` (black samples)",
        lambda e, o: ft(e, o, sets=("diffusion.guidance_scale=inf",)),
        "diffusion.guidance_scale: expected a finite number, got inf"),
    Row("config-threads-huge", "`train.threads = 100000`", lambda e, o: ft(e, o, sets=("train.threads=100000",)),
        "train.threads: must lie in [0, 4096]"),
    Row("config-out-dir-empty", "`train.out_dir = \"\"` (would be the working directory)",
        lambda e, o: _drop(ft(e, o, sets=('train.out_dir=""',)), "--out", 1),
        "train.out_dir: must name a run folder, got ''"),
    Row("config-private-empty", "`data.private = \"\"`",
        lambda e, o: _drop(ft(e, o), "--private", 1) + ["--set", 'data.private=""'],
        "data.private: must name a source or a shard folder, got ''"),
    Row("config-steps-huge", "`privacy.steps = 10**12`", lambda e, o: ft(e, o, sets=("privacy.steps=1000000000000",)),
        "privacy.steps: must lie in [1, 1000000000]"),
    Row("config-seed-negative", "`train.seed = -1`", lambda e, o: ft(e, o, sets=("train.seed=-1",)),
        "train.seed: must lie in [0, 2**63), got -1"),
    Row("config-workers-huge", "`data.num_workers = 10**6`", lambda e, o: ft(e, o, sets=("data.num_workers=1000000",)),
        "data.num_workers: must lie in [0, 1024]"),
    Row("config-warmup-huge", "`train.warmup_steps = 10**12`",
        lambda e, o: ft(e, o, sets=("train.warmup_steps=1000000000000",)), "train.warmup_steps: must lie in [0, 1000000000]"),
    Row("config-lr-decay-unknown", "`train.lr_decay = \"linear\"`",
        lambda e, o: ft(e, o, sets=("train.lr_decay=linear",)), "train.lr_decay: must be constant|cosine, got 'linear'"),
    Row("config-dropout-one", "`unet.dropout = 1`", lambda e, o: ft(e, o, sets=("unet.dropout=1",)),
        "unet.dropout: must lie in [0, 1)"),
    Row("config-heads-huge", "`unet.num_heads = 1000`", lambda e, o: ft(e, o, sets=("unet.num_heads=1000",)),
        "unet.num_heads: must lie in [1, 64], got 1000"),
    # -- dpldm sample --------------------------------------------------------------------------------------
    Row("sample-seed-2-32", "`--seed 2**32` (was: OverflowError traceback)", lambda e, o: smp(e, o, "--seed", str(2**32)),
        "--seed must lie in [0, 2**32 - 1 = 4294967295]"),
    Row("sample-seed-negative", "`--seed -1`", lambda e, o: smp(e, o, "--seed", "-1"), "--seed must be >= 0, got -1"),
    Row("sample-per-class-huge", "`--per-class 10**11` (was: 2.4 TB allocation, traceback)",
        lambda e, o: smp(e, o, "--per-class", str(10**11)), "at most 1,000,000 samples per call"),
    Row("sample-n-huge", "`--n 10**23` (was: OverflowError traceback)", lambda e, o: smp(e, o, "--n", str(10**23)),
        "at most 1,000,000 samples per call"),
    Row("sample-total-too-many", "3 classes x `--per-class 400000`",
        lambda e, o: smp(e, o, "--per-class", "400000", "--classes", "0,1,2"),
        "1,200,000 samples requested: at most 1,000,000 per call"),
    Row("sample-upscale-huge", "`--upscale 100000` (was: hung building the PNG)",
        lambda e, o: smp(e, o, "--upscale", "100000"), "the grid PNG would be 14,600,000x5,600,000 pixels"),
    Row("sample-upscale-zero", "`--upscale 0`", lambda e, o: smp(e, o, "--upscale", "0"), "--upscale must be >= 1, got 0"),
    Row("sample-batch-size-zero", "`--batch-size 0`", lambda e, o: smp(e, o, "--batch-size", "0"),
        "--batch-size must be >= 1, got 0"),
    Row("sample-threads-huge", "`--threads 100000`", lambda e, o: smp(e, o, "--threads", "100000"),
        "--threads must lie in [0, 4096]"),
    Row("sample-out-below-file", "grid `--out` below a file (was: FileExistsError traceback)",
        lambda e, o: ["sample", "--checkpoint", str(e.tiny), "--out", str(_file(o) / "g.png"), "--quiet"],
        "cannot create it, "),
    Row("sample-npz-below-file", "npz `--out` below a file",
        lambda e, o: ["sample", "--checkpoint", str(e.tiny), "--format", "npz", "--out", str(_file(o) / "x" / "s.npz")],
        "a_file is a file"),
    Row("sample-out-empty", "`--out ''`", lambda e, o: ["sample", "--checkpoint", str(e.tiny), "--out", ""],
        "--out: empty path"),
    Row("sample-checkpoint-empty", "`--checkpoint ''`", lambda e, o: ["sample", "--checkpoint", "", "--out", str(o)],
        "--checkpoint: empty path"),
    Row("sample-checkpoint-is-file", "`--checkpoint` a file",
        lambda e, o: smp(e, o, model=_file(o)), "checkpoint folder not found"),
    Row("sample-guidance-huge", "`--guidance 1e30`: samples come out NaN (was: black PNG, exit 0)",
        lambda e, o: smp(e, o, "--guidance", "1e30", "--steps", "1"), "came out NaN/inf (guidance 1e+30, ddim); "
        "nothing was written"),
    Row("sample-guidance-inf", "`--guidance inf`", lambda e, o: smp(e, o, "--guidance", "inf"),
        "--guidance must be a finite number, got inf"),
    Row("sample-scale-factor-zero", "model with `scale_factor` 0 (was: black images, exit 0)",
        lambda e, o: smp(e, o, model=e.tiny_variant("sf0", lambda m: m.update(scale_factor=0.0))),
        "latent scale_factor must be a finite number > 0, got 0.0"),
    Row("sample-scale-factor-negative", "model with `scale_factor` -1",
        lambda e, o: smp(e, o, model=e.tiny_variant("sfneg", lambda m: m.update(scale_factor=-1.0))),
        "latent scale_factor must be a finite number > 0, got -1.0"),
    Row("sample-scale-factor-nan", "model with `scale_factor` NaN",
        lambda e, o: smp(e, o, model=e.tiny_variant("sfnan", lambda m: m.update(scale_factor=float("nan")))),
        "latent scale_factor must be a finite number > 0, got nan"),
    Row("sample-model-guidance-inf", "model whose config has `diffusion.guidance_scale` Infinity",
        lambda e, o: smp(e, o, model=e.tiny_variant("ginf", lambda m: m["config"]["diffusion"].update(
            guidance_scale=float("inf")))), "diffusion.guidance_scale: expected a finite number, got inf"),
    Row("sample-nan-weights", "model with NaN autoencoder weights (was: black images, exit 0)",
        lambda e, o: smp(e, o, model=e.tiny_weights("nan", _nan_weight)),
        "weight ae.encoder.conv_in.weight has 9 NaN/inf value(s)"),
    Row("sample-inf-ema-weights", "model with an inf in the EMA UNet",
        lambda e, o: smp(e, o, model=e.tiny_weights("inf", _inf_ema)), "has 1 NaN/inf value(s)"),
    Row("finetune-init-nan-weights", "`finetune --init` a model with NaN weights (was: trained on, exit 0)",
        lambda e, o: ft(e, o, init=e.tiny_weights("nan", _nan_weight)),
        "weight ae.encoder.conv_in.weight has 9 NaN/inf value(s)"),
    Row("finetune-init-scale-factor-zero", "`finetune --init` a model with `scale_factor` 0",
        lambda e, o: ft(e, o, init=e.tiny_variant("sf0", lambda m: m.update(scale_factor=0.0))),
        "latent scale_factor must be a finite number > 0, got 0.0"),
    Row("export-nan-weights", "`export` a model with an inf in the EMA UNet (was: exported, exit 0)",
        lambda e, o: ["export", "--checkpoint", str(e.tiny_weights("inf", _inf_ema)), "--format", "dpldm",
                      "--out", str(o)], "has 1 NaN/inf value(s)"),
    Row("finetune-init-empty", "`finetune --init ''` (was: the shipped public model, silently)",
        lambda e, o: ft(e, o)[:1] + ["--init", ""] + ft(e, o)[3:], "--init: empty path"),
    Row("finetune-synthetic-latents-huge", "`finetune --synthetic-latents 10**11` (was: out-of-memory traceback)",
        lambda e, o: ft(e, o, "--synthetic-latents", str(10**11)), "at most 1,000,000"),
    Row("export-checkpoint-empty", "`export --checkpoint ''` (was: 'meta.json: missing' in the cwd)",
        lambda e, o: ["export", "--checkpoint", "", "--format", "dpldm", "--out", str(o)],
        "empty path given for a model folder"),
    Row("pretrain-ldm-autoencoder-empty", "`pretrain-ldm --autoencoder ''`",
        lambda e, o: ["pretrain-ldm", "--autoencoder", "", "--out", str(o)], "empty path given for a model folder"),
    Row("sample-classes-empty", "`--classes ,`", lambda e, o: smp(e, o, "--classes", ","), "--classes: no classes given"),
    Row("sample-classes-words", "`--classes a,b`", lambda e, o: smp(e, o, "--classes", "a,b"),
        "--classes 'a,b': expected comma-separated integers"),
    Row("sample-ddpm-steps", "`--sampler ddpm --steps 5`", lambda e, o: smp(e, o, "--sampler", "ddpm", "--steps", "5"),
        "--sampler ddpm always runs all 20 steps"),
    # -- dpldm privacy ------------------------------------------------------------------------------------
    Row("privacy-sigma-huge", "`--noise-multiplier 1e300` (was: OverflowError traceback)",
        lambda e, o: prv("--noise-multiplier", "1e300"), "noise multiplier sigma must be <= 1e+06"),
    Row("privacy-sigma-tiny-rdp", "`--noise-multiplier 1e-300 --accountant rdp` (was: ZeroDivisionError)",
        lambda e, o: prv("--noise-multiplier", "1e-300", "--accountant", "rdp"),
        "RDP accountant cannot evaluate sigma=1e-300, q=0.01, 10 steps, delta=1e-05 (numerical ZeroDivisionError"),
    Row("privacy-sigma-tiny-prv", "`--noise-multiplier 1e-300` (PRV)", lambda e, o: prv("--noise-multiplier", "1e-300"),
        "PRV accountant cannot size its grid for sigma=1e-300"),
    Row("privacy-max-grid-huge", "`--max-grid-points 2**62` (would allocate past memory)",
        lambda e, o: prv("--noise-multiplier", "0.01", "--max-grid-points", str(2**62)),
        "a PRV grid that large needs up to 7.73e+11 GiB"),
    Row("privacy-max-grid-one", "`--max-grid-points 1`", lambda e, o: prv("--noise-multiplier", "1", "--max-grid-points", "1"),
        "--max-grid-points must be >= 2, got 1"),
    Row("privacy-epsilon-inf", "`--epsilon inf`", lambda e, o: prv("--epsilon", "inf"),
        "epsilon must be a finite number > 0, got inf"),
    Row("privacy-delta-nan", "`--delta nan`", lambda e, o: prv("--noise-multiplier", "1", "--delta", "nan"),
        "delta must lie in (0, 1), got nan"),
    Row("privacy-sample-rate-zero", "`--sample-rate 0`", lambda e, o: prv("--noise-multiplier", "1", "--sample-rate", "0"),
        "sample rate q must lie in (0, 1], got 0.0"),
    Row("privacy-sample-rate-above-one", "`--sample-rate 1.5`",
        lambda e, o: prv("--noise-multiplier", "1", "--sample-rate", "1.5"), "sample rate q must lie in (0, 1], got 1.5"),
    Row("privacy-num-examples-zero", "`--num-examples 0`",
        lambda e, o: prv("--noise-multiplier", "1", "--num-examples", "0"), "--num-examples must be >= 1, got 0"),
    Row("privacy-epsilon-and-sigma", "both `--epsilon` and `--noise-multiplier`",
        lambda e, o: prv("--epsilon", "1", "--noise-multiplier", "1"),
        "argument --noise-multiplier: not allowed with argument --epsilon"),
    Row("privacy-time-limit-nan", "`--time-limit nan`", lambda e, o: prv("--epsilon", "3", "--time-limit", "nan"),
        "--time-limit must be a finite number of seconds > 0, got nan"),
    Row("audit-seed-negative", "`dpldm audit --seed -1` (was: ValueError traceback)",
        lambda e, o: ["audit", "--seed", "-1"], "--seed must lie in [0, 2**63), got -1"),
    # -- dpldm data ----------------------------------------------------------------------------------------
    Row("data-import-num-negative", "`data import --num -3` (was: ValueError traceback)",
        lambda e, o: imp(o, "--num", "-3"), "--num must lie in [1, 10,000,000] (glyphs to render), got -3"),
    Row("data-import-num-huge", "`data import --num 10**14` (was: 728 TiB allocation, traceback)",
        lambda e, o: imp(o, "--num", str(10**14)), "--num must lie in [1, 10,000,000]"),
    Row("data-import-num-not-glyphs", "`--num` with an .npz source (was: silently ignored)",
        lambda e, o: imp(o, "--num", "10", source=str(e.private)), "--num applies to --source glyphs only"),
    Row("data-import-seed-negative", "`data import --seed -1` (was: ValueError traceback)",
        lambda e, o: imp(o, "--num", "10", "--seed", "-1"), "--seed must lie in [0, 2**63 - 1), got -1"),
    Row("data-import-seed-not-glyphs", "`--seed` with an .npz source (was: silently ignored)",
        lambda e, o: imp(o, "--seed", "3", source=str(e.private)), "--seed applies to --source glyphs only"),
    Row("data-import-source-empty", "`data import --source ''`", lambda e, o: imp(o, source=""), "--source: empty path"),
    Row("data-import-out-empty", "`data import --out ''`", lambda e, o: ["data", "import", "--source", "glyphs", "--out", ""],
        "--out: empty path"),
    Row("data-import-shard-size-zero", "`data import --shard-size 0`", lambda e, o: imp(o, "--num", "5", "--shard-size", "0"),
        "--shard-size must be >= 1, got 0"),
    Row("data-inspect-per-class-negative", "`data inspect --per-class -1` (was: ValueError traceback)",
        lambda e, o: ["data", "inspect", str(e.images), "--per-class", "-1", "--grid", str(o.with_suffix(".png"))],
        "--per-class must lie in [1, 1000] (grid examples per class), got -1"),
    Row("data-inspect-per-class-huge", "`data inspect --per-class 10**11`",
        lambda e, o: ["data", "inspect", str(e.images), "--per-class", str(10**11), "--grid", str(o.with_suffix(".png"))],
        "--per-class must lie in [1, 1000]"),
    Row("data-inspect-grid-empty", "`data inspect --grid ''` (was: silently the default path)",
        lambda e, o: ["data", "inspect", str(e.images), "--grid", ""], "--grid: empty path"),
    Row("data-encode-batch-size-zero", "`data encode --batch-size 0`",
        lambda e, o: ["data", "encode", "--shards", str(e.images), "--autoencoder", str(e.public), "--out", str(o),
                      "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    Row("data-encode-autoencoder-empty", "`data encode --autoencoder ''`",
        lambda e, o: ["data", "encode", "--shards", str(e.images), "--autoencoder", "", "--out", str(o)],
        "--autoencoder: empty path"),
    # -- dpldm evaluate -----------------------------------------------------------------------------------
    Row("evaluate-json-is-folder", "`--json DIR` (was: traceback after the whole evaluation, result lost)",
        lambda e, o: ev(e, "--json", str(o.parent)), "is a folder; give a file name"),
    Row("evaluate-json-below-file", "`--json` below a file (was: traceback after the evaluation)",
        lambda e, o: ev(e, "--json", str(_file(o) / "r.json")), "cannot create it, "),
    Row("evaluate-seed-negative", "`--seed -1` (was: ValueError traceback)", lambda e, o: ev(e, "--seed", "-1"),
        "--seed must lie in [0, 4294967295], got -1"),
    Row("evaluate-batch-size-zero", "`--batch-size 0` (was: accepted)", lambda e, o: ev(e, "--batch-size", "0"),
        "--batch-size must be >= 1, got 0"),
    Row("evaluate-kid-subsets-zero", "`--kid-subsets 0` (was: found after Inception ran)",
        lambda e, o: ev(e, "--kid-subsets", "0"), "--kid-subsets must lie in [1, 100000], got 0"),
    Row("evaluate-kid-subset-size-one", "`--kid-subset-size 1`", lambda e, o: ev(e, "--kid-subset-size", "1"),
        "--kid-subset-size must be >= 2, got 1"),
    Row("evaluate-num-classes-zero", "`--num-classes 0`", lambda e, o: ev(e, "--num-classes", "0"),
        "--num-classes must lie in [1, 1000], got 0"),
    Row("evaluate-epochs-huge", "`--classifier-epochs 10**9` (would run for days)",
        lambda e, o: ev(e, "--classifier-epochs", str(10**9)), "--classifier-epochs must lie in [1, 10000]"),
    Row("evaluate-fid-samples-one", "`--fid-samples 1`",
        lambda e, o: ["evaluate", "--samples", str(e.syn), "--real", str(e.syn), "--fid-samples", "1"],
        "--fid-samples must be >= 2, got 1"),
    Row("evaluate-device-bad", "`--device cudaX` (was: passed the check, failed in torch)",
        lambda e, o: ["evaluate", "--samples", str(e.syn), "--real", str(e.syn), "--device", "cudaX"],
        "--device: expected auto (a CUDA GPU when present, else CPU) | cpu | cuda | cuda:N, got 'cudaX'"),
    Row("evaluate-cache-dir-file", "`--cache-dir` a file",
        lambda e, o: ["evaluate", "--samples", str(e.syn), "--real", str(e.syn), "--cache-dir", str(_file(o))],
        "is a file"),
    Row("evaluate-samples-empty", "`--samples ''`", lambda e, o: ["evaluate", "--samples", "", "--no-fid",
                                                                 "--real-test", str(e.real_test)], "--samples: empty path"),
    Row("evaluate-samples-text", "`--samples` a text file",
        lambda e, o: ["evaluate", "--samples", str(_file(o, "notes.txt")), "--no-fid", "--real-test", str(e.real_test)],
        "is neither an .npz file nor a folder of PNGs"),
    Row("evaluate-json-is-samples", "`--json` the `--samples` file (was: overwritten with the JSON, exit 0)",
        lambda e, o: ["evaluate", "--samples", str(_copy(e.syn, o)), "--real-test", str(e.real_test), "--no-fid",
                      "--quiet", "--no-cache", "--json", str(o.parent / e.syn.name)],
        "syn.npz: is the input --samples "),
    Row("evaluate-json-is-real-test", "`--json` the `--real-test` file (was: overwritten, exit 0)",
        lambda e, o: ["evaluate", "--samples", str(e.syn), "--real-test", str(_copy(e.real_test, o)), "--no-fid",
                      "--quiet", "--no-cache", "--json", str(o.parent / e.real_test.name)],
        "real_test.npz: is the input --real-test "),
    Row("evaluate-json-is-real", "`--json` the `--real` file (was: overwritten, exit 0)",
        lambda e, o: ev(e, "--real", str(_copy(e.syn, o)), "--json", str(o.parent / e.syn.name)),
        "syn.npz: is the input --real "),
    Row("evaluate-json-foreign-file", "`--json` an existing file that is not a report of `dpldm evaluate` (was: "
        "replaced, exit 0)", lambda e, o: ev(e, "--json", str(_file(o, "notes.json"))),
        "notes.json: exists and is not a report `dpldm evaluate` wrote; refusing to replace it"),
    Row("evaluate-labels-huge", "labels {0, 10**6, 2*10**6} (was: hung building a 2,000,001-class CNN)",
        lambda e, o: ["evaluate", "--samples", str(_labelled(o, "big", [0, 10**6, 2 * 10**6] * 10)), "--real-test",
                      str(e.real_test), "--no-fid", "--quiet", "--no-cache"],
        "big.npz): label 2000000 out of range: labels must lie in [0, 1,000)"),
    Row("evaluate-label-2-62", "a label 2**62 (was: traceback)",
        lambda e, o: ["evaluate", "--samples", str(e.syn), "--real-test", str(_labelled(o, "huge", [0, 1, 2**62])),
                      "--no-fid", "--quiet", "--no-cache"],
        "huge.npz): label 4611686018427387904 out of range: labels must lie in [0, 1,000)"),
    Row("evaluate-num-classes-huge", "`--num-classes 10**6`", lambda e, o: ev(e, "--num-classes", str(10**6)),
        "--num-classes must lie in [1, 1000], got 1000000"),
    # -- dpldm demo: every flag before the privacy-spending fine-tuning ------------------------------------
    Row("demo-samples-per-class-zero", "`demo --samples-per-class 0` (was: checked after the budget was spent)",
        lambda e, o: demo(o, "--samples-per-class", "0"), "--samples-per-class must lie in [1, 1,000,000], got 0"),
    Row("demo-samples-total-huge", "`demo --samples-per-class 500000` (10 classes)",
        lambda e, o: demo(o, "--samples-per-class", "500000"), "x 10 classes = 5,000,000 samples"),
    Row("demo-fid-samples-zero", "`demo --fid-samples 0`", lambda e, o: demo(o, "--fid-samples", "0"),
        "--fid-samples must be >= 2 (or pass --no-fid), got 0"),
    Row("demo-out-below-file", "`demo --out` below a file", lambda e, o: demo(_file(o) / "run"),
        "cannot use it as the run folder, "),
    # -- diffusers folders (dpldm sample / finetune --init read them) -------------------------------------
    Row("import-scaling-factor-zero", "vae `scaling_factor` 0 (was: black images, exit 0)",
        lambda e, o: hub_smp(e, o, "sf0", "vae/config.json", "scaling_factor", 0),
        "scaling_factor must be a finite number > 0 (decoding divides the latents by it), got 0"),
    Row("import-scaling-factor-nan", "vae `scaling_factor` NaN",
        lambda e, o: hub_smp(e, o, "sfnan", "vae/config.json", "scaling_factor", float("nan")),
        "scaling_factor must be a finite number > 0"),
    Row("import-scaling-factor-string", "vae `scaling_factor` \"x\" (was: ValueError traceback)",
        lambda e, o: hub_smp(e, o, "sfstr", "vae/config.json", "scaling_factor", "x"),
        "scaling_factor must be a finite number > 0 (decoding divides the latents by it), got 'x'"),
    Row("import-sample-size-null", "vae `sample_size` null (was: TypeError traceback)",
        lambda e, o: hub_smp(e, o, "ssnull", "vae/config.json", "sample_size", None),
        "sample_size must be an integer (the image size), got None"),
    Row("import-in-channels-bool", "vae `in_channels` true (was: TypeError traceback)",
        lambda e, o: hub_smp(e, o, "inbool", "vae/config.json", "in_channels", True),
        "autoencoder.in_channels: expected an integer, got True"),
    Row("import-block-channels-empty", "unet `block_out_channels` [] (was: IndexError traceback)",
        lambda e, o: hub_smp(e, o, "bocempty", "unet/config.json", "block_out_channels", []),
        "cannot be read as dpldm's UNet"),
    Row("import-norm-groups-mismatch", "unet `norm_num_groups` 16 (was: ignored, another model sampled)",
        lambda e, o: hub_smp(e, o, "groups", "unet/config.json", "norm_num_groups", 16),
        "norm_num_groups: 16, but the weights' architecture needs 32"),
    Row("import-conv-kernel", "unet `conv_in_kernel` 5 (was: ignored)",
        lambda e, o: hub_smp(e, o, "kernel", "unet/config.json", "conv_in_kernel", 5),
        "conv_in_kernel: 5, but the weights' architecture needs 3"),
    Row("import-vae-block-types", "vae `down_block_types` of another block (was: ignored)",
        lambda e, o: hub_smp(e, o, "vblocks", "vae/config.json", "down_block_types", ["x", "y"]),
        "down_block_types: ['x', 'y'], but the weights' architecture needs"),
    Row("import-scheduler-flag", "scheduler `thresholding` true (was: ignored)",
        lambda e, o: hub_smp(e, o, "thresh", "scheduler/scheduler_config.json", "thresholding", True),
        "thresholding: True, but the weights' architecture needs False"),
    Row("import-embedder-config", "class_embedder/config.json `num_classes` 7 for a 6-row table",
        lambda e, o: hub_smp(e, o, "embcfg", "class_embedder/config.json", "num_classes", 7),
        "num_classes: 7, but the weights' architecture needs 5"),
    # -- wandb --------------------------------------------------------------------------------------------
    Row("wandb-online-no-key", "`WANDB_MODE=online` without an API key (was: wandb's UsageError traceback after the run was set up)",
        lambda e, o: _drop(ft(e, o), "--no-wandb"),
        "WANDB_MODE=online but no W&B API key is set", clean="no-run-output",
        environ={"WANDB_MODE": "online", "WANDB_API_KEY": None, "WANDB_IDENTITY_TOKEN_FILE": None}),
    Row("wandb-mode-unknown", "`WANDB_MODE=bogus`", lambda e, o: _drop(ft(e, o), "--no-wandb"),
        "WANDB_MODE='bogus': expected one of online, offline, disabled", clean="no-run-output",
        environ={"WANDB_MODE": "bogus"}),
]


# -- running a row ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return MoreEnv(tmp_path_factory.mktemp("bad_inputs_more"))


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row: Row, env: MoreEnv, tmp_path: Path, monkeypatch):
    case = tmp_path / "case"
    case.mkdir()
    out = case / "out"
    for k, v in row.environ.items():
        if v is None:
            monkeypatch.delenv(k, raising=False)
        else:
            monkeypatch.setenv(k, v)
    if row.environ:
        monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))  # no `wandb login` key either
        monkeypatch.setenv("HOME", str(tmp_path))
    argv = row.argv(env, out)
    before = {p.name: tree_hash(p) for p in case.iterdir()}
    code, _stdout, stderr = run_in_process(main, argv)
    assert "Traceback" not in stderr, stderr[-3000:]
    assert code == 2, (code, stderr[-2000:])
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ": error: " in ln]
    assert len(errors) == 1 and errors[0] == lines[-1], lines[-5:]  # ONE error line, last
    assert re.match(r"dpldm[\w -]*: error: ", errors[0]), errors[0]
    assert row.needle in errors[0], errors[0]
    after = {p.name: tree_hash(p) for p in case.iterdir()}
    if row.clean == "no-run-output":
        if out.exists():
            assert not (out / "model").exists() and not list_step_checkpoints(out)
        before.pop("out", None), after.pop("out", None)
    assert after == before  # nothing created, changed or left behind


def test_every_row_is_documented():
    doc = (REPO / "docs" / "errors.md").read_text()
    assert SECTION in doc
    section = doc[doc.index(SECTION):]
    missing = [r.id for r in ROWS if f"`{r.id}`" not in section]
    assert not missing, f"rows missing from docs/errors.md ({SECTION}): {missing}"
    assert len({r.id for r in ROWS}) == len(ROWS)


def test_the_tables_hold_at_least_200_rows():
    """This file's rows and those of tests/test_bad_inputs.py, _cli.py and _data.py (each its own ids)."""
    import test_bad_inputs
    import test_bad_inputs_cli
    import test_bad_inputs_data

    ids = [r.id for m in (test_bad_inputs, test_bad_inputs_cli, test_bad_inputs_data) for r in m.ROWS]
    ids += [r.id for r in ROWS]
    assert len(set(ids)) == len(ids)
    assert len(ids) >= 200, len(ids)


# -- results are not lost, samples are not changed --------------------------------------------------------

def test_evaluate_prints_the_result_when_the_json_write_fails(env: MoreEnv, tmp_path: Path, monkeypatch):
    """A --json write that fails after the evaluation (here: the disk fills up) prints the result on
    stdout, then the one-line error, exit 2: the hour of Inception work is not lost."""
    import dpldm.utils.io

    def full(path, text, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dpldm.utils.io, "atomic_write_text", full)
    target = tmp_path / "r.json"
    code, stdout, stderr = run_in_process(main, ev(env, "--classifier-epochs", "1", "--json", str(target)))
    assert code == 2 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (f"dpldm evaluate: error: --json {target}: cannot write it (No space "
                                               "left on device); the result is printed above")
    start = stdout.index("{")
    result = json.loads(stdout[start:stdout.rindex("}") + 1])
    assert result["n_test_real"] == 15 and 0.0 <= result["accuracy"] <= 1.0
    assert not target.exists()


def test_evaluate_replaces_its_own_report(env: MoreEnv, tmp_path: Path):
    """The --json refusals (`evaluate-json-*`) leave a rerun into the same report working: a report that
    `dpldm evaluate` wrote is replaced (evaluate has no --overwrite; this is what it always did)."""
    target = tmp_path / "r.json"
    for epochs in ("1", "2"):
        code, _, stderr = run_in_process(main, ev(env, "--classifier-epochs", epochs, "--json", str(target)))
        assert code == 0, stderr[-2000:]
    assert json.loads(target.read_text())["epochs_run"] >= 1 and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_guidance_that_stays_finite_still_samples(env: MoreEnv, tmp_path: Path):
    """The NaN refusal is no blanket refusal of large guidance: 1e3 on the tiny model is finite, so
    it is written (exit 0) and its pixels are valid uint8."""
    out = tmp_path / "s.npz"
    code, _, stderr = run_in_process(main, smp(env, out, "--guidance", "1e3", "--steps", "2", "--format", "npz", suffix=".npz"))
    assert code == 0, stderr[-2000:]
    with np.load(out) as z:
        assert z["images"].dtype == np.uint8 and z["images"].shape == (24, 16, 16)
