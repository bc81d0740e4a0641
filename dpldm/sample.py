"""`dpldm sample`: a PNG grid of samples from an LDM model folder, one row per class."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dpldm.errors import UserError
from dpldm.models.ldm import load_ldm
from dpldm.utils.grid import save_image_grid


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="LDM model folder (or a run folder with model/)")
    parser.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9", help="comma-separated labels, e.g. 0,1,2")
    parser.add_argument("--n", type=int, default=8, help="samples per class (one row per class)")
    parser.add_argument("--out", default="samples.png", help="PNG file to write")
    parser.add_argument("--steps", type=int, help="sampling steps (default diffusion.sample_steps)")
    parser.add_argument("--eta", type=float, help="DDIM eta (default diffusion.eta)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale (default diffusion.guidance_scale)")
    parser.add_argument("--sampler", choices=("ddim", "ddpm"), help="default diffusion.sampler")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-ema", action="store_true", help="sample with the raw UNet weights instead of the EMA")
    parser.add_argument("--upscale", type=int, default=2, help="pixel magnification of the PNG")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")


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
    return classes


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    ldm = load_ldm(args.checkpoint)
    classes = parse_classes(args.classes, ldm.cfg.unet.num_classes)
    d = ldm.cfg.diffusion
    steps = args.steps or d.sample_steps
    if not 1 <= steps <= d.timesteps:
        raise UserError(f"--steps must lie in [1, {d.timesteps}], got {steps}")
    y = torch.tensor(classes).repeat_interleave(args.n)  # (len(classes) * n,)
    images = ldm.sample(y, steps=steps, eta=args.eta, guidance_scale=args.guidance, sampler=args.sampler,
                        generator=torch.Generator().manual_seed(args.seed), use_ema=not args.no_ema)
    out = save_image_grid(images, Path(args.out), nrow=args.n, upscale=args.upscale)
    print(f"dpldm sample: {len(classes)} classes x {args.n} samples ({args.sampler or d.sampler}, {steps} steps, "
          f"eta {d.eta if args.eta is None else args.eta}, guidance "
          f"{d.guidance_scale if args.guidance is None else args.guidance}) -> {out}")
    return 0
