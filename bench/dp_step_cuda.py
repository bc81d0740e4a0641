"""The CUDA path of `bench/dp_step.py` (its --device cuda, or --inprocess as a CPU dry run): every
variant in one process, one after another on a fresh copy of the model; time = median wall time per
step (torch.cuda.synchronize around each) after 2 warm-up steps; memory = max_memory_allocated over
the timed steps minus the memory allocated before them; the table against the chip's FLOP bound and
the issue's targets. The models, the variants' steps and the doc writer are shared with
bench/dp_step.py (run that script; this module has no command line of its own).
"""
from __future__ import annotations

import copy
import json
import statistics
import sys
import time

from bench.dp_step_parts import (DOC, GPU_SECTION, MODELS, ROOT, _build, _engine_report, _loss_fn, _maxrss_mb,
                                 _replace_section, _sync, flops_per_example, make_step)

PAPER_GFLOP = 37.4  # the figure for the CelebA64 UNet; the counted value is checked against it


# ----------------------------------------------------------------------------------------------
# CUDA: every variant in this process, on a fresh copy of the model
# ----------------------------------------------------------------------------------------------
def measure_inprocess(model: str, batch: int, precision: str, variants, steps: int, device, log) -> dict[str, dict]:
    """Every variant in this process (CUDA; on CPU only as a dry run of this code path)."""
    import gc

    import torch

    cfg, base, schedule, data, _ = _build(batch, MODELS[model], device)
    loss_fn = _loss_fn(schedule, data, precision)
    out: dict[str, dict] = {}
    for v in variants:
        unet = copy.deepcopy(base)
        extra: dict = {}
        res = {"variant": v, "model": model, "batch": batch, "precision": precision}
        try:
            step = make_step(v, unet, loss_fn, batch, device, extra)
            for _ in range(2):  # warm-up: compilation, autotuning, the selector's measurements
                step()
            _sync(device)
            gc.collect()
            cuda = device.type == "cuda"
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            base_mem = torch.cuda.memory_allocated(device) if cuda else _maxrss_mb() * 2**20
            times, clips = [], []
            for _ in range(steps):
                if "clip_time" in extra:
                    extra["clip_time"][0] = 0.0
                _sync(device)
                t0 = time.perf_counter()
                step()
                _sync(device)
                times.append(time.perf_counter() - t0)
                if "clip_time" in extra:
                    clips.append(extra["clip_time"][0])
            res.update(step_time_s=statistics.median(times), step_times_s=times,
                       peak_mem_mb=((torch.cuda.max_memory_allocated(device) if cuda else _maxrss_mb() * 2**20)
                                    - base_mem) / 2**20,
                       ex_per_s=batch / statistics.median(times))
            if clips:
                res["clip_phase_s"] = statistics.median(clips)
            _engine_report(extra, res)
            log(f"  {model} b={batch} {precision} {v:15s} {1e3 * res['step_time_s']:8.2f} ms  "
                f"+{res['peak_mem_mb']:.0f} MiB  {res['ex_per_s']:.0f} ex/s")
        except Exception as e:  # noqa: BLE001 - one failing variant must not hide the others
            res["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            log(f"  {model} b={batch} {precision} {v:15s} FAILED {res['error']}")
        out[v] = res
        del unet, extra
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def default_peak_tflops(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tf in (("H200", 790.0), ("H100", 790.0), ("A100", 312.0)):
        if key in name:
            return tf
    return None


def gpu_variants(device) -> list[str]:
    from dpldm.kernels import dispatch

    out = ["nonprivate", "dpldm", "dpldm_measured", "dpldm_nogroup"]
    singles = ("torch", "triton", "cuda") if device.type == "cuda" else ("torch", "cpp")
    out += [f"dpldm_{b}" for b in singles if dispatch.why_unavailable(b, device) is None]
    return out + ["opacus_hooks", "opacus_ghost"]


def gpu_table(rows: list[dict], flops: dict[str, float], peak_tflops: float | None) -> list[str]:
    lines = ["| model | batch | precision | variant | step ms | x non-private | peak MiB | ex/s | of bound |",
             "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    by = {(r["model"], r["batch"], r["precision"], r["variant"]): r for r in rows}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['batch']} | {r['precision']} | {r['variant']} | failed: "
                         f"{r['error'][:80]} | | | | |")
            continue
        np_ = by.get((r["model"], r["batch"], r["precision"], "nonprivate"), {})
        ratio = f"{r['step_time_s'] / np_['step_time_s']:.2f}" if "step_time_s" in np_ else "-"
        bound = peak_tflops * 1e12 / flops[r["model"]] if peak_tflops else None
        frac = f"{100 * r['ex_per_s'] / bound:.1f}%" if bound else "-"
        lines.append(f"| {r['model']} | {r['batch']} | {r['precision']} | {r['variant']} | "
                     f"{1e3 * r['step_time_s']:.1f} | {ratio} | {r['peak_mem_mb']:.0f} | {r['ex_per_s']:.0f} | {frac} |")
    return lines


def checks(rows: list[dict]) -> list[str]:
    """The issue's targets, evaluated on what was measured (a benchmark, not a test: reported)."""
    out = []
    by = {(r["model"], r["batch"], r["precision"], r["variant"]): r for r in rows if "error" not in r}
    for (m, b, p, v), r in by.items():
        if v != "dpldm_measured":
            continue
        np_ = by.get((m, b, p, "nonprivate"))
        singles = [by[k]["step_time_s"] for k in by if k[:3] == (m, b, p) and k[3] in
                   ("dpldm_torch", "dpldm_triton", "dpldm_cuda", "dpldm_cpp")]
        if singles:
            out.append(f"{m} b={b} {p}: measured auto {r['step_time_s'] / min(singles):.3f}x the best single backend "
                       "(target <= 1.05)")
        if np_:
            out.append(f"{m} b={b} {p}: measured auto {r['step_time_s'] / np_['step_time_s']:.2f}x non-private "
                       f"(targets: celeba64 bf16 <= 1.15, demo <= 1.25)")
        hooks = by.get((m, b, "fp32", "opacus_hooks"))
        if hooks and p == "bf16":
            out.append(f"{m} b={b}: bf16 measured auto {hooks['step_time_s'] / r['step_time_s']:.2f}x faster than "
                       "Opacus hooks fp32 (target >= 3 for celeba64); "
                       f"{r['ex_per_s']:.0f} ex/s (target >= 8000 for celeba64)")
    return out


def main_cuda(args, device, log) -> int:
    import torch

    from dpldm.utils.device import describe_device

    models = args.model or ["demo", "celeba64"]
    precisions = args.precision or ["fp32", "bf16"]
    steps = args.steps or (3 if args.quick else 10)
    variants = args.variants or gpu_variants(device)
    if args.quick and args.variants is None:  # keep (c) of bench/gpu_check.sh short
        variants = [v for v in variants if v not in ("dpldm_torch", "dpldm_cuda", "dpldm_nogroup")]
    peak = args.peak_tflops or default_peak_tflops(device)
    flops = {m: flops_per_example(MODELS[m]) for m in models}
    log(f"device {describe_device(device)}, torch {torch.__version__}, peak {peak} TFLOP/s for the bound")
    for m, f in flops.items():
        log(f"  {m}: {f / 1e9:.2f} GFLOP per example (fwd + bwd, frozen weights), bound "
            f"{peak * 1e12 / f if peak else float('nan'):.0f} ex/s")
    if "celeba64" in flops and abs(flops["celeba64"] / 1e9 - PAPER_GFLOP) > 0.05 * PAPER_GFLOP:
        log(f"WARNING: counted {flops['celeba64'] / 1e9:.2f} GFLOP/example for celeba64, the issue says {PAPER_GFLOP}")
    rows = []
    for m in models:
        batches = args.batches or ([256] if m == "demo" else [32]) if args.quick else (
            args.batches or ([256, 1024] if m == "demo" else [32, 64]))
        for b in batches:
            for p in precisions:
                rows += list(measure_inprocess(m, b, p, variants, steps, device, log).values())
    table = gpu_table(rows, flops, peak)
    notes = checks(rows)
    print("\n".join(table + [""] + notes), flush=True)
    if args.doc:
        lines = [GPU_SECTION, "", f"`python bench/dp_step.py --device cuda {' '.join(sys.argv[1:])}` on "
                 f"{describe_device(device)}, torch {torch.__version__}; {steps} timed steps after 2 warm-up steps; "
                 "peak = max_memory_allocated over the timed steps minus memory before them; FLOPs per example "
                 f"counted with FlopCounterMode ({', '.join(f'{m} {f / 1e9:.2f} GFLOP' for m, f in flops.items())}); "
                 f"bound = {peak} TFLOP/s / FLOPs per example.", ""] + table + [""] + [f"- {n}" for n in notes] + [""]
        _replace_section(GPU_SECTION, lines)
        log(f"wrote the '{GPU_SECTION}' section of {DOC.relative_to(ROOT)}")
    if args.json:
        print(json.dumps({"device": describe_device(device), "flops_per_example": flops, "peak_tflops": peak,
                          "rows": rows, "checks": notes}))
    failed = [r for r in rows if "error" in r and r["variant"].startswith(("dpldm", "nonprivate"))]
    return 1 if failed else 0
