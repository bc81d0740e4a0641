#!/usr/bin/env python
"""Distributed DP fine-tuning: per-rank peak memory and time per logical step vs logical batch,
for 1 and 2 ranks (more where the machine allows), and frozen-parameter memory per rank with and
without ZeRO-3.

    python bench/scaling.py --quick                 # ~2-4 min on 2 CPU cores: batches 512, 2048
    python bench/scaling.py                          # batches 512 .. 16384 (minutes to an hour on CPU)
    python bench/scaling.py --ranks 1 2 4 --zero 0 3 --config configs/demo.toml --json out.json

Each (ranks, ZeRO stage) is a fresh torchrun launch of this file in --worker mode, so peak
memory is per process and per configuration. One logical step per batch size (after one warm-up
step at the smallest), physical batch 64, the demo UNet with attention:all trainable, synthetic
latents (timing does not depend on their values), sigma fixed (no calibration).

Peak memory: on CPU the process's peak RSS (ru_maxrss) after each logical batch, in increasing
batch order -- it can only grow, so a flat column means the step's memory does not grow with the
logical batch; on GPU torch.cuda.max_memory_allocated, reset per batch. Frozen bytes: what each
rank stores of the frozen UNet parameters (ZeRO-3: its partitions), the same model built both ways.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FULL = [512, 1024, 2048, 4096, 8192, 16384]
QUICK = [512, 2048]


def worker(args: argparse.Namespace) -> None:
    import torch

    from dpldm.config import load_config
    from dpldm.diffusion.schedule import DiffusionSchedule
    from dpldm.models.selection import apply_finetune
    from dpldm.models.unet import UNet
    from dpldm.parallel import init_distributed
    from dpldm.parallel.step import run_logical_step
    from dpldm.privacy.accountant import PrivacyLedger
    from dpldm.train.dp_loss import ChunkBatch, DiffusionDPLoss
    from dpldm.train.private_data import latent_shape
    from dpldm.parallel.zero import build_model, load_ds_config
    from dpldm.privacy.dp_step import DPStep
    from dpldm.privacy.noise import GaussianNoise

    torch.set_num_threads(args.threads)
    ctx = init_distributed()
    batches = sorted(args.batches)
    N = args.num_examples or 4 * batches[-1]
    cfg = load_config(args.config, [f"privacy.physical_batch_size={args.physical}", "privacy.noise_multiplier=1.0",
                                    "privacy.backend=torch", f"privacy.delta={min(1e-5, 0.5 / N)}",
                                    "diffusion.cond_drop_prob=0.0"])
    torch.manual_seed(0)
    state = UNet(cfg.unet).state_dict() if ctx.is_main else None
    select = lambda m: apply_finetune(m, cfg.train.finetune)  # noqa: E731

    frozen = {}
    for stage in (0, 3):  # the frozen bytes each rank stores, with and without ZeRO-3
        m = build_model(lambda: UNet(cfg.unet), ctx, load_ds_config(stage, args.physical), select, state=state)
        frozen[stage] = m.frozen_bytes()
        del m
    sm = build_model(lambda: UNet(cfg.unet), ctx, load_ds_config(args.zero, args.physical), select, state=state)
    shape = latent_shape(cfg)
    g = torch.Generator().manual_seed(1)
    xs = torch.randn((N, *shape), generator=g)
    ys = torch.randint(0, cfg.data.num_classes, (N,), generator=g)
    sched = DiffusionSchedule.from_config(cfg.diffusion)
    loss_fn = DiffusionDPLoss(sched, scale_factor=1.0, timesteps_per_example=cfg.diffusion.timesteps_per_example,
                              cond_drop_prob=0.0, seed=5, device=ctx.device)
    dummy = ChunkBatch(torch.zeros((1, *shape)), torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), 0)
    params = list(sm.trainable().values())
    opt = torch.optim.AdamW(params, lr=1e-4)
    cuda = ctx.device.type == "cuda"
    rows = []
    for k, L in enumerate([batches[0]] + batches):  # the first is a warm-up
        priv = cfg.privacy.__class__(**{**vars(cfg.privacy), "expected_batch_size": L})
        ledger = PrivacyLedger.from_state_dict(ctx.on_main(lambda: PrivacyLedger.from_config(priv, N, seed=1234).state_dict()))
        dp = DPStep(sm.module, loss_fn, ledger, noise=GaussianNoise(seed=5), optimizer=opt, world=ctx.world(),
                    backend="torch", physical_batch_size=args.physical, acc_dtype=torch.float64)

        def load(idx, dp=dp):
            return ChunkBatch(xs[idx], ys[idx], idx, dp.step_index)

        if cuda:
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
        ctx.barrier()
        t0 = time.perf_counter()
        counts = run_logical_step(dp, load, lockstep=sm.lockstep, dummy_batch=dummy, after_pass=sm.after_backward)
        if cuda:
            torch.cuda.synchronize()
        ctx.barrier()
        dt = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        per_rank = ctx.all_gather_object({"peak_bytes": int(peak), "chunks": counts["chunks"]})
        if k > 0:
            rows.append({"logical_batch": L, "realised": counts["global"], "seconds": dt,
                         "chunks_per_rank": per_rank[0]["chunks"],
                         "peak_bytes_per_rank": [p["peak_bytes"] for p in per_rank]})
        if ctx.is_main:
            print(f"  W={ctx.world_size} zero={args.zero} L={L}: {dt:.2f}s ({'warm-up' if k == 0 else 'timed'})",
                  flush=True)
    if ctx.is_main:
        Path(args.json).write_text(json.dumps({
            "world_size": ctx.world_size, "zero": args.zero, "device": str(ctx.device), "physical": args.physical,
            "num_examples": N, "threads_per_rank": args.threads, "rows": rows,
            "frozen_bytes_per_rank": {"zero0": frozen[0]["local"], "zero3": frozen[3]["local"],
                                      "full": frozen[0]["full"]},
            "trainable_params": sum(p.numel() for p in params)}, indent=1))
    ctx.close()


def launch(ranks: int, zero: int, args: argparse.Namespace) -> dict:
    from dpldm.parallel.env import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(ranks),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(Path(__file__).resolve()),
               "--worker", "--zero", str(zero), "--json", str(out), "--physical", str(args.physical),
               "--threads", str(args.threads), "--batches", *map(str, args.batches)]
        if args.config:
            cmd += ["--config", args.config]
        if args.num_examples:
            cmd += ["--num-examples", str(args.num_examples)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
        t0 = time.time()
        r = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if r.returncode != 0:
            raise SystemExit(f"bench worker (W={ranks}, zero={zero}) failed:\n{r.stdout[-4000:]}")
        for line in r.stdout.splitlines():
            if line.startswith("  W="):
                print(line, flush=True)
        res = json.loads(out.read_text())
        res["launch_seconds"] = time.time() - t0
        return res


def table(results: list[dict]) -> str:
    mib = 1 << 20
    lines = ["| ranks | ZeRO | logical batch | realised | chunks/rank | s/step | peak MiB per rank |",
             "|---:|---:|---:|---:|---:|---:|---|"]
    for res in results:
        for row in res["rows"]:
            peaks = ", ".join(f"{p / mib:.0f}" for p in row["peak_bytes_per_rank"])
            lines.append(f"| {res['world_size']} | {res['zero']} | {row['logical_batch']} | {row['realised']} | "
                         f"{row['chunks_per_rank']} | {row['seconds']:.2f} | {peaks} |")
    lines += ["", "| ranks | frozen params (KiB) per rank, ZeRO-0 | ZeRO-3 | full frozen model (KiB) |",
              "|---:|---:|---:|---:|"]
    seen = set()
    for res in results:
        if res["world_size"] in seen:
            continue
        seen.add(res["world_size"])
        fb = res["frozen_bytes_per_rank"]
        lines.append(f"| {res['world_size']} | {fb['zero0'] / 1024:.1f} | {fb['zero3'] / 1024:.1f} | {fb['full'] / 1024:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"batches {QUICK} only")
    p.add_argument("--batches", type=int, nargs="+", help=f"logical batches (default {FULL})")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--zero", type=int, nargs="+", default=[0, 3], help="ZeRO stages to time")
    p.add_argument("--physical", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.toml"))
    p.add_argument("--num-examples", type=int, default=0, help="N (default 4x the largest batch)")
    p.add_argument("--json", help="write all results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.zero = args.zero[0] if isinstance(args.zero, list) else args.zero
        worker(args)
        return
    args.batches = args.batches or (QUICK if args.quick else FULL)
    results = []
    t0 = time.time()
    for W in args.ranks:
        for z in args.zero:
            results.append(launch(W, z, args))
    print(table(results))
    print(f"\n(total {time.time() - t0:.0f}s; command: {' '.join(sys.argv)})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
