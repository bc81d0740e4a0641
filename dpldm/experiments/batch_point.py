"""One point of `dpldm experiment batch`, in a fresh process (so its peak memory is its own):

    python -m dpldm.experiments.batch_point SPEC.json RESULT.json

SPEC (written by dpldm/experiments/batch.py): {"config", "sets", "run_dir", "finetune", "threads",
"seed", "cache", "measured", "eval": {quick, samples_per_class, fid_samples, no_fid}, "verbose"}.
The point fine-tunes with the private-run protocol of dpldm/experiments/utility.py (the trainer
calibrates sigma for the point's q and steps), reads its own peak resident memory right after the
fine-tuning (VmHWM: the high-water mark of THIS process, so earlier points cannot pollute it), writes
those measurements to SPEC["measured"] (a rerun after a crash in the evaluation reuses them, never
re-measures a finished run), then evaluates the released model and writes RESULT atomically:
{"finetune": {"privacy", "wall_s", "peak_rss_mb", "resumed"}, "eval": {...}}. Errors about the
user's input: one line on stderr, exit 2.
"""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from dpldm.errors import InputError
from dpldm.utils.io import atomic_write_text

PROG = "dpldm experiment batch (point)"


def peak_rss_mb(proc_status: str = "/proc/self/status") -> float:
    """This process's peak resident memory so far in MiB: VmHWM from `proc_status` (Linux: the high-water
    mark of this process's own address space, reset by exec), else getrusage's ru_maxrss (KiB on Linux,
    bytes on macOS; on Linux it keeps the parent's peak at fork, so it is only an upper bound here)."""
    try:
        with open(proc_status) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024.0 / (1024.0 if sys.platform == "darwin" else 1.0)


def plain(d: dict) -> dict:
    """Only JSON scalars and dicts of them (the privacy report's fixed_shape is a dict)."""
    return {k: (plain(v) if isinstance(v, dict) else v) for k, v in d.items()
            if isinstance(v, (int, float, str, bool, type(None), dict))}


def finetune(spec: dict[str, Any]):
    """The fine-tuning (or its stored measurements when it already finished): (ldm, measurements)."""
    from dpldm.checkpoint import list_step_checkpoints
    from dpldm.config import load_config
    from dpldm.experiments.utility import run_dp_finetune
    from dpldm.models.ldm import load_ldm

    run_dir, measured = Path(spec["run_dir"]), Path(spec["measured"])
    if measured.is_file() and (run_dir / "model").is_dir():
        return load_ldm(run_dir / "model"), json.loads(measured.read_text())
    cfg = load_config(spec["config"], spec["sets"])
    resumed = bool(list_step_checkpoints(run_dir))  # an interrupted point: time and memory cover the rest only
    t0 = time.perf_counter()
    ldm, info = run_dp_finetune(cfg, run_dir, spec["finetune"], verbose=bool(spec.get("verbose")))
    wall = time.perf_counter() - t0
    out = {"privacy": plain(info), "wall_s": round(wall, 2), "peak_rss_mb": round(peak_rss_mb(), 1),
           "resumed": resumed}
    atomic_write_text(measured, json.dumps(out, indent=2) + "\n")
    return ldm, out


def evaluate(ldm, spec: dict[str, Any]) -> dict:
    """Samples per class -> FID/KID and the downstream CNN's accuracy (utility's protocol)."""
    from dpldm.config import load_config
    from dpldm.experiments.utility import evaluate_generative

    cfg = load_config(spec["config"], spec["sets"])
    res = evaluate_generative(ldm, cfg, SimpleNamespace(**spec["eval"]), Path(spec["cache"]), int(spec["seed"]))
    return {k: v for k, v in res.items() if isinstance(v, (int, float, str, bool, type(None)))}


def run_point(spec: dict[str, Any]) -> dict:
    import torch

    torch.set_num_threads(int(spec["threads"]))
    ldm, measured = finetune(spec)
    return {"finetune": measured, "eval": evaluate(ldm, spec)}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2:
        print("usage: python -m dpldm.experiments.batch_point SPEC.json RESULT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    try:
        result = run_point(spec)
    except InputError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    atomic_write_text(argv[1], json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
