"""The one run logger of every trainer: the resolved config printed and saved, a tqdm bar,
`metrics.jsonl` in the run folder, and wandb.

* `metrics.jsonl`: one JSON object per logged step ({"step", "time", ...scalars}), appended and
  flushed line by line, so it survives a kill; a resumed run appends to it.
* wandb respects the user's WANDB_* variables (WANDB_PROJECT, WANDB_ENTITY, WANDB_MODE, WANDB_DIR,
  ...): only what is unset gets a default -- mode "offline", files inside the run folder, project
  "dpldm". The run id is stored in `<run>/wandb_run_id` and reused, so a resumed run continues the
  same wandb run (resume="allow") instead of starting a new one.
* Only aggregate, public scalars are logged: never per-example values (the DP rule).
* `private=True` (a DP run with secret randomness): NO timing at all, since a step's duration
  grows with its realised Poisson batch (a private count). metrics.jsonl rows carry no "time";
  scalars named like timings (TIMING_KEYS) are refused; the progress bar shows no rate, elapsed
  time or ETA; wandb gets no system metrics (x_disable_stats) and no console capture (its lines
  are time-stamped) unless the user's WANDB_X_DISABLE_STATS / WANDB_CONSOLE say otherwise, and its
  history rows are sent together when the logger closes (wandb stamps every row with its own
  `_runtime` on arrival, which cannot be switched off in wandb 0.31: sent together, the rows'
  stamps say only when the invocation ended, like the run's own start/end records).
"""
from __future__ import annotations

import json
import math
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dpldm.config import RunConfig, save_resolved

METRICS = "metrics.jsonl"
WANDB_ID = "wandb_run_id"
_OURS: dict[str, str] = {}  # WANDB_* variables this process set itself (a later run may set them again)
TIMING_KEYS = ("steps_per_s", "expected_examples_per_s", "examples_per_s", "wall_s", "time", "elapsed", "eta",
               "step_s", "seconds_per_step")
PRIVATE_BAR = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{postfix}"  # no rate, elapsed time or ETA


WANDB_MODES = ("online", "offline", "disabled", "dryrun", "run", "shared")


def check_wandb_environment() -> None:
    """Refuse, before the run starts, a WANDB_MODE that cannot work here: an unknown mode, or an
    online mode with no W&B credentials (WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE or the ~/.netrc
    entry `wandb login` writes). Refused rather than silently switched to offline: the user asked
    for online logging and would otherwise find no run on the server after hours of training."""
    from dpldm.errors import UserError

    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode and mode not in WANDB_MODES:
        raise UserError(f"WANDB_MODE={os.environ['WANDB_MODE']!r}: expected one of {', '.join(WANDB_MODES)}")
    if mode not in ("online", "run", "shared"):
        return
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return
    try:
        from wandb.sdk.lib.wbauth import read_netrc_auth

        if read_netrc_auth(host=os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"):
            return
    except Exception:  # noqa: BLE001 - an unreadable netrc is "no key"; wandb would fail the same way
        pass
    raise UserError(f"WANDB_MODE={mode} but no W&B API key is set (WANDB_API_KEY, or run wandb login): set one, "
                    "or use WANDB_MODE=offline (the default: a local run in the run folder) or --no-wandb")


class RunLogger:
    def __init__(self, run_dir: str | Path, cfg: RunConfig, *, use_wandb: bool, total_steps: int,
                 initial_step: int = 0, job: str = "run", resume: bool = False, private: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.private = bool(private)
        self._held: list[tuple[int, dict[str, Any]]] = []  # private: wandb rows sent at close()
        if use_wandb:
            check_wandb_environment()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = save_resolved(cfg, self.run_dir)
        self.info(f"[{job}] resolved config ({path}):\n{cfg.to_json()}")
        self._metrics = open(self.run_dir / METRICS, "a" if resume else "w", encoding="utf-8")
        self._wandb = self._start_wandb(cfg, job, resume) if use_wandb else None
        tty = sys.stderr.isatty()
        self.bar = tqdm(total=total_steps, initial=initial_step, desc=job, dynamic_ncols=True,
                        mininterval=0.5 if tty else 30.0, file=sys.stderr,
                        bar_format=PRIVATE_BAR if self.private else None)

    def _start_wandb(self, cfg: RunConfig, job: str, resume: bool):
        import wandb

        for var, sub in (("WANDB_DIR", ""), ("WANDB_CACHE_DIR", "wandb_cache"), ("WANDB_CONFIG_DIR", "wandb_config"),
                         ("WANDB_DATA_DIR", "wandb_data")):
            if not os.environ.get(var) or os.environ.get(var) == _OURS.get(var):  # the user's value wins
                folder = self.run_dir / sub
                folder.mkdir(parents=True, exist_ok=True)
                os.environ[var] = _OURS[var] = str(folder.resolve())
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        id_file = self.run_dir / WANDB_ID
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        settings = {}
        if self.private:  # off by default in a private run; the user's explicit WANDB_* variable wins
            if "WANDB_X_DISABLE_STATS" not in os.environ:
                settings["x_disable_stats"] = True
            if "WANDB_CONSOLE" not in os.environ:
                settings["console"] = "off"
        run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "dpldm", job_type=job, id=run_id, resume="allow",
                         dir=os.environ["WANDB_DIR"], config=cfg.to_dict(),
                         name=os.environ.get("WANDB_NAME") or f"{job}-{self.run_dir.name}",
                         settings=wandb.Settings(**settings) if settings else None)
        self.info(f"[{job}] wandb {os.environ['WANDB_MODE']} run {run_id} (project {run.project}) in "
                  f"{os.environ['WANDB_DIR']}")
        return run

    def info(self, message: str) -> None:
        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()

    def advance(self, n: int = 1) -> None:
        self.bar.update(n)

    def log(self, step: int, scalars: dict[str, Any], echo: bool = True) -> None:
        """Log aggregate scalars at `step`: metrics.jsonl, the bar, wandb and (with `echo`) one line."""
        clean = {}
        for k, v in scalars.items():
            if hasattr(v, "item"):
                if getattr(v, "numel", lambda: 1)() != 1:
                    raise ValueError(f"RunLogger.log: {k!r} is not a scalar (only aggregate scalars are logged)")
                v = v.item()
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"RunLogger.log: {k!r} must be a number, got {type(v).__name__}")
            if self.private and k in TIMING_KEYS:
                raise ValueError(f"RunLogger.log: {k!r} is a timing, which a private run must not log (a step's "
                                 "duration grows with its realised Poisson batch)")
            clean[k] = v
        row = {"step": int(step), **self._stamp(), **{k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()}}
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        self.bar.set_postfix({k: _fmt(v) for k, v in clean.items()}, refresh=False)
        self._to_wandb(step, clean)
        if echo:
            self.info(f"step {step}: " + " ".join(f"{k}={_fmt(v)}" for k, v in clean.items()))

    def log_image(self, step: int, path: str | Path, key: str = "samples") -> None:
        """A picture the run made (e.g. an EMA sample grid): named in metrics.jsonl, sent to wandb."""
        self._metrics.write(json.dumps({"step": int(step), **self._stamp(), key: str(path)}) + "\n")
        self._metrics.flush()
        if self._wandb is not None:
            import wandb

            self._to_wandb(step, {key: wandb.Image(str(path))})
        self.info(f"step {step}: {key} -> {path}")

    def _stamp(self) -> dict[str, float]:
        return {} if self.private else {"time": round(time.time(), 3)}

    def _to_wandb(self, step: int, row: dict[str, Any]) -> None:
        if self._wandb is None:
            return
        if self.private:
            self._held.append((int(step), row))
        else:
            self._wandb.log(row, step=step)

    def close(self) -> None:
        self.bar.close()
        if not self._metrics.closed:
            self._metrics.close()
        if self._wandb is not None:
            for step, row in self._held:
                self._wandb.log(row, step=step)
            self._held.clear()
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run folder's metrics.jsonl (tests, reports)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _fmt(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    if v == 0 or (math.isfinite(v) and 1e-3 <= abs(v) < 1e4):
        return f"{v:.4f}"
    return f"{v:.3e}"
