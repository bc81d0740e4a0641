"""Per-example gradient norms of the public model on PUBLIC data: how a recipe's clip norm C is
chosen without looking at private data (docs/tuning.md).

The shipped glyph model is fine-tuned from its EMA weights exactly as `dpldm finetune` does
(eval mode, `train.finetune` modules trainable, the trainer's loss with its K timesteps and label
drop), on fresh glyphs of the private task's classes ('0'-'9' for MNIST), rendered with a seed
the pretraining never used. Each example's gradient is taken by its own backward pass (the
independent per-example loop, no DP engine), and the quantiles of the norms are printed with the
fraction of examples a candidate C would clip. Nothing here reads private data.

    python bench/public_grad_norms.py --config configs/demo.toml --n 200 --clip 1e-3 0.05
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpldm.config import load_config  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.toml"))
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--n", type=int, default=200, help="public examples (one backward pass each)")
    p.add_argument("--seed", type=int, default=12345, help="glyph seed (the shipped model was pretrained on seed 0)")
    p.add_argument("--clip", type=float, nargs="+", default=[1e-3, 0.05], help="candidate C values to report")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from dpldm.data.glyphs import render_glyphs
    from dpldm.diffusion.schedule import DiffusionSchedule
    from dpldm.models.ldm import load_ldm, public_model_path
    from dpldm.models.selection import apply_finetune
    from dpldm.train.dp_loss import ChunkBatch, DiffusionDPLoss

    cfg = load_config(args.config, args.set)
    ldm = load_ldm(cfg.train.init_checkpoint or public_model_path())
    ldm.copy_ema_to_unet()
    unet = ldm.unet.eval()
    unet.requires_grad_(False)
    apply_finetune(unet, cfg.train.finetune)
    params = [q for q in unet.parameters() if q.requires_grad]

    # public glyphs of the private task's classes (labels 0..num_classes-1 are '0'-'9' for MNIST)
    images, labels = render_glyphs(args.n * 5, seed=args.seed, size=cfg.data.image_size)
    keep = np.flatnonzero(labels < cfg.data.num_classes)[: args.n]
    x = torch.from_numpy(images[keep]).float().div(127.5).sub(1.0).unsqueeze(1)  # (n, 1, H, W) in [-1, 1]
    y = torch.from_numpy(labels[keep]).long()  # (n,)
    with torch.no_grad():
        z0 = ldm.ae.encode(x).mode()  # (n, Z, h, w) unscaled posterior means, as `dpldm data encode` caches
    loss_fn = DiffusionDPLoss(DiffusionSchedule.from_config(cfg.diffusion), scale_factor=ldm.scale_factor,
                              timesteps_per_example=cfg.diffusion.timesteps_per_example,
                              cond_drop_prob=cfg.diffusion.cond_drop_prob, seed=args.seed, device=torch.device("cpu"))
    norms = []
    for i in range(len(y)):  # one backward per example: the independent reference, no engine
        batch = ChunkBatch(z0[i:i + 1], y[i:i + 1], torch.tensor([i]), 0)
        grads = torch.autograd.grad(loss_fn(unet, batch).sum(), params, allow_unused=True)
        norms.append(float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None))))
    norms = np.asarray(norms)
    out = {"n": int(len(norms)), "finetune": cfg.train.finetune, "K": cfg.diffusion.timesteps_per_example,
           "quantiles": {str(q): float(np.quantile(norms, q)) for q in (0.0, 0.01, 0.1, 0.5, 0.9, 0.99, 1.0)},
           "fraction_clipped": {str(c): float((norms > c).mean()) for c in args.clip}}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"per-example gradient norms of the public model on {out['n']} public glyphs ({cfg.train.finetune}, "
              f"K={out['K']}):")
        print("  quantiles: " + ", ".join(f"q{float(k):g}={v:.3g}" for k, v in out["quantiles"].items()))
        print("  clipped:   " + ", ".join(f"C={float(k):g}: {100 * v:.1f}%" for k, v in out["fraction_clipped"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
