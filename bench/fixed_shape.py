#!/usr/bin/env python
"""Fixed-shape private steps (privacy.fixed_shape) against today's step, side by side: time per
logical step, its ratio, and how a step's time follows the realised Poisson batch |S| (Spearman
rank correlation: the timing channel the fixed shape closes).

    python bench/fixed_shape.py --quick       # tiny UNet, ~1 min on 2 CPU cores
    python bench/fixed_shape.py               # the demo's UNet, N = 4000, q*N = 1000, P = 125 (~10 min)

Both variants run THE step (dpldm.parallel.step.run_logical_step over a DPStep) on the same model,
synthetic latents and Poisson plan, alternating step by step so machine load hits both alike; the
fixed shape pads every step to the public `num_chunks x rows` slots (dpldm.privacy.fixed_shape).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic) if len(set(a)) > 1 and len(set(b)) > 1 else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.toml"))
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    p.add_argument("--num-examples", type=int, default=4000)
    p.add_argument("--expected-batch", type=int, default=1000)
    p.add_argument("--physical", type=int, default=125)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    import torch

    from dpldm.config import load_config
    from dpldm.diffusion.schedule import DiffusionSchedule
    from dpldm.models.selection import apply_finetune
    from dpldm.models.unet import UNet
    from dpldm.parallel.step import run_logical_step
    from dpldm.privacy.accountant import PrivacyLedger
    from dpldm.privacy.dp_step import DPStep
    from dpldm.privacy.fixed_shape import plan_fixed_shape
    from dpldm.privacy.noise import GaussianNoise
    from dpldm.train.dp_loss import ChunkBatch, DiffusionDPLoss
    from dpldm.train.private_data import latent_shape

    sets = ["privacy.backend=\"torch\"", "diffusion.cond_drop_prob=0.0"]
    if args.quick:
        sets += ["unet.model_channels=16", "unet.channel_mult=[1, 2]", "unet.attention_levels=[1]", "unet.num_heads=2",
                 "unet.context_dim=16", "autoencoder.latent_channels=2", "unet.in_channels=2", "data.image_size=16",
                 "autoencoder.channel_mult=[1, 2]", "autoencoder.base_channels=8"]
        args.num_examples, args.expected_batch, args.physical, args.steps = 400, 40, 8, 6
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, sets)
    N, q = args.num_examples, args.expected_batch / args.num_examples
    torch.manual_seed(0)
    unet = UNet(cfg.unet).eval()
    apply_finetune(unet, cfg.train.finetune)
    shape = latent_shape(cfg)
    g = torch.Generator().manual_seed(1)
    xs, ys = torch.randn((N, *shape), generator=g), torch.randint(0, cfg.data.num_classes, (N,), generator=g)
    loss = DiffusionDPLoss(DiffusionSchedule.from_config(cfg.diffusion), scale_factor=1.0,
                           timesteps_per_example=cfg.diffusion.timesteps_per_example, cond_drop_prob=0.0, seed=5,
                           device=torch.device("cpu"))
    fs = plan_fixed_shape(N, q, cfg.privacy.steps, cfg.privacy.epsilon or 10.0, cfg.privacy.delta, args.physical)
    variants = {}
    for name, fixed in (("today", None), ("fixed-shape", fs)):
        ledger = PrivacyLedger.create(num_examples=N, sample_rate=q, max_grad_norm=1e-3, delta=cfg.privacy.delta,
                                      noise_multiplier=1.0, seed=1234)
        dp = DPStep(unet, loss, ledger, noise=GaussianNoise(seed=5), backend="torch", physical_batch_size=args.physical,
                    acc_dtype=torch.float64, fixed_shape=fixed)
        variants[name] = {"dp": dp, "seconds": [], "sizes": []}
    print(f"[fixed_shape] N={N}, q*N={q * N:g}, P={args.physical}: fixed shape {fs.num_chunks} chunks x {fs.rows} = "
          f"{fs.num_chunks * fs.rows} slots ({fs.num_chunks * fs.rows / (q * N):.3f}x q*N), truncation p={fs.truncation_probability:.2g}"
          f"/step; {args.steps} timed steps each, alternating, {args.threads} threads", flush=True)
    for k in range(args.steps + 1):  # the first of each is a warm-up
        for name, v in variants.items():
            dp = v["dp"]

            def load(idx, dp=dp):
                return ChunkBatch(xs[idx], ys[idx], idx, dp.step_index)
            t0 = time.perf_counter()
            counts = run_logical_step(dp, load)
            dt = time.perf_counter() - t0
            if k:
                v["seconds"].append(dt)
                v["sizes"].append(counts["global"])
    rows = {}
    for name, v in variants.items():
        rows[name] = {"median_s": statistics.median(v["seconds"]), "seconds": v["seconds"], "sizes": v["sizes"],
                      "spearman_time_vs_batch": spearman(v["seconds"], v["sizes"])}
    ratio = rows["fixed-shape"]["median_s"] / rows["today"]["median_s"]
    print("| variant | median s / step | ratio | Spearman(time, |S|) |\n|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['median_s']:.3f} | {r['median_s'] / rows['today']['median_s']:.3f} | "
              f"{r['spearman_time_vs_batch']:.2f} |")
    print(f"[fixed_shape] overhead {ratio:.3f}x (slots / expected batch {fs.num_chunks * fs.rows / (q * N):.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"fixed_shape": fs.to_dict(), "rows": rows, "ratio": ratio,
                                               "num_examples": N, "expected_batch": q * N, "physical": args.physical},
                                              indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
