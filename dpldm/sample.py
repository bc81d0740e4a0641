"""`dpldm sample`: samples from an LDM model folder, as a PNG grid or as a labelled data set.

    dpldm sample --checkpoint RUN/model --classes 0,1,2 --per-class 8 --out grid.png        # grid (default)
    dpldm sample --checkpoint RUN/model --per-class 500 --format npz --out samples.npz      # for dpldm evaluate
    dpldm sample --checkpoint RUN/model --per-class 500 --format png-dir --out samples/     # CLASS/NNNNNN.png

`npz` holds `images` (uint8 (N, H, W) for one channel, (N, H, W, C) otherwise), `labels` ((N,)
int64) and `meta_json` (the sampling settings and the model's privacy report, as JSON text);
`png-dir` holds one folder per class (`3/000017.png`) and `samples.json`. Both are exactly what
`dpldm evaluate --samples` reads. Every output is written to a temporary name beside it and
renamed into place when complete: an interrupted run leaves nothing half-written, and an existing
output is only replaced with `--overwrite`, and only when `dpldm sample` wrote it (a grid PNG carries
a `dpldm: sample-grid` text chunk; an npz holds `meta_json`; a png-dir its `.dpldm-output.json`).
An output never lands on the model being read (a file inside the --checkpoint folder, or the run
folder's model/), whatever --overwrite says.

Noise: the initial latent of sample i is drawn from its own generator seeded by (--seed, i) on
the CPU, so with DDIM at eta = 0 (the default) each sample is the same whatever --batch-size or
--device; per-step noise (eta > 0, ddpm) comes from one generator per batch.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpldm.config import SAMPLERS
from dpldm.errors import UserError
from dpldm.utils.device import add_device_argument

FORMATS = ("grid", "npz", "png-dir")
DEFAULT_OUT = {"grid": "samples.png", "npz": "samples.npz", "png-dir": "samples"}
DEFAULT_PER_CLASS = 8
MAX_SEED = 2**32 - 1  # sample i's noise generator is seeded with (seed << 32) + i: both must fit 64 bits
MAX_SAMPLES = 1_000_000  # per call (1M 32x32 RGB images hold 12 GiB as float32 before they are written)
MAX_THREADS = 4096
MAX_GRID_PIXELS = 89_478_485  # PIL.Image.MAX_IMAGE_PIXELS: a larger PNG trips PIL's decompression-bomb guard
GRID_TAG = ("dpldm", "sample-grid")  # a PNG text chunk: the grid files `dpldm sample --overwrite` may replace


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="LDM model folder (or a run folder with model/)")
    parser.add_argument("--classes", default=None,
                        help="comma-separated labels, e.g. 0,1,2 (default: the private classes 0..data.num_classes-1)")
    parser.add_argument("--per-class", "--n", dest="per_class", type=int, default=None,
                        help=f"samples per class (default {DEFAULT_PER_CLASS}; the grid has one row per class)")
    parser.add_argument("--format", choices=FORMATS, default="grid",
                        help="grid: one PNG; npz / png-dir: a labelled set for `dpldm evaluate --samples`")
    parser.add_argument("--out", default=None, help="output file (grid, npz) or folder (png-dir); "
                        f"default {', '.join(f'{v} ({k})' for k, v in DEFAULT_OUT.items())}")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--steps", type=int, help="sampler steps, 1..diffusion.timesteps (default diffusion.sample_steps)")
    parser.add_argument("--eta", type=float, help="DDIM eta in [0, 1] (default diffusion.eta)")
    parser.add_argument("--guidance", type=float,
                        help="classifier-free guidance scale >= 0; 1 = conditional only (default diffusion.guidance_scale)")
    parser.add_argument("--sampler", choices=SAMPLERS, help="ddim, dpmpp-2m, unipc: diffusers' schedulers; ddpm: "
                        "ancestral over all T steps (default diffusion.sampler)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (>= 0)")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per forward batch (default 64)")
    parser.add_argument("--no-ema", action="store_true", help="sample with the raw UNet weights instead of the EMA")
    parser.add_argument("--upscale", type=int, default=2, help="pixel magnification of the grid PNG")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or progress lines on stderr")
    add_device_argument(parser)


# -- validation (before the model is loaded) --------------------------------------------------------

def parse_classes(text: str, num_classes: int) -> list[int]:
    try:
        classes = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise UserError(f"--classes {text!r}: expected comma-separated integers") from None
    if not classes:
        raise UserError("--classes: no classes given")
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise UserError(f"--classes: {bad} outside 0..{num_classes - 1} (the model has {num_classes} classes)")
    if len(set(classes)) != len(classes):
        raise UserError(f"--classes: {text!r} names a class twice")
    return classes


def check_args(args: argparse.Namespace) -> None:
    """Flag checks that need no model."""
    for flag, value in (("--eta", args.eta), ("--guidance", args.guidance)):
        if value is not None and not math.isfinite(value):
            raise UserError(f"{flag} must be a finite number, got {value}")
    if args.guidance is not None and args.guidance < 0:
        raise UserError(f"--guidance must be >= 0 (0 = unconditional, 1 = conditional only), got {args.guidance:g}")
    if args.eta is not None and not 0 <= args.eta <= 1:
        raise UserError(f"--eta must lie in [0, 1] (0 = deterministic DDIM, 1 = DDPM-like), got {args.eta:g}")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    if args.sampler not in (None, "ddim") and args.eta is not None:
        raise UserError(f"--eta applies to --sampler ddim only ({args.sampler} "
                        f"{'draws the posterior variance' if args.sampler == 'ddpm' else 'is a deterministic solver'})")
    for flag, value, low in (("--per-class", args.per_class, 1), ("--batch-size", args.batch_size, 1),
                             ("--seed", args.seed, 0), ("--upscale", args.upscale, 1), ("--threads", args.threads, 0)):
        if value is not None and value < low:
            raise UserError(f"{flag} must be >= {low}, got {value}")
    if not str(args.checkpoint).strip():
        raise UserError("--checkpoint: empty path")
    if args.seed > MAX_SEED:
        raise UserError(f"--seed must lie in [0, 2**32 - 1 = {MAX_SEED}] (sample i's noise is seeded with "
                        f"(seed << 32) + i), got {args.seed}")
    if args.per_class is not None and args.per_class > MAX_SAMPLES:
        raise UserError(f"--per-class (--n) {args.per_class}: at most {MAX_SAMPLES:,} samples per call; "
                        "sample in several calls with different --seed values")
    if args.threads > MAX_THREADS:
        raise UserError(f"--threads must lie in [0, {MAX_THREADS}] (0 = leave as is), got {args.threads}")


def written_by_sample(path: Path, fmt: str) -> bool:
    """Whether the file `path` is what `dpldm sample --format fmt` writes: a grid PNG carrying
    GRID_TAG, or an .npz holding images, labels and meta_json."""
    try:
        if fmt == "grid":
            from PIL import Image

            with Image.open(path) as im:
                return im.format == "PNG" and im.info.get(GRID_TAG[0]) == GRID_TAG[1]
        with np.load(path, allow_pickle=False) as z:
            return {"images", "labels", "meta_json"} <= set(z.files)
    except Exception:  # noqa: BLE001 - not an image or an archive at all
        return False


def check_out(args: argparse.Namespace) -> Path:
    """The output path: the right kind (file or folder), never one of the inputs (nor a file inside
    them), not already there unless --overwrite, and then only an output `dpldm sample` wrote."""
    out = Path(args.out if args.out is not None else DEFAULT_OUT[args.format])
    if not str(args.out if args.out is not None else out).strip():
        raise UserError("--out: empty path")
    for parent in out.absolute().parents:  # a file where a folder of the path must be
        if parent.exists() and not parent.is_dir():
            raise UserError(f"--out {out}: cannot create it, {parent} is a file")
    if args.format == "png-dir":
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out}: is a file, but --format png-dir writes a folder")
        from dpldm.utils.io import check_output_dir, model_inputs

        # before sampling: --overwrite replaces only a png-samples folder dpldm wrote, never an input
        check_output_dir(out, "png-samples", overwrite=args.overwrite, inputs=model_inputs(args.checkpoint))
    else:
        if out.is_dir():
            raise UserError(f"--out {out}: is a folder, but --format {args.format} writes a file")
        if args.format == "npz" and out.suffix != ".npz":
            raise UserError(f"--out {out}: --format npz needs a name ending in .npz (what dpldm evaluate reads)")
        from dpldm.utils.io import check_output_file, model_inputs

        check_output_file(out, model_inputs(args.checkpoint))  # the model's weights, a run's config.json: never
    if out.exists() and not args.overwrite:
        raise UserError(f"--out {out}: already exists; pass --overwrite to replace it")
    if out.exists() and args.format != "png-dir" and not written_by_sample(out, args.format):
        raise UserError(f"--out {out}: exists and was not written by `dpldm sample --format {args.format}`; "
                        "--overwrite only replaces an output dpldm sample wrote, never your own files: remove it "
                        "yourself or choose another path")
    return out


def check_sizes(n: int, nrow: int, image_shape: tuple[int, int, int], fmt: str, upscale: int) -> None:
    """Refuse, before sampling, outputs that cannot be held or written: more than MAX_SAMPLES
    samples, more memory than is available, a grid PNG larger than PIL reads (MAX_GRID_PIXELS)."""
    c, h, w = image_shape
    if n > MAX_SAMPLES:
        raise UserError(f"{n:,} samples requested: at most {MAX_SAMPLES:,} per call; sample in several calls "
                        "with different --seed values")
    need = n * c * h * w * 5  # float32 images while sampling + their uint8 copy
    avail = _available_memory()
    if avail is not None and need > avail:
        raise UserError(f"{n:,} samples of {c}x{h}x{w} need about {need / 2**30:.3g} GiB, more than the "
                        f"{avail / 2**30:.3g} GiB available; sample fewer per call")
    if fmt == "grid":
        rows = -(-n // nrow)
        gh, gw = (rows * (h + 2) + 2) * upscale, (nrow * (w + 2) + 2) * upscale
        if gh * gw > MAX_GRID_PIXELS:
            raise UserError(f"the grid PNG would be {gw:,}x{gh:,} pixels, above the {MAX_GRID_PIXELS:,} that PIL "
                            "opens; lower --upscale or --per-class, or write --format npz / png-dir")


def _available_memory() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not every platform has these
        return None


# -- sampling --------------------------------------------------------------------------------------

def initial_noise(seed: int, first: int, count: int, shape: tuple[int, ...]) -> torch.Tensor:
    """x_T for samples first..first+count-1, each from its own CPU generator: (count, *shape)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed((seed << 32) + i))
                        for i in range(first, first + count)])


@torch.no_grad()
def generate(ldm, labels: torch.Tensor, *, steps: int, eta: float, guidance: float, sampler: str, seed: int,
             batch_size: int, device: torch.device, use_ema: bool = True, log=None,
             progress: bool = False) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1] (on the CPU) for labels (N,), in batches of `batch_size`;
    `progress`: a tqdm bar over the samples on stderr. UserError when a batch decodes to NaN/inf
    (nothing is written from it)."""
    from tqdm import tqdm

    from dpldm.diffusion.schedulers import sample as sample_latents

    unet = ldm.sampling_unet(use_ema)
    out = []
    n = labels.shape[0]
    bar = tqdm(total=n, desc="sampling", unit="img", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    for b, start in enumerate(range(0, n, batch_size)):
        y = labels[start:start + batch_size].to(device)  # (B,)
        shape = (y.shape[0], *ldm.latent_shape)
        x_T = initial_noise(seed, start, y.shape[0], ldm.latent_shape).to(device)  # (B, Z, h, w)
        g = torch.Generator().manual_seed((seed << 32) + (1 << 31) + b)  # per-step noise (eta > 0, ddpm)
        z = sample_latents(unet, ldm.schedule, y, shape, sampler, steps, eta, guidance, x_T=x_T, generator=g)
        x = ldm.decode(z).float().cpu()  # (B, C, H, W)
        if not bool(torch.isfinite(x).all()):
            bar.close()
            raise UserError(f"samples {start}..{start + x.shape[0] - 1} came out NaN/inf (guidance {guidance:g}, "
                            f"{sampler}); nothing was written: check the model's weights and scale factor, or "
                            "lower --guidance")
        out.append(x)
        bar.update(x.shape[0])
        if log is not None and n > batch_size and not progress:
            log(f"sampled {min(start + batch_size, n)}/{n}")
    bar.close()
    return torch.cat(out)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> uint8 (N, H, W) for C = 1, else (N, H, W, C): evaluate's layout."""
    u8 = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
    return u8[..., 0] if u8.shape[-1] == 1 else u8


# -- writers (atomic) ------------------------------------------------------------------------------

def write_npz(path: Path, images: np.ndarray, labels: np.ndarray, meta: dict[str, Any]) -> None:
    from dpldm.utils.io import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, images=images, labels=labels.astype(np.int64), meta_json=np.array(json.dumps(meta)))


def write_png_dir(folder: Path, images: np.ndarray, labels: np.ndarray, meta: dict[str, Any],
                  overwrite: bool = False) -> None:
    """CLASS/NNNNNN.png + samples.json, built in a hidden temporary folder and renamed into place."""
    from PIL import Image

    from dpldm.utils.io import atomic_dir, model_inputs

    with atomic_dir(folder, overwrite=overwrite, kind="png-samples", inputs=model_inputs(meta.get("checkpoint"))) as tmp:
        for i, (img, y) in enumerate(zip(images, labels)):
            (tmp / str(int(y))).mkdir(exist_ok=True)
            Image.fromarray(img).save(tmp / str(int(y)) / f"{i:06d}.png", format="PNG")
        (tmp / "samples.json").write_text(json.dumps(meta, indent=2) + "\n")


# -- the command -----------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    from dpldm.models.ldm import load_ldm
    from dpldm.utils.device import describe_device, resolve_device
    from dpldm.utils.grid import save_image_grid

    check_args(args)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    ldm = load_ldm(args.checkpoint)
    d = ldm.cfg.diffusion
    num_classes = ldm.cfg.unet.num_classes
    classes = parse_classes(args.classes, num_classes) if args.classes is not None \
        else list(range(min(ldm.cfg.data.num_classes, num_classes)))
    sampler = args.sampler or d.sampler
    steps = d.sample_steps if args.steps is None else args.steps
    if sampler != "ddpm" and not 1 <= steps <= d.timesteps:
        raise UserError(f"--steps must lie in [1, {d.timesteps}] (diffusion.timesteps of the model), got {steps}")
    if sampler == "ddpm" and args.steps is not None and args.steps != d.timesteps:
        raise UserError(f"--steps {args.steps}: --sampler ddpm always runs all {d.timesteps} steps; use ddim")
    eta = (d.eta if args.eta is None else args.eta) if sampler == "ddim" else 0.0
    guidance = d.guidance_scale if args.guidance is None else args.guidance
    out = check_out(args)
    per_class = DEFAULT_PER_CLASS if args.per_class is None else args.per_class
    dc = ldm.cfg.data
    check_sizes(len(classes) * per_class, per_class, (dc.channels, dc.image_size, dc.image_size), args.format,
                args.upscale)
    labels = torch.tensor(classes).repeat_interleave(per_class)  # (len(classes) * per_class,)
    ldm.to(device)
    settings = (f"{sampler}, {d.timesteps if sampler == 'ddpm' else steps} steps"
                f"{f', eta {eta:g}' if sampler == 'ddim' else ''}, guidance {guidance:g}, seed {args.seed}, "
                f"{'raw' if args.no_ema else 'EMA'} weights, {describe_device(device)}")
    print(f"dpldm sample: {len(classes)} classes x {per_class} samples ({settings})", flush=True)
    images = generate(ldm, labels, steps=steps, eta=eta, guidance=guidance, sampler=sampler, seed=args.seed,
                      batch_size=args.batch_size, device=device, use_ema=not args.no_ema,
                      log=None if args.quiet else lambda msg: print(f"dpldm sample: {msg}", file=sys.stderr, flush=True),
                      progress=not args.quiet and sys.stderr.isatty())
    meta = {"checkpoint": str(args.checkpoint), "classes": classes, "per_class": per_class, "sampler": sampler,
            "steps": steps, "eta": eta, "guidance": guidance, "seed": args.seed, "weights": "raw" if args.no_ema else "ema",
            "privacy": getattr(ldm, "meta", {}).get("privacy")}
    if args.format == "grid":
        save_image_grid(images, out, nrow=per_class, upscale=args.upscale, tag=GRID_TAG)
    elif args.format == "npz":
        write_npz(out, to_uint8(images), labels.numpy(), meta)
    else:
        write_png_dir(out, to_uint8(images), labels.numpy(), meta, overwrite=args.overwrite)
    print(f"dpldm sample: wrote {len(labels)} samples -> {out}")
    return 0
