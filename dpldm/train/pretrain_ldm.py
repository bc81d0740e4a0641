"""`dpldm pretrain-ldm`: train the class-conditional LDM on public latents (no privacy).

The frozen autoencoder (`--autoencoder`, a `dpldm pretrain-ae` model or run folder) encodes the
public set once into posterior moments; every step draws fresh latents z ~ q(z|x) from them, as
LDM does. scale_factor = 1 / std of those latents (computed once, stored in the checkpoints),
so the UNet sees roughly unit-variance latents. Loss: `per_example_loss` (K =
diffusion.timesteps_per_example) averaged over the batch, labels dropped to the null class with
probability diffusion.cond_drop_prob (classifier-free guidance). AdamW with train.lr /
train.batch_size / train.steps, global-norm clipping, EMA (train.ema_decay) of the UNet.
Writes `<out>/model/` (kind "ldm": AE + UNet + EMA + config + scale_factor) and `<out>/samples.png`.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from dpldm.checkpoint import load_latest_checkpoint, prefixed, save_step_checkpoint, unprefixed
from dpldm.errors import UserError
from dpldm.config import RunConfig
from dpldm.diffusion.loss import per_example_loss
from dpldm.models.autoencoder import Autoencoder
from dpldm.models.ldm import LatentDiffusion, load_autoencoder, save_ldm
from dpldm.models.selection import count_parameters
from dpldm.train.common import (add_common_arguments, check_resume_config, load_optimizer_tensors, optimizer_tensors,
                                refuse_to_clobber, resolve_config, set_threads, step_generator, warmup_scheduler)
from dpldm.train.pretrain_ae import load_public_images
from dpldm.utils.grid import save_image_grid
from dpldm.utils.logging import RunLogger

KIND = "pretrain-ldm-step"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--autoencoder", required=True, help="pretrained autoencoder: model folder or pretrain-ae run folder")


@torch.no_grad()
def encode_moments(ae: Autoencoder, x: torch.Tensor, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image: each (N, Z, h, w)."""
    ae.eval()
    means, stds = [], []
    for i in range(0, x.shape[0], batch):
        post = ae.encode(x[i:i + batch])
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def latent_scale_factor(mean: torch.Tensor, std: torch.Tensor, seed: int) -> float:
    """1 / std of latents sampled once from the posteriors (LDM's scale_factor)."""
    g = torch.Generator().manual_seed(seed)
    z = mean + std * torch.randn(mean.shape, generator=g)  # (N, Z, h, w)
    return float(1.0 / z.flatten().std().item())


def check_autoencoder_config(cfg: RunConfig, ae_cfg: RunConfig, where: str) -> None:
    if ae_cfg.autoencoder != cfg.autoencoder:
        now, then = cfg.to_dict()["autoencoder"], ae_cfg.to_dict()["autoencoder"]
        diffs = [f"autoencoder.{k}: recipe {now[k]!r} != checkpoint {then[k]!r}" for k in now if now[k] != then[k]]
        raise UserError(f"--autoencoder {where} does not match the recipe ({'; '.join(diffs)})")


def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    set_threads(cfg)
    tc, dc = cfg.train, cfg.diffusion
    run_dir = Path(tc.out_dir)
    refuse_to_clobber(run_dir, args.resume)
    torch.manual_seed(tc.seed)
    ae, ae_cfg, ae_meta = load_autoencoder(args.autoencoder)
    check_autoencoder_config(cfg, ae_cfg, args.autoencoder)
    ae.requires_grad_(False)

    x_all, y_all = load_public_images(cfg)
    mean, std = encode_moments(ae, x_all)  # (N, Z, h, w) each
    found = load_latest_checkpoint(run_dir) if args.resume else None
    scale = float(found[1]["scale_factor"]) if found else latent_scale_factor(mean, std, tc.seed)

    ldm = LatentDiffusion(cfg, scale_factor=scale)
    ldm.ae.load_state_dict(ae.state_dict())
    ldm.ae.requires_grad_(False).eval()
    unet = ldm.unet
    opt = torch.optim.AdamW(unet.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    sched = warmup_scheduler(opt, tc.warmup_steps)
    start, wall_before, last_loss = 0, 0.0, None  # wall_before None: resumed from a checkpoint without it
    if found is not None:
        tensors, meta, folder = found
        if meta.get("kind") != KIND:
            raise UserError(f"{folder}: not an LDM pretraining checkpoint (kind {meta.get('kind')!r})")
        check_resume_config(cfg, meta["config"], ("autoencoder", "unet", "diffusion", "data"), folder)
        unet.load_state_dict(unprefixed("model", tensors))
        ldm.ema.load_state_dict(unprefixed("ema", tensors))
        load_optimizer_tensors(opt, tensors, meta["optimizer"])
        sched.load_state_dict(meta["scheduler"])
        start = int(meta["step"])
        wall_before, last_loss = meta.get("train_wall_s"), (meta.get("last_stats") or {}).get("loss")

    total, trainable = count_parameters(unet)
    logger = RunLogger(run_dir, cfg, use_wandb=tc.wandb, total_steps=tc.steps, initial_step=start, job="pretrain-ldm")
    logger.info(f"[pretrain-ldm] {x_all.shape[0]} public images -> latents {tuple(mean.shape[1:])}, "
                f"scale_factor {scale:.5f} (1/std of public latents); UNet parameters {total:,} (trainable "
                f"{trainable:,}), {len(unet.attention_modules())} attention modules; steps {start}->{tc.steps}, "
                f"batch {tc.batch_size}, K {dc.timesteps_per_example}, lr {tc.lr}, warmup {tc.warmup_steps}, "
                f"cond_drop_prob {dc.cond_drop_prob}, ema_decay {tc.ema_decay}, threads {torch.get_num_threads()}")
    t0 = time.time()

    def wall() -> float | None:
        return None if wall_before is None else round(wall_before + time.time() - t0, 1)

    try:
        for step in range(start, tc.steps):
            unet.train()
            g = step_generator(tc.seed, step, "ldm")
            idx = torch.randint(0, x_all.shape[0], (tc.batch_size,), generator=g)  # (B,)
            z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scale  # (B, Z, h, w)
            loss = per_example_loss(unet, z0, y_all[idx], ldm.schedule, dc.timesteps_per_example, generator=g,
                                    cond_drop_prob=dc.cond_drop_prob).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(unet.parameters(), tc.grad_clip)
            opt.step()
            sched.step()
            ldm.ema.update(unet)
            done = step + 1
            last_loss = loss.item()
            logger.advance()
            if done % tc.log_every == 0 or done == tc.steps:
                logger.log(done, {"loss": last_loss, "grad_norm": grad_norm.item(), "lr": sched.get_last_lr()[0],
                                  "steps_per_s": (done - start) / (time.time() - t0)})
            if done % tc.checkpoint_every == 0 or done == tc.steps:
                opt_tensors, opt_meta = optimizer_tensors(opt)
                tensors = {**prefixed("model", unet.state_dict()), **prefixed("ema", ldm.ema.state_dict()), **opt_tensors}
                save_step_checkpoint(run_dir, done, tensors,
                                     {"kind": KIND, "config": cfg.to_dict(), "optimizer": opt_meta,
                                      "scheduler": sched.state_dict(), "scale_factor": scale,
                                      "last_stats": {"loss": last_loss}, "train_wall_s": wall()}, keep=tc.keep_checkpoints)
        out = save_ldm(run_dir / "model", ldm, {"steps": tc.steps, "last_loss": last_loss,
                                                "autoencoder": str(args.autoencoder),
                                                "autoencoder_heldout_mse": ae_meta.get("heldout_mse"),
                                                "train_wall_s": wall()})
        logger.info(f"[pretrain-ldm] model saved to {out}")
        classes = torch.arange(min(cfg.unet.num_classes, 36))
        y = classes.repeat_interleave(4)  # one row of 4 per class
        images = ldm.sample(y, generator=torch.Generator().manual_seed(tc.seed))  # (4*K, C, H, W)
        grid = save_image_grid(images, run_dir / "samples.png", nrow=4 * 6, upscale=2)
        logger.info(f"[pretrain-ldm] EMA samples ({dc.sampler}, {dc.sample_steps} steps, guidance "
                    f"{dc.guidance_scale}) in {grid}")
    finally:
        logger.close()
    return 0
