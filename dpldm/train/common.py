"""Shared pieces of the non-private training commands: CLI options (incl. `--device`), config
resolution, per-step seeds, optimizer/scheduler state in checkpoints, resume checks.

Per-step generators stay on the CPU on every device (the draws are moved to the device), so a run
on a GPU draws the same batches and noises as on the CPU."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpldm.checkpoint import list_step_checkpoints
from dpldm.errors import UserError
from dpldm.config import LR_DECAYS, RunConfig, load_config
from dpldm.utils.device import add_device_argument, resolve_device

STREAMS = {"ae": 1, "ldm": 2, "sample": 3}
# settings that only affect sampling, not training: they may change between a run and its resume
SAMPLING_ONLY = {"diffusion": {"sampler", "sample_steps", "eta", "guidance_scale"}}


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML recipe (configs/*.toml); defaults when omitted")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable), e.g. --set train.steps=500")
    parser.add_argument("--out", help="run folder (overrides train.out_dir)")
    parser.add_argument("--no-wandb", action="store_true", help="turn wandb logging off")
    parser.add_argument("--resume", action="store_true", help="continue from the newest step checkpoint in the run folder")
    parser.add_argument("--max-steps", type=int, default=None, metavar="N",
                        help="stop after N more steps of this invocation (checkpoint, exit 0; continue with --resume)")
    add_device_argument(parser, default=None)  # None: the recipe's train.device (default auto)


def run_device(args: argparse.Namespace, cfg: RunConfig) -> torch.device:
    """`--device` when given, else the recipe's `train.device` (DeviceError when it does not exist here)."""
    if getattr(args, "device", None):
        return resolve_device(args.device, "--device")
    return resolve_device(cfg.train.device, "train.device")


def resolve_config(args: argparse.Namespace) -> RunConfig:
    overrides = list(args.set)
    if args.out:
        overrides.append(f"train.out_dir={json.dumps(str(args.out))}")
    if args.no_wandb:
        overrides.append("train.wandb=false")
    return load_config(args.config, overrides)


def set_threads(cfg: RunConfig) -> None:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)


def step_generator(seed: int, step: int, stream: str) -> torch.Generator:
    """A CPU generator that is a pure function of (seed, stream, step): runs resume exactly."""
    state = np.random.SeedSequence([seed, STREAMS[stream], step]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def lr_factor(step: int, warmup_steps: int, total_steps: int = 0, decay: str = "constant") -> float:
    """The learning-rate multiplier of (0-based) `step`: linear warm-up over `warmup_steps` steps, then
    constant, or ("cosine") half a cosine from 1 after the warm-up down to 0 at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay not in LR_DECAYS:
        raise ValueError(f"learning-rate decay must be {'|'.join(LR_DECAYS)}, got {decay!r}")
    if decay == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))  # 0 right after the warm-up
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_scheduler(opt: torch.optim.Optimizer, warmup_steps: int, total_steps: int = 0,
                     decay: str = "constant") -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup_steps` steps, then constant or cosine decay to 0 at `total_steps`
    (`lr_factor`). The lambda depends only on the step, so a resumed scheduler continues exactly."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup_steps, total_steps, decay))


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten an optimizer state_dict: tensors `opt.<param index>.<name>` (on the CPU) + JSON-able
    param groups. Loading moves the state back to the parameters' device."""
    sd = opt.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            tensors[f"opt.{idx}.{name}"] = value.detach().cpu() if torch.is_tensor(value) else torch.tensor(value)
    return tensors, {"param_groups": sd["param_groups"]}


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def check_resume_config(cfg: RunConfig, saved: dict[str, Any], sections: tuple[str, ...], where: Path) -> None:
    """A resumed run must train the same model on the same data: compare those sections
    (sampling-only settings excepted)."""
    saved_cfg = RunConfig.from_dict(saved, f"{where}/meta.json").to_dict()
    now = cfg.to_dict()
    diffs = [f"{s}.{k}: checkpoint {saved_cfg[s][k]!r} != now {now[s][k]!r}"
             for s in sections for k in now[s]
             if saved_cfg[s][k] != now[s][k] and k not in SAMPLING_ONLY.get(s, ())]
    if diffs:
        raise UserError(f"cannot resume from {where}: the config changed ({'; '.join(diffs)})")


def refuse_to_clobber(run_dir: Path, resume: bool) -> None:
    if not resume and list_step_checkpoints(run_dir):
        raise UserError(f"{run_dir} already holds step checkpoints: pass --resume to continue, or pick another --out")


class PretrainStop:
    """When a pretraining loop stops early: SIGTERM / SIGUSR1 / SIGINT, a STOP file in the run
    folder, or `--max-steps` steps taken by this invocation. The loop checkpoints, says how to
    continue and exits 0 (a second SIGINT/SIGTERM stops at once, see run_folder.StopRequest)."""

    def __init__(self, run_dir: Path, start: int, max_steps: int | None, total: int, resume_hint: str) -> None:
        from dpldm.train.run_folder import StopRequest

        if max_steps is not None and max_steps < 1:
            raise UserError(f"--max-steps must be >= 1, got {max_steps}")
        if start > total:
            raise UserError(f"--resume: {run_dir} already holds step {start}, more than the recipe's {total} steps; "
                            f"the saved model would claim a {total}-step recipe it did not follow (raise the step "
                            "count, or start a new run)")
        self.run_dir, self.hint, self.total = run_dir, resume_hint, total
        self.stop_at = total if max_steps is None else min(total, start + max_steps)
        self.signals = StopRequest()
        self.reason: str | None = None

    def requested(self, done: int) -> bool:
        """Called after each step; True when the loop should checkpoint and stop now."""
        from dpldm.train.run_folder import STOP_FILE

        if done >= self.total:  # the last step: the loop finishes and saves the model
            return False
        if self.signals.signal_name:
            self.reason = self.signals.signal_name
        elif (self.run_dir / STOP_FILE).exists():
            self.reason = STOP_FILE
        elif done >= self.stop_at:
            self.reason = "--max-steps"
        return self.reason is not None

    def finish(self, done: int, job: str) -> None:
        from dpldm.train.run_folder import STOP_FILE

        self.signals.restore()
        if self.reason == STOP_FILE:
            (self.run_dir / STOP_FILE).unlink(missing_ok=True)  # honoured: the resumed run trains on
        if self.reason is not None:
            print(f"[{job}] stopped at step {done} ({self.reason}); checkpoint written. Continue with: {self.hint}",
                  flush=True)
