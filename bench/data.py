"""Data benchmark: Poisson-sampled reads from 100k-example latent shards.

Builds N latent examples (4x8x8 float32, random, labels 0..9) as webdataset shards in a temporary
folder (in a child process, so the build's memory does not count), then reads Poisson logical
batches (q = 0.16: 16k expected examples) through `PrivateIndexedDataset` (wids, random access)
and `PoissonBatchLoader` in physical chunks, and reports examples/s and memory. Memory is read
from /proc/self/status after every chunk: RssAnon (the process's own allocations) shows the
dataset is not loaded whole; RssFile counts the memory-mapped shard pages the reads touched
(page cache, shared and reclaimable, and bounded by the wids LRU of open shards).

    .venv/bin/python bench/data.py            # N=100000, 5 steps (a few minutes on 2 cores)
    .venv/bin/python bench/data.py --quick    # N=20000, 3 steps
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

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
LATENT_SHAPE = (4, 8, 8)  # --latent-shape overrides


def build(out: Path, n: int, shard_size: int, seed: int = 0) -> None:
    """Write n random latents as a latent shard folder (same writer as `dpldm data encode`)."""
    from dpldm.data.codec import SampleSpec
    from dpldm.data.shards import FolderWriter

    fp = {"kind": "latents", "format": "npy", "bench": True, "num_examples": n, "seed": seed}
    w = FolderWriter(out, fp)
    starts = list(range(0, n, shard_size))
    for k, start in enumerate(starts):
        stop = min(n, start + shard_size)
        rng = np.random.default_rng([seed, k])
        z = rng.standard_normal((stop - start, *LATENT_SHAPE), dtype=np.float32)
        y = rng.integers(0, 10, stop - start)
        if not w.is_done(k, stop - start):
            w.write(k, start, z, y, "npy")
    w.finish(len(starts), SampleSpec("npy", LATENT_SHAPE, "float32", 10), "latents",
             {"source": "bench-random", "split": "train", "num_classes": 10, "autoencoder_sha256": "bench"})


def mem() -> dict[str, float]:
    """MiB: VmRSS, RssAnon, RssFile, VmHWM (peak RSS) of this process."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(val.split()[0]) / 1024
    return out


def read(folder: Path, q: float, steps: int, physical: int, seed: int, lru: int) -> dict:
    import torch

    from dpldm.data.loaders import PoissonBatchLoader, PrivateIndexedDataset
    from dpldm.privacy.sampler import PoissonPlan

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    ds = PrivateIndexedDataset(folder, expected_ae_hash="bench", verify="sha256", lru_size=lru)
    plan = PoissonPlan(len(ds), q, seed=seed)
    loader = PoissonBatchLoader(ds, plan, physical_batch_size=physical)
    base = mem()
    open_s = time.perf_counter() - t0
    peak = dict(base)
    per_step = []
    for step in range(steps):
        t = time.perf_counter()
        n = 0
        for x, y in loader.chunks(step):  # x (B, 4, 8, 8) float32, y (B,) int64
            n += y.numel()
            m = mem()
            peak = {k: max(peak[k], m[k]) for k in peak}
        dt = time.perf_counter() - t
        assert n == plan.indices(step).numel()
        per_step.append({"step": step, "examples": n, "seconds": round(dt, 3), "examples_per_s": round(n / dt)})
        print(f"step {step}: {n} examples in {dt:.2f}s ({n / dt:,.0f}/s); RSS {m['VmRSS']:.0f} MiB "
              f"(anon {m['RssAnon']:.0f}, file {m['RssFile']:.0f})", file=sys.stderr)
    total_n = sum(s["examples"] for s in per_step)
    total_t = sum(s["seconds"] for s in per_step)
    # the first touch of each shard pays its sha256 check; steady state excludes step 0
    steady = per_step[1:] or per_step
    return {"open_seconds": round(open_s, 3), "steps": per_step,
            "examples_per_s_all": round(total_n / total_t),
            "examples_per_s_steady": round(sum(s["examples"] for s in steady) / sum(s["seconds"] for s in steady)),
            "mem_after_open_MiB": {k: round(v, 1) for k, v in base.items()},
            "mem_peak_MiB": {k: round(v, 1) for k, v in peak.items()},
            "anon_growth_MiB": round(peak["RssAnon"] - base["RssAnon"], 1),
            "ru_maxrss_MiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N=20000, 3 steps")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--q", type=float, default=0.16)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--shard-size", type=int, default=10_000)
    ap.add_argument("--physical", type=int, default=4096, help="physical chunk size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--latent-shape", default="4,8,8", help="C,h,w of each latent (default 4,8,8)")
    ap.add_argument("--lru", type=int, default=None, help="shards kept open by wids (default: all, up to 64)")
    ap.add_argument("--dir", default=None, help="keep shards here instead of a temporary folder")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    global LATENT_SHAPE
    LATENT_SHAPE = tuple(int(v) for v in args.latent_shape.split(","))
    n = args.n or (20_000 if args.quick else 100_000)
    steps = args.steps or (3 if args.quick else 5)
    if args.build_only:
        build(Path(args.dir), n, args.shard_size)
        return 0
    with tempfile.TemporaryDirectory(prefix="dpldm-bench-data-") as tmp:
        folder = Path(args.dir or tmp) / "latents"
        t = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--build-only", "--dir", str(folder), "--n", str(n),
                        "--shard-size", str(args.shard_size), "--latent-shape", args.latent_shape], check=True)
        build_s = time.perf_counter() - t
        disk = sum(p.stat().st_size for p in folder.glob("shard-*.tar"))
        print(f"built {n} latents {LATENT_SHAPE} in {build_s:.1f}s: {disk / 2**20:.0f} MiB of shards "
              f"({n * int(np.prod(LATENT_SHAPE)) * 4 / 2**20:.0f} MiB of float32)", file=sys.stderr)
        res = read(folder, args.q, steps, args.physical, args.seed, args.lru)
    res = {"n": n, "latent_shape": list(LATENT_SHAPE), "q": args.q, "expected_batch": args.q * n,
           "physical_batch": args.physical, "lru_shards": args.lru, "shard_size": args.shard_size, "build_seconds": round(build_s, 1),
           "shards_MiB": round(disk / 2**20, 1), "raw_float32_MiB": round(n * int(np.prod(LATENT_SHAPE)) * 4 / 2**20, 1),
           "cpu": os.cpu_count(), **res}
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
