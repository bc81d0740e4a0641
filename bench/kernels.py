"""Benchmark of the per-example norm + clipped-sum kernels on attention-projection shapes.

    python bench/kernels.py [--quick] [--json PATH|-] [--device cpu|cuda] [--dtype fp32 bf16] [--reps N]

For every case (B in {64,256}, T in {64,256,1024}, d = d_in = d_out in {128,320,640}; --quick:
B=64, T in {64,256}, d in {128,320}) and every available backend it times
  norm    per_example_sqnorm_linear, methods fused and ghost (torch: materialize and ghost)
  csum    clipped_sum_linear
and the baseline that materialises per-example gradients: stack = bmm(G^T, A) (B,d_out,d_in),
norms = stack^2 summed, clipped sum = einsum(coef, stack). Ratios are against that baseline and
against the torch reference of the same op.

Peak memory, two ways, both reported:
  analytic  bytes of the op's largest intermediates (formulas below; for the C++ ops the
            extension reports its own workspace).
  measured  CPU: the rise of the process's resident-set high-water mark over the op
            (/proc/self/clear_refs "5" resets VmHWM; VmHWM - VmRSS before). glibc is made to
            mmap every block >= 128 KiB (MALLOC_MMAP_THRESHOLD_, set by re-executing this
            script) so freed buffers leave the RSS and each op's own allocations are seen.
            Resolution: pages (4 KiB); inputs are allocated before and excluded; outputs are
            included. tracemalloc does not see torch's allocator and is not used.
            CUDA: torch.cuda.max_memory_allocated() - memory_allocated() before the op.
On CUDA it also reports the achieved FLOP rate and the bandwidth of reading A and G once
against the chip's peaks (--peak-tflops / --peak-gbps; defaults for a few known GPUs).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import subprocess
import sys
import time

_MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"
if sys.platform.startswith("linux") and os.environ.get(_MMAP_ENV) is None and __name__ == "__main__":
    os.environ[_MMAP_ENV] = "131072"  # see the docstring: freed blocks go back to the OS
    os.execv(sys.executable, [sys.executable] + sys.argv)

import torch  # noqa: E402

import dpldm.kernels as K  # noqa: E402
from dpldm.kernels import dispatch  # noqa: E402

FULL = [(B, T, d) for B in (64, 256) for T in (64, 256, 1024) for d in (128, 320, 640)]
QUICK = [(64, T, d) for T in (64, 256) for d in (128, 320)]
# (dense fp32 non-tensor TFLOP/s, bf16 dense tensor TFLOP/s, HBM GB/s) from vendor data sheets
PEAKS = {"H200": (67.0, 989.0, 4800.0), "H100": (67.0, 989.0, 3350.0), "A100": (19.5, 312.0, 2039.0)}


# ---- memory ----------------------------------------------------------------------------------------
def _status() -> tuple[int, int]:
    s = open("/proc/self/status").read()
    hwm = int(re.search(r"VmHWM:\s+(\d+)", s).group(1)) * 1024
    rss = int(re.search(r"VmRSS:\s+(\d+)", s).group(1)) * 1024
    return hwm, rss


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_peak(fn, device: torch.device) -> int | None:
    """Peak extra bytes while running fn once (outputs included, inputs excluded)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return peak
    if not _can_reset_hwm():
        return None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    _, rss0 = _status()
    out = fn()
    hwm, _ = _status()
    del out
    gc.collect()
    return max(0, hwm - rss0)


def time_it(fn, device: torch.device, reps: int, budget_s: float) -> float:
    """Median seconds per call after one warm-up; stops early when over budget."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    fn()
    sync()
    ts = []
    start = time.perf_counter()
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    ts.sort()
    return ts[len(ts) // 2]


# ---- ops ----------------------------------------------------------------------------------------------
def materialize_pipeline(A, G, coef):
    stack = torch.bmm(G.transpose(1, 2), A)  # (B, d_out, d_in): the per-example gradients
    norms = stack.pow(2).sum(dim=(1, 2))
    W = torch.einsum("b,boi->oi", coef, stack)
    return norms, W


def analytic_bytes(op: str, backend: str, method: str, B: int, T: int, d: int, elem: int) -> int:
    f32 = 4
    if op == "baseline":
        return B * d * d * f32 * 2 + d * d * f32 + B * f32  # stack and its square, W, norms
    if op == "norm":
        if backend == "torch":
            if method == "materialize":
                return B * d * d * f32 * 2 + B * f32  # stack and its square
            tile = min(T, 256)  # kernels/linear.py GHOST_BLOCK
            return 3 * B * tile * T * f32 + B * f32  # two Gram slabs and their product
        if backend == "cpp":
            ext = dispatch.cpp_ext()
            ws = ext.fused_workspace_bytes(T, d, d, f32) if method == "fused" else ext.ghost_workspace_bytes(T, d, d, f32)
            return ws + B * f32
        if backend in ("triton", "cuda"):
            if method == "fused":
                tiles = -(-d // (64 if backend == "triton" else 32)) ** 2
            else:
                bs = 64 if backend == "triton" else 32
                nt = -(-T // bs)
                tiles = nt * (nt + 1) // 2
            return B * tiles * f32 + B * f32  # per-tile partials + output
    if op == "csum":
        if backend == "torch":
            return B * T * d * f32 + d * d * f32  # the scaled copy c*G and W
        if backend == "cpp":
            return dispatch.cpp_ext().clipped_sum_workspace_bytes(d, d, f32) + d * d * f32
        return 2 * d * d * f32  # split partials (at least one) + W
    raise ValueError(op)


def gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else ""


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_case(B, T, d, device, backends, reps, budget, peaks, dtype=torch.float32):
    g = torch.Generator().manual_seed(B * 1000 + T + d)
    A = torch.randn(B, T, d, generator=g).to(device=device, dtype=dtype)
    G = torch.randn(B, T, d, generator=g).to(device=device, dtype=dtype)
    dt = str(dtype).replace("torch.", "")
    peak_flops = None if not peaks else (peaks[0] if dtype == torch.float32 else peaks[1])
    coef = torch.rand(B, generator=g).to(device)
    rows = []

    def record(op, backend, method, fn, flops):
        t = time_it(fn, device, reps, budget)
        mem = measure_peak(fn, device)
        row = {"B": B, "T": T, "d": d, "dtype": dt, "op": op, "backend": backend, "method": method, "time_s": t,
               "peak_bytes_measured": mem, "peak_bytes_analytic": analytic_bytes(op, backend, method, B, T, d, 4),
               "gflops": flops / t / 1e9}
        if device.type == "cuda" and peaks:
            row["frac_peak_flops"] = flops / t / (peak_flops * 1e12)
            row["gbps_read_AG"] = (A.numel() + G.numel()) * A.element_size() / t / 1e9
            row["frac_peak_bw"] = row["gbps_read_AG"] * 1e9 / (peaks[2] * 1e9)
        rows.append(row)

    mat_flops = 2.0 * B * T * d * d
    ghost_flops = 2.0 * B * T * T * (2 * d) / 2  # upper-triangle tiles of both Grams
    record("baseline", "torch", "materialize-all", lambda: materialize_pipeline(A, G, coef), 2 * mat_flops)
    for backend in backends:
        methods = ("materialize", "ghost") if backend == "torch" else ("fused", "ghost")
        for m in methods:
            record("norm", backend, m, lambda m=m, b=backend: K.per_example_sqnorm_linear(A, G, method=m, backend=b),
                   ghost_flops if m == "ghost" else mat_flops)
        record("csum", backend, "-", lambda b=backend: K.clipped_sum_linear(A, G, coef, backend=b), mat_flops)
    return rows  # the inputs are freed with this frame


def summarise(rows):
    """Add ratios vs the torch reference of the same op and vs the materialising baseline."""
    by_case = {}
    for r in rows:
        by_case.setdefault((r["B"], r["T"], r["d"], r.get("dtype")), []).append(r)
    for case_rows in by_case.values():
        base = next(r for r in case_rows if r["op"] == "baseline")
        ref_norm = next(r for r in case_rows if r["op"] == "norm" and r["backend"] == "torch" and r["method"] == "materialize")
        ref_csum = next(r for r in case_rows if r["op"] == "csum" and r["backend"] == "torch")
        for r in case_rows:
            ref = ref_norm if r["op"] == "norm" else ref_csum if r["op"] == "csum" else base
            r["time_vs_torch_ref"] = r["time_s"] / ref["time_s"]
            r["time_vs_materialize_all"] = r["time_s"] / base["time_s"]
            for kind in ("measured", "analytic"):
                k = f"peak_bytes_{kind}"
                if r[k] is not None and ref[k]:
                    r[f"mem_{kind}_vs_torch_ref"] = r[k] / ref[k]
                if r[k] is not None and base[k]:
                    r[f"mem_{kind}_vs_materialize_all"] = r[k] / base[k]
    return rows


def fmt_bytes(n):
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def print_table(rows):
    hdr = (f"{'B':>4} {'T':>5} {'d':>4} {'dtype':<8} {'op':<8} {'backend':<7} {'method':<15} {'time ms':>9} {'GFLOP/s':>8} "
           f"{'t/ref':>6} {'t/mat':>6} {'peak meas':>10} {'peak anal':>10} {'m/mat':>7}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        mm = r.get("mem_measured_vs_materialize_all")
        print(f"{r['B']:>4} {r['T']:>5} {r['d']:>4} {r['dtype']:<8} {r['op']:<8} {r['backend']:<7} {r['method']:<15} "
              f"{r['time_s'] * 1e3:>9.2f} {r['gflops']:>8.1f} {r['time_vs_torch_ref']:>6.2f} "
              f"{r['time_vs_materialize_all']:>6.2f} {fmt_bytes(r['peak_bytes_measured']):>10} "
              f"{fmt_bytes(r['peak_bytes_analytic']):>10} {('%.4f' % mm) if mm is not None else 'n/a':>7}")


def fused_memory_scaling(device, backends):
    """Extra memory of the C++ fused norm vs B at fixed T, d: O(B + tile), not O(B*d^2)."""
    if "cpp" not in backends or device.type != "cpu":
        return []
    out = []
    T, d = 64, 640
    for B in (16, 64, 256):
        A, G = torch.randn(B, T, d), torch.randn(B, T, d)
        K.per_example_sqnorm_linear(A, G, method="fused", backend="cpp")
        meas = measure_peak(lambda: K.per_example_sqnorm_linear(A, G, method="fused", backend="cpp"), device)
        out.append({"B": B, "T": T, "d": d, "measured_bytes": meas,
                    "workspace_bytes": dispatch.cpp_ext().fused_workspace_bytes(T, d, d, 4) + 4 * B,
                    "per_example_stack_bytes": B * d * d * 4})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small subset (< 1 min on CPU)")
    ap.add_argument("--json", metavar="PATH", help="write results as JSON to PATH ('-' for stdout)")
    from dpldm.utils.device import add_device_argument, resolve_device

    add_device_argument(ap)
    ap.add_argument("--dtype", nargs="+", choices=("fp32", "bf16", "fp16"), default=None,
                    help="input dtypes (default fp32 on CPU, fp32 and bf16 on CUDA)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--budget", type=float, default=2.0, help="seconds per op timing before stopping early")
    ap.add_argument("--cases", help="comma list of BxTxd, e.g. 64x256x320,256x64x640 (overrides the grid)")
    ap.add_argument("--peak-tflops", type=float, help="chip peak TFLOP/s for the fraction-of-peak columns")
    ap.add_argument("--peak-gbps", type=float, help="chip peak memory bandwidth GB/s")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    dtypes = [{"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[d]
              for d in (args.dtype or (["fp32", "bf16"] if device.type == "cuda" else ["fp32"]))]
    if args.cases:
        cases = [tuple(int(v) for v in c.split("x")) for c in args.cases.split(",")]
    else:
        cases = QUICK if args.quick else FULL
    backends = [b for b in ("torch", "cpp", "triton", "cuda") if dispatch.why_unavailable(b, device) is None]
    if device.type == "cpu" and "triton" in backends:
        backends.remove("triton")  # the interpreter is a test tool, far too slow to benchmark
    skipped = {b: dispatch.why_unavailable(b, device) for b in ("cpp", "triton", "cuda") if b not in backends}
    if device.type == "cpu" and "triton" in skipped and skipped["triton"] is None:
        skipped["triton"] = "Triton interpreter (TRITON_INTERPRET=1) is not benchmarked"
    peaks = None
    if device.type == "cuda":
        name = gpu_name()
        known = next((v for k, v in PEAKS.items() if k in name), None)
        peaks = (args.peak_tflops or (known[0] if known else float("nan")),  # fp32 (CUDA cores, no TF32)
                 args.peak_tflops or (known[1] if known else float("nan")),  # bf16/fp16 tensor cores
                 args.peak_gbps or (known[2] if known else float("nan")))
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": str(device), "gpu": gpu_name(), "cpu": cpu_name(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "host": platform.node(), "backends": backends, "skipped": skipped,
        "memory_method": ("torch.cuda.max_memory_allocated delta" if device.type == "cuda" else
                          "VmHWM rise after /proc/self/clear_refs reset, glibc mmap threshold 128 KiB"),
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    try:
        meta["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                     cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        pass
    print(f"# kernels benchmark {meta['date']} on {device} ({meta['gpu'] or meta['cpu']}, {meta['threads']} threads), "
          f"backends {backends}; skipped {skipped}", flush=True)
    t0 = time.time()
    rows = []
    for dtype in dtypes:
        for (B, T, d) in cases:
            rows += run_case(B, T, d, device, backends, args.reps, args.budget, peaks, dtype)
            print(f"#   case B={B} T={T} d={d} {dtype} done ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    rows = summarise(rows)
    print_table(rows)
    scaling = fused_memory_scaling(device, backends)
    if scaling:
        print("\n# C++ fused norm: extra memory vs B (T=64, d=640)")
        for s in scaling:
            print(f"  B={s['B']:>4}: measured {fmt_bytes(s['measured_bytes']):>10}, workspace+output "
                  f"{fmt_bytes(s['workspace_bytes']):>10}, per-example stack would be {fmt_bytes(s['per_example_stack_bytes'])}")
    meta["wall_s"] = time.time() - t0
    print(f"# total {meta['wall_s']:.1f} s")
    if args.json:
        payload = json.dumps({"meta": meta, "rows": rows, "fused_memory_scaling": scaling}, indent=1)
        if args.json == "-":
            print(payload)
        else:
            with open(args.json, "w") as f:
                f.write(payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
