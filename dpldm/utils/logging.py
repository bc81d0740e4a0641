"""A small run logger: the resolved config printed and saved, a tqdm bar, wandb offline.

wandb runs offline by default (WANDB_MODE=offline unless the environment says otherwise) with
WANDB_DIR, WANDB_CACHE_DIR, WANDB_CONFIG_DIR and WANDB_DATA_DIR inside the run folder, so nothing
is written elsewhere. Only aggregate scalars are logged: never per-example values.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dpldm.config import RunConfig, save_resolved


class RunLogger:
    def __init__(self, run_dir: str | Path, cfg: RunConfig, *, use_wandb: bool, total_steps: int,
                 initial_step: int = 0, job: str = "run") -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = save_resolved(cfg, self.run_dir)
        self.info(f"[{job}] resolved config ({path}):\n{cfg.to_json()}")
        self._wandb = None
        if use_wandb:
            self._wandb = self._start_wandb(cfg, job)
        tty = sys.stderr.isatty()
        self.bar = tqdm(total=total_steps, initial=initial_step, desc=job, dynamic_ncols=True,
                        mininterval=0.5 if tty else 30.0, file=sys.stderr)

    def _start_wandb(self, cfg: RunConfig, job: str):
        import wandb

        for var, sub in (("WANDB_DIR", ""), ("WANDB_CACHE_DIR", "wandb_cache"), ("WANDB_CONFIG_DIR", "wandb_config"),
                         ("WANDB_DATA_DIR", "wandb_data")):
            folder = self.run_dir / sub
            folder.mkdir(parents=True, exist_ok=True)
            os.environ[var] = str(folder.resolve())
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        run = wandb.init(project="dpldm", job_type=job, dir=str(self.run_dir.resolve()), config=cfg.to_dict(),
                         name=f"{job}-{self.run_dir.name}")
        self.info(f"[{job}] wandb {os.environ['WANDB_MODE']} run in {self.run_dir / 'wandb'}")
        return run

    def info(self, message: str) -> None:
        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()

    def advance(self, n: int = 1) -> None:
        self.bar.update(n)

    def log(self, step: int, scalars: dict[str, Any], echo: bool = True) -> None:
        """Log aggregate scalars at `step` (to the bar, wandb and, with `echo`, one printed line)."""
        clean = {}
        for k, v in scalars.items():
            if hasattr(v, "item"):
                if getattr(v, "numel", lambda: 1)() != 1:
                    raise ValueError(f"RunLogger.log: {k!r} is not a scalar (only aggregate scalars are logged)")
                v = v.item()
            if not isinstance(v, (int, float)):
                raise ValueError(f"RunLogger.log: {k!r} must be a number, got {type(v).__name__}")
            clean[k] = v
        self.bar.set_postfix({k: _fmt(v) for k, v in clean.items()}, refresh=False)
        if self._wandb is not None:
            self._wandb.log(clean, step=step)
        if echo:
            self.info(f"step {step}: " + " ".join(f"{k}={_fmt(v)}" for k, v in clean.items()))

    def close(self) -> None:
        self.bar.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fmt(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    if v == 0 or (math.isfinite(v) and 1e-3 <= abs(v) < 1e4):
        return f"{v:.4f}"
    return f"{v:.3e}"
