"""Choose the public LDM pretraining's batch and lr by a short pilot: loss at equal wall time (issue 25).

Each candidate (the recipe + --set overrides + one point of --grid) runs THE pretraining command
(`dpldm pretrain-ldm`) for --seconds of training (measured from the trainer's start line, so the
one-off encoding of the public set is not counted), is stopped by a STOP file (checkpoint, exit 0),
and is scored by its held-out eps-MSE: the public source's TEST split (never trained on), encoded
by the same frozen autoencoder (posterior mean x scale_factor), at fixed timesteps and noises
(seeded, K per image), for the raw weights and the EMA. Lower is better; the raw weights decide
(an EMA over a few hundred steps mostly lags). Public data only.

    python bench/pilot_pretrain.py --config configs/glyphs_pretrain_v2_cpu.toml \\
        --autoencoder runs/public2cpu/ae/model --seconds 150 \\
        --grid train.batch_size=64,128 --grid train.lr=1e-3,2e-3 --out runs/pilot_pretrain

Prints a table and writes <out>/report.json (atomically).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpldm.checkpoint import load_latest_checkpoint, unprefixed  # noqa: E402
from dpldm.config import load_config  # noqa: E402
from dpldm.diffusion.loss import per_example_loss  # noqa: E402
from dpldm.models.ldm import LatentDiffusion, load_autoencoder  # noqa: E402
from dpldm.train.pretrain_ae import load_public_images  # noqa: E402
from dpldm.utils.io import atomic_write_text  # noqa: E402

START_MARK = "[pretrain-ldm] "  # the trainer's start line (printed after the public set is encoded)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--autoencoder", required=True)
    p.add_argument("--set", action="append", default=[], help="fixed override for every candidate")
    p.add_argument("--grid", action="append", default=[], metavar="SECTION.KEY=V1,V2", help="swept key (cartesian)")
    p.add_argument("--seconds", type=float, default=150.0, help="training wall time per candidate")
    p.add_argument("--public-size", type=int, default=10000, help="public images per pilot run (data.public_size)")
    p.add_argument("--eval-examples", type=int, default=2000, help="test-split images for the held-out loss")
    p.add_argument("--eval-k", type=int, default=4, help="fixed (t, noise) draws per held-out image")
    p.add_argument("--out", default=str(ROOT / "runs" / "pilot_pretrain"))
    return p.parse_args(argv)


def grid_points(grid: list[str]) -> list[list[str]]:
    axes = []
    for item in grid:
        if "=" not in item:
            raise SystemExit(f"pilot_pretrain: --grid {item!r}: expected section.key=v1,v2")
        key, values = item.split("=", 1)
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [list(p) for p in itertools.product(*axes)] if axes else [[]]


def run_candidate(args: argparse.Namespace, overrides: list[str], run_dir: Path) -> float:
    """Run pretrain-ldm until --seconds of training have passed; returns the measured training seconds."""
    cmd = [sys.executable, "-m", "dpldm", "pretrain-ldm", "--config", args.config, "--autoencoder", args.autoencoder,
           "--out", str(run_dir), "--no-wandb", "--set", f"data.public_size={args.public_size}",
           "--set", "train.steps=1000000", "--set", "train.checkpoint_every=1000000", "--set", "train.log_every=50"]
    for o in [*args.set, *overrides]:
        cmd += ["--set", o]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    started = threading.Event()
    log = open(run_dir.parent / f"{run_dir.name}.log", "w")

    def pump() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            log.write(line)
            if line.startswith(START_MARK):
                started.set()
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    while not started.wait(1.0):
        if proc.poll() is not None:
            raise SystemExit(f"pilot_pretrain: {run_dir.name} failed before training (log: {log.name})")
    t0 = time.time()
    time.sleep(args.seconds)
    (run_dir / "STOP").touch()
    rc = proc.wait()
    reader.join()
    log.close()
    if rc != 0:
        raise SystemExit(f"pilot_pretrain: {run_dir.name} exited {rc} (log: {log.name})")
    return time.time() - t0


@torch.no_grad()
def held_out_loss(cfg, ae, tensors: dict, scale: float, x: torch.Tensor, y: torch.Tensor, k: int) -> dict[str, float]:
    """Mean eps-MSE of the raw and EMA weights on held-out images at seeded (t, noise) draws."""
    ldm = LatentDiffusion(cfg, scale_factor=scale)
    ldm.ae.load_state_dict(ae.state_dict())
    out = {}
    for name in ("model", "ema"):
        state = unprefixed(name, tensors)
        state.pop("__n_averaged__", None)  # the EMA's update count (dpldm.diffusion.ema)
        ldm.unet.load_state_dict(state)
        ldm.unet.eval()
        g = torch.Generator().manual_seed(1234)  # the same draws for every candidate
        total = 0.0
        for i in range(0, x.shape[0], 250):
            z0 = ldm.ae.encode(x[i:i + 250]).mean * scale  # (b, Z, h, w)
            total += per_example_loss(ldm.unet, z0, y[i:i + 250], ldm.schedule, k, generator=g).sum().item()
        out[name] = total / x.shape[0]
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    base = load_config(args.config, args.set)
    ae, _, _ = load_autoencoder(args.autoencoder)
    ae.eval()
    x, y = load_public_images(base, split="test", num=args.eval_examples)  # (N, C, H, W), (N,)
    rows = []
    for i, point in enumerate(grid_points(args.grid)):
        run_dir = out / f"cand{i}"
        if not (run_dir / "checkpoints").exists():
            secs = run_candidate(args, point, run_dir)
        else:
            secs = float("nan")  # reused from an earlier invocation of the same pilot
        tensors, meta, _ = load_latest_checkpoint(run_dir)
        cfg = load_config(args.config, [*args.set, *point])
        losses = held_out_loss(cfg, ae, tensors, float(meta["scale_factor"]), x, y, args.eval_k)
        steps = int(meta["step"])
        row = {"candidate": ", ".join(point) or "recipe", "steps": steps, "train_wall_s": meta.get("train_wall_s"),
               "examples_seen": steps * cfg.train.batch_size, "heldout_eps_mse": losses["model"],
               "heldout_eps_mse_ema": losses["ema"], "measured_s": round(secs, 1)}
        rows.append(row)
        print(f"{row['candidate']}: {steps} steps ({row['examples_seen']:,} examples) in {row['train_wall_s']} s: "
              f"held-out eps-MSE {losses['model']:.5f} (EMA {losses['ema']:.5f})", flush=True)
    best = min(rows, key=lambda r: r["heldout_eps_mse"])
    table = ["| candidate | steps | examples | training s | held-out eps-MSE | (EMA) |", "|---|---|---|---|---|---|"]
    table += [f"| {r['candidate']}{' **(chosen)**' if r is best else ''} | {r['steps']} | {r['examples_seen']:,} | "
              f"{r['train_wall_s']} | {r['heldout_eps_mse']:.5f} | {r['heldout_eps_mse_ema']:.5f} |" for r in rows]
    print("\n".join(table))
    report = {"config": args.config, "autoencoder": args.autoencoder, "set": args.set, "grid": args.grid,
              "seconds": args.seconds, "public_size": args.public_size, "eval_examples": args.eval_examples,
              "eval_k": args.eval_k, "rows": rows, "chosen": best["candidate"], "table": table}
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
