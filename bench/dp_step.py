"""Benchmark one DP-SGD step on the demo UNet with attention fine-tuning, side by side:

    nonprivate    loss.mean().backward(); AdamW step
    dpldm         DPStep: book-keeping clipping (one forward, one backward), one noise draw, AdamW
    opacus_hooks  Opacus 1.6 GradSampleModule (hooks: per-example grads materialised) + DPOptimizer
    opacus_ghost  Opacus 1.6 ghost clipping (two backward passes) + DPOptimizerFastGradientClipping

    python bench/dp_step.py --quick --json    # batch 64, one round: ONE JSON object on stdout
    python bench/dp_step.py                   # physical batch 64 and 256, writes docs/benchmarks.md

Every variant runs in a fresh subprocess (same model, data, seed, thread count), so peak memory
is that process's own: peak_mem_mb = peak RSS (ru_maxrss) minus the RSS just before the first
step (model, optimizer and batch already built): the memory the step itself needs on top of the
model. Step time = median over the timed steps after one warm-up step of the process's CPU time
(user + system; one thread, so on an idle machine it equals wall time, and on a machine shared
with other jobs it leaves out the time the scheduler gave to them); wall time is reported beside
it. With several rounds the variants are interleaved and the fastest round's median is kept.
The same per-example loss (dpldm.diffusion.loss.per_example_loss, K=1, fixed t and noise) feeds
every variant; clip norm C=1, sigma=1.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("nonprivate", "dpldm", "opacus_hooks", "opacus_ghost")
DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "## DP step"


# ----------------------------------------------------------------------------------------------
# child: one variant, one process
# ----------------------------------------------------------------------------------------------

def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _build(batch: int, config: str):
    import torch

    from dpldm.config import load_config
    from dpldm.diffusion.schedule import DiffusionSchedule
    from dpldm.models.selection import apply_finetune
    from dpldm.models.unet import UNet

    cfg = load_config(ROOT / config)
    torch.manual_seed(0)
    unet = UNet(cfg.unet)
    with torch.no_grad():  # a pretrained-like model: no zero-initialised outputs, so gradients flow
        for p in unet.parameters():
            if p.dim() > 1 and float(p.abs().max()) == 0:
                p.normal_(0, 0.02)
    trainable = apply_finetune(unet, cfg.train.finetune)
    schedule = DiffusionSchedule.from_config(cfg.diffusion)
    f = cfg.autoencoder.downsample_factor
    h = cfg.data.image_size // f
    g = torch.Generator().manual_seed(1)
    data = {
        "z0": torch.randn(batch, cfg.unet.in_channels, h, h, generator=g),
        "y": torch.randint(0, cfg.data.num_classes, (batch,), generator=g),
        "t": torch.randint(0, cfg.diffusion.timesteps, (batch,), generator=g),
        "noise": torch.randn(batch, cfg.unet.in_channels, h, h, generator=g),
    }
    return cfg, unet, schedule, data, trainable


def _loss_fn(schedule, data):
    from dpldm.diffusion.loss import per_example_loss

    def loss_fn(model, idx):  # idx: indices into the fixed batch -> (B,)
        return per_example_loss(model, data["z0"][idx], data["y"][idx], schedule, K=1, t=data["t"][idx],
                                noise=data["noise"][idx])
    return loss_fn


def run_child(variant: str, batch: int, steps: int, threads: int, config: str) -> dict:
    import torch

    torch.set_num_threads(threads)
    cfg, unet, schedule, data, trainable = _build(batch, config)
    loss_fn = _loss_fn(schedule, data)
    idx_all = torch.arange(batch)
    params = [p for p in unet.parameters() if p.requires_grad]
    C, sigma = 1.0, 1.0
    extra: dict = {}

    if variant == "nonprivate":
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step():
            loss_fn(unet, idx_all).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    elif variant == "dpldm":
        from dpldm.privacy import DPStep, GaussianNoise, PoissonPlan, PrivacyLedger

        # q = 1 over N = batch: the Poisson sample is the whole fixed batch (a fixed-size timing)
        ledger = PrivacyLedger(noise_multiplier=sigma, max_grad_norm=C, plan=PoissonPlan(batch, 1.0, 0), delta=1e-5)
        opt = torch.optim.AdamW(params, lr=1e-4)
        dp = DPStep(unet, loss_fn, ledger, noise=GaussianNoise(seed=0), optimizer=opt,
                    norm_method=cfg.privacy.norm_method, backend=cfg.privacy.backend)
        eng = dp.engine
        clip_time = [0.0]
        orig = eng._clip_and_sum

        def timed(*a, **k):  # norms + clipped sums (after the backward), CPU time
            t0 = time.process_time()
            out = orig(*a, **k)
            clip_time[0] += time.process_time() - t0
            return out
        eng._clip_and_sum = timed

        def step():
            idx = dp.begin_step()
            dp.accumulate(idx)
            dp.step()
        extra["clip_phase"] = clip_time

    elif variant == "opacus_hooks":
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        gsm = GradSampleModule(unet, loss_reduction="sum")  # hooks mode: per-example grads materialised
        opt = DPOptimizer(torch.optim.AdamW(params, lr=1e-4), noise_multiplier=sigma, max_grad_norm=C,
                          expected_batch_size=batch, loss_reduction="sum")
        gsm.null_class = unet.null_class

        def step():
            loss_fn(gsm, idx_all).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    elif variant == "opacus_ghost":
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

        gsm = GradSampleModuleFastGradientClipping(unet, max_grad_norm=C, use_ghost_clipping=True,
                                                   loss_reduction="sum")
        opt = DPOptimizerFastGradientClipping(torch.optim.AdamW(params, lr=1e-4), noise_multiplier=sigma,
                                              max_grad_norm=C, expected_batch_size=batch, loss_reduction="sum")
        gsm.null_class = unet.null_class

        def step():
            DPTensorFastGradientClipping(gsm, opt, loss_fn(gsm, idx_all), "sum").backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        raise SystemExit(f"unknown variant {variant!r}")

    base_rss = _rss_mb()
    times, walls = [], []
    for i in range(steps + 1):
        if "clip_phase" in extra:
            extra["clip_phase"][0] = 0.0
        c0, t0 = time.process_time(), time.perf_counter()
        step()
        dc, dt = time.process_time() - c0, time.perf_counter() - t0
        if i:  # step 0 is the warm-up
            times.append(dc)
            walls.append(dt)
            if "clip_phase" in extra:
                extra.setdefault("clip_times", []).append(extra["clip_phase"][0])
    out = {"variant": variant, "batch": batch, "threads": threads, "step_time_s": statistics.median(times),
           "step_times_s": times, "wall_time_s": statistics.median(walls),
           "peak_mem_mb": _maxrss_mb() - base_rss, "peak_rss_mb": _maxrss_mb(),
           "base_rss_mb": base_rss, "trainable_params": sum(p.numel() for p in params),
           "total_params": sum(p.numel() for p in unet.parameters())}
    if "clip_times" in extra:
        out["clip_phase_s"] = statistics.median(extra["clip_times"])
        out["norm_methods"] = dict(dp.engine.methods)
    return out


# ----------------------------------------------------------------------------------------------
# parent: interleave fresh processes
# ----------------------------------------------------------------------------------------------

def measure(batch: int, steps: int, rounds: int, threads: int, config: str, log) -> dict[str, dict]:
    best: dict[str, dict] = {}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    for r in range(rounds):
        for v in VARIANTS:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", v, "--batch", str(batch),
                   "--steps", str(steps), "--threads", str(threads), "--config", config]
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            if p.returncode != 0:
                raise SystemExit(f"bench child {v} (batch {batch}) failed:\n{p.stderr[-4000:]}")
            res = json.loads(p.stdout.strip().splitlines()[-1])
            log(f"  round {r + 1}/{rounds} batch {batch} {v:13s} step {res['step_time_s']:.3f} s cpu "
                f"({res['wall_time_s']:.3f} s wall)  "
                f"peak +{res['peak_mem_mb']:.0f} MB")
            if v not in best or res["step_time_s"] < best[v]["step_time_s"]:
                keep_mem = max(res["peak_mem_mb"], best[v]["peak_mem_mb"]) if v in best else res["peak_mem_mb"]
                best[v] = dict(res, peak_mem_mb=keep_mem)
            else:
                best[v]["peak_mem_mb"] = max(best[v]["peak_mem_mb"], res["peak_mem_mb"])
    return best


def ratios(res: dict[str, dict]) -> dict[str, float]:
    t0, m0 = res["nonprivate"]["step_time_s"], res["nonprivate"]["peak_mem_mb"]
    out = {}
    for v in VARIANTS[1:]:
        out[f"{v}_time_vs_nonprivate"] = res[v]["step_time_s"] / t0
        out[f"{v}_mem_vs_nonprivate"] = res[v]["peak_mem_mb"] / m0
    out["opacus_hooks_time_vs_dpldm"] = res["opacus_hooks"]["step_time_s"] / res["dpldm"]["step_time_s"]
    out["opacus_ghost_time_vs_dpldm"] = res["opacus_ghost"]["step_time_s"] / res["dpldm"]["step_time_s"]
    return out


def write_doc(all_res: dict[int, dict], threads: int, config: str, rounds: int, steps: int) -> None:
    any_res = next(iter(all_res.values()))
    d = any_res["dpldm"]
    lines = [SECTION, "",
             f"`python bench/dp_step.py` on the demo UNet (`{config}`, finetune `attention:all`: "
             f"{d['trainable_params']:,} of {d['total_params']:,} parameters trainable), K=1, C=1, sigma=1, "
             f"AdamW, {threads} thread(s), CPU, each variant in a fresh process; time = median process CPU time "
             f"of {steps} steps after a warm-up (wall time in parentheses), best of {rounds} interleaved rounds; memory = peak RSS minus RSS before the first "
             "step (model, optimizer and batch already built). Machine shared with other jobs: expect +-10% noise.",
             "", "| batch | variant | step time, s (wall) | x non-private | step memory (MB) | x non-private |",
             "| ---: | --- | ---: | ---: | ---: | ---: |"]
    for batch, res in all_res.items():
        t0, m0 = res["nonprivate"]["step_time_s"], res["nonprivate"]["peak_mem_mb"]
        for v in VARIANTS:
            r = res[v]
            lines.append(f"| {batch} | {v} | {r['step_time_s']:.3f} ({r['wall_time_s']:.3f}) | {r['step_time_s'] / t0:.2f} | "
                         f"{r['peak_mem_mb']:.0f} | {r['peak_mem_mb'] / m0:.2f} |")
    lines += ["", "Speed-up of dpldm over Opacus:", ""]
    for batch, res in all_res.items():
        rr = ratios(res)
        clip = res["dpldm"].get("clip_phase_s")
        share = f"; its norm + clipped-sum phase is {clip:.3f} s ({100 * clip / res['dpldm']['step_time_s']:.0f}% " \
                "of the step)" if clip is not None else ""
        lines.append(f"- batch {batch}: {rr['opacus_hooks_time_vs_dpldm']:.2f}x faster than Opacus hooks, "
                     f"{rr['opacus_ghost_time_vs_dpldm']:.2f}x faster than Opacus ghost{share}.")
    counts: dict[str, int] = {}
    for m in d.get("norm_methods", {}).values():
        counts[m] = counts.get(m, 0) + 1
    lines += ["", "Targets: dpldm <= 1.25x non-private time, <= 1.2x its memory, >= 1.3x faster than Opacus hooks.",
              "", "Where the dpldm time goes (profiled at batch 64 with `process_time` around the engine's phases): "
              "the forward + single backward with the engine's autograd Functions costs about the same as the "
              "non-private forward + backward, slightly less, because the Functions return no weight gradient "
              "(autograd skips the weight-gradient GEMMs). After the backward, the norm + clipped-sum phase "
              "(figure above) splits roughly half and half between the per-example norms and the clipped-sum "
              "GEMMs; the GEMMs are the same work the non-private backward spends on weight gradients, so the "
              "net DP overhead is the norms, plus per-layer Python dispatch (~70 Linear, 21 LayerNorm, 7 GroupNorm, "
              "1 Embedding rules), plus one fp32 noise draw. Memory overhead: the output gradients G of the "
              "trainable layers kept until all norms are known (book-keeping's price), and one fp32 accumulator.",
              "", f"Norm methods the kernels' `auto` picked (cpp backend): {json.dumps(counts)} "
              "(fused = materialised in registers for the 64-token level, ghost for the 16-token levels).", ""]
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n\n"
    start = text.find(SECTION)
    if start >= 0:  # replace only our section, up to the next "## " heading
        nxt = text.find("\n## ", start + len(SECTION))
        text = text[:start] + "\n".join(lines) + ("" if nxt < 0 else text[nxt + 1:])
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(lines)
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 64, 3 timed steps, one round")
    ap.add_argument("--json", action="store_true", help="print one JSON object (step_time_s, peak_mem_mb)")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="physical batch sizes (default 64 256)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--config", default="configs/demo.toml")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=64, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args.child, args.batch, args.steps or 3, args.threads, args.config)))
        return 0
    batches = args.batches or ([64] if args.quick else [64, 256])
    steps = args.steps or (3 if args.quick else 5)
    rounds = args.rounds or (1 if args.quick else 2)
    log = (lambda s: print(s, file=sys.stderr)) if args.json else print
    all_res = {b: measure(b, steps, rounds, args.threads, args.config, log) for b in batches}
    if not args.quick:
        write_doc(all_res, args.threads, args.config, rounds, steps)
        log(f"wrote the '{SECTION}' section of {DOC.relative_to(ROOT)}")
    first = all_res[batches[0]]
    summary = {"step_time_s": {v: first[v]["step_time_s"] for v in VARIANTS},
               "peak_mem_mb": {v: first[v]["peak_mem_mb"] for v in VARIANTS},
               "wall_time_s": {v: first[v]["wall_time_s"] for v in VARIANTS},
               "time_measure": "median process CPU time per step (1 thread)",
               "batch": batches[0], "threads": args.threads, "config": args.config,
               "ratios": ratios(first),
               "dpldm_clip_phase_s": first["dpldm"].get("clip_phase_s")}
    if len(batches) > 1:
        summary["by_batch"] = {str(b): {"step_time_s": {v: r[v]["step_time_s"] for v in VARIANTS},
                                        "peak_mem_mb": {v: r[v]["peak_mem_mb"] for v in VARIANTS},
                                        "ratios": ratios(r)} for b, r in all_res.items()}
    if args.json:
        print(json.dumps(summary))
    else:
        for k, v in summary["ratios"].items():
            print(f"  {k}: {v:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
