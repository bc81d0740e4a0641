"""`dpldm pretrain-ae`: train the KL autoencoder on the public images (no privacy).

Loss per example: L1 reconstruction summed over pixels + autoencoder.kl_weight * KL(q(z|x) || N(0, I)),
averaged over the batch (the LDM first-stage weighting, without LPIPS/GAN terms). AdamW with
train.ae_lr / train.ae_batch_size / train.ae_steps. Each step's batch and posterior noise come
from a generator seeded by (train.seed, step), so a resumed run replays exactly what an
uninterrupted one would. The final model lands in `<out>/model/` (kind "autoencoder").
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from dpldm.checkpoint import load_latest_checkpoint, prefixed, save_step_checkpoint, unprefixed
from dpldm.errors import UserError
from dpldm.config import RunConfig
from dpldm.models.autoencoder import Autoencoder
from dpldm.models.ldm import save_autoencoder
from dpldm.train.common import (add_common_arguments, check_resume_config, load_optimizer_tensors, optimizer_tensors,
                                refuse_to_clobber, resolve_config, set_threads, step_generator, warmup_scheduler)
from dpldm.utils.logging import RunLogger

KIND = "pretrain-ae-step"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)


def load_public_images(cfg: RunConfig, split: str = "train", num: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The public set as float (N, C, H, W) in [-1, 1] and int64 labels (N,)."""
    from dpldm.data.codec import images_to_tensor
    from dpldm.data.sources import load_source

    images, labels, meta = load_source(cfg.data.public, split, num=num or cfg.data.public_size, seed=cfg.data.seed)
    x = images_to_tensor(images)  # (N, C, H, W)
    if x.shape[1] == 1 and cfg.data.channels == 3:
        x = x.expand(-1, 3, -1, -1).contiguous()
    if x.shape[1:] != (cfg.data.channels, cfg.data.image_size, cfg.data.image_size):
        raise UserError(f"public source {cfg.data.public!r} gives images {tuple(x.shape[1:])}, but data.channels/"
                        f"data.image_size ask for {(cfg.data.channels, cfg.data.image_size, cfg.data.image_size)}")
    if int(labels.max()) >= cfg.unet.num_classes:
        raise UserError(f"public source {cfg.data.public!r} has {meta['num_classes']} classes > unet.num_classes "
                        f"({cfg.unet.num_classes})")
    return x, torch.from_numpy(labels)


def ae_loss(ae: Autoencoder, x: torch.Tensor, kl_weight: float,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Batch loss and aggregate diagnostics (per-pixel L1 and MSE, mean KL)."""
    recon, posterior = ae(x, generator=generator)  # (B, C, H, W)
    err = recon - x
    rec = err.abs().flatten(1).sum(1).mean()
    kl = posterior.kl().mean()
    loss = rec + kl_weight * kl
    return loss, {"l1": err.abs().mean().item(), "mse": err.pow(2).mean().item(), "kl": kl.item()}


@torch.no_grad()
def reconstruction_mse(ae: Autoencoder, x: torch.Tensor, batch: int = 500) -> float:
    """Mean squared error per pixel (images in [-1, 1]) reconstructing from the posterior mean."""
    ae.eval()
    total = 0.0
    for i in range(0, x.shape[0], batch):
        xb = x[i:i + batch]
        total += (ae.decode(ae.encode(xb).mode()) - xb).pow(2).sum().item()
    return total / x.numel()


def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    set_threads(cfg)
    tc = cfg.train
    run_dir = Path(tc.out_dir)
    refuse_to_clobber(run_dir, args.resume)
    torch.manual_seed(tc.seed)
    ae = Autoencoder(cfg.autoencoder)
    opt = torch.optim.AdamW(ae.parameters(), lr=tc.ae_lr, weight_decay=tc.weight_decay)
    sched = warmup_scheduler(opt, tc.warmup_steps)
    start, wall_before, last = 0, 0.0, None  # wall_before None: resumed from a checkpoint that did not record it
    if args.resume and (found := load_latest_checkpoint(run_dir)) is not None:
        tensors, meta, folder = found
        if meta.get("kind") != KIND:
            raise UserError(f"{folder}: not an autoencoder pretraining checkpoint (kind {meta.get('kind')!r})")
        check_resume_config(cfg, meta["config"], ("autoencoder", "data"), folder)
        ae.load_state_dict(unprefixed("model", tensors))
        load_optimizer_tensors(opt, tensors, meta["optimizer"])
        sched.load_state_dict(meta["scheduler"])
        start = int(meta["step"])
        wall_before, last = meta.get("train_wall_s"), meta.get("last_stats")

    x_all, _ = load_public_images(cfg)
    total, trainable = sum(p.numel() for p in ae.parameters()), sum(p.numel() for p in ae.parameters() if p.requires_grad)
    logger = RunLogger(run_dir, cfg, use_wandb=tc.wandb, total_steps=tc.ae_steps, initial_step=start, job="pretrain-ae")
    logger.info(f"[pretrain-ae] {x_all.shape[0]} public images {tuple(x_all.shape[1:])} from {cfg.data.public!r}; "
                f"f={cfg.autoencoder.downsample_factor} -> latents ({cfg.autoencoder.latent_channels}, "
                f"{cfg.data.image_size // cfg.autoencoder.downsample_factor}, "
                f"{cfg.data.image_size // cfg.autoencoder.downsample_factor}); parameters {total:,} "
                f"(trainable {trainable:,}); steps {start}->{tc.ae_steps}, batch {tc.ae_batch_size}, lr {tc.ae_lr}, "
                f"warmup {tc.warmup_steps}, threads {torch.get_num_threads()}")
    t0 = time.time()

    def wall() -> float | None:
        return None if wall_before is None else round(wall_before + time.time() - t0, 1)

    try:
        for step in range(start, tc.ae_steps):
            ae.train()
            g = step_generator(tc.seed, step, "ae")
            idx = torch.randint(0, x_all.shape[0], (tc.ae_batch_size,), generator=g)
            loss, stats = ae_loss(ae, x_all[idx], cfg.autoencoder.kl_weight, generator=g)
            last = {"loss": loss.item(), **stats}
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(ae.parameters(), tc.grad_clip)
            opt.step()
            sched.step()
            done = step + 1
            logger.advance()
            if done % tc.log_every == 0 or done == tc.ae_steps:
                logger.log(done, {**last, "grad_norm": grad_norm.item(),
                                  "lr": sched.get_last_lr()[0], "steps_per_s": (done - start) / (time.time() - t0)})
            if done % tc.checkpoint_every == 0 or done == tc.ae_steps:
                opt_tensors, opt_meta = optimizer_tensors(opt)
                save_step_checkpoint(run_dir, done, {**prefixed("model", ae.state_dict()), **opt_tensors},
                                     {"kind": KIND, "config": cfg.to_dict(), "optimizer": opt_meta,
                                      "scheduler": sched.state_dict(), "last_stats": last, "train_wall_s": wall()},
                                     keep=tc.keep_checkpoints)
        held_out, _ = load_public_images(cfg, split="test", num=min(2000, cfg.data.public_size))
        mse = reconstruction_mse(ae, held_out)
        logger.log(tc.ae_steps, {"heldout_mse": mse})
        out = save_autoencoder(run_dir / "model", ae, cfg,
                               {"steps": tc.ae_steps, "last_train_stats": last, "heldout_mse": mse,
                                "train_wall_s": wall()})
        logger.info(f"[pretrain-ae] held-out reconstruction MSE {mse:.5f} (pixels in [-1, 1]); model saved to {out}")
    finally:
        logger.close()
    return 0
