"""`dpldm pretrain-ae`: train the KL autoencoder on the public images (no privacy).

Loss per example: L1 reconstruction summed over pixels + autoencoder.kl_weight * KL(q(z|x) || N(0, I)),
averaged over the batch (the LDM first-stage weighting, without LPIPS/GAN terms). AdamW with
train.ae_lr / train.ae_batch_size / train.ae_steps. Each step's batch and posterior noise come
from a generator seeded by (train.seed, step), so a resumed run replays exactly what an
uninterrupted one would. The final model lands in `<out>/model/` (kind "autoencoder").

`data.public` is a source (in memory; batches drawn with replacement by the step's generator) or
an image shard folder from `dpldm data import` (streamed, see dpldm.data.public; the stream's
position is saved in every step checkpoint, so a resume continues with the same batches).
`--device` (else `train.device`) holds the model, the data and the optimizer state; the per-step
generators stay on the CPU, so every device draws the same batches and posterior noises.
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
from dpldm.data.public import HELD_OUT_MAX, PublicMemory, PublicStream, shard_folder_of
from dpldm.train.common import (add_common_arguments, check_resume_config, load_optimizer_tensors, optimizer_tensors,
                                refuse_to_clobber, resolve_config, PretrainStop, run_device, set_threads, step_generator,
                                warmup_scheduler)
from dpldm.utils.device import describe_device
from dpldm.utils.logging import RunLogger

KIND = "pretrain-ae-step"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)


def open_public_data(cfg: RunConfig, batch_size: int, device: torch.device,
                     position: list[int] | tuple[int, int] | None = None) -> PublicMemory | PublicStream:
    """`data.public` as batches: streamed from an image shard folder, or a source in memory."""
    folder = shard_folder_of(cfg.data.public)
    if folder is not None:
        return PublicStream(folder, batch_size=batch_size, channels=cfg.data.channels, image_size=cfg.data.image_size,
                            num_classes=cfg.unet.num_classes, seed=cfg.train.seed, num_workers=cfg.data.num_workers,
                            position=tuple(position or (0, 0)), device=device)
    x, y = load_public_images(cfg)
    return PublicMemory(x, y, batch_size, device)


def describe_public(cfg: RunConfig, data: PublicMemory | PublicStream) -> str:
    if isinstance(data, PublicStream):
        return (f"{data.num_examples} public images streamed from shards {data.folder.path} (shuffle buffer "
                f"{data.shuffle_buffer}, epoch {data.position[0]} batch {data.position[1]}; data.public_size unused)")
    return f"{data.num_examples} public images {tuple(data.x.shape[1:])} from {cfg.data.public!r} (in memory)"


def held_out_images(cfg: RunConfig, data: PublicMemory | PublicStream) -> tuple[torch.Tensor, str]:
    """Images for the final reconstruction check and what they are: the source's test split, or
    (a shard folder has one split) the folder's first images, which were trained on."""
    if isinstance(data, PublicStream):
        n = min(HELD_OUT_MAX, data.num_examples)
        return data.first_images(n), f"train_first_{n}"
    x, _ = load_public_images(cfg, split="test", num=min(HELD_OUT_MAX, cfg.data.public_size))
    return x, "heldout"


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
    """Mean squared error per pixel (images in [-1, 1]) reconstructing from the posterior mean,
    on the autoencoder's device."""
    ae.eval()
    device = next(ae.parameters()).device
    total = 0.0
    for i in range(0, x.shape[0], batch):
        xb = x[i:i + batch].to(device)
        total += (ae.decode(ae.encode(xb).mode()) - xb).pow(2).sum().item()
    return total / x.numel()


def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    set_threads(cfg)
    device = run_device(args, cfg)
    tc = cfg.train
    run_dir = Path(tc.out_dir)
    refuse_to_clobber(run_dir, args.resume)
    torch.manual_seed(tc.seed)
    ae = Autoencoder(cfg.autoencoder).to(device)
    opt = torch.optim.AdamW(ae.parameters(), lr=tc.ae_lr, weight_decay=tc.weight_decay)
    sched = warmup_scheduler(opt, tc.warmup_steps)
    start, wall_before, last, position = 0, 0.0, None, None  # wall_before None: resumed from a checkpoint without it
    if args.resume and (found := load_latest_checkpoint(run_dir)) is not None:
        tensors, meta, folder = found
        if meta.get("kind") != KIND:
            raise UserError(f"{folder}: not an autoencoder pretraining checkpoint (kind {meta.get('kind')!r})")
        check_resume_config(cfg, meta["config"], ("autoencoder", "data"), folder)
        ae.load_state_dict(unprefixed("model", tensors))
        load_optimizer_tensors(opt, tensors, meta["optimizer"])
        sched.load_state_dict(meta["scheduler"])
        start = int(meta["step"])
        wall_before, last, position = meta.get("train_wall_s"), meta.get("last_stats"), meta.get("public_stream")

    stop = PretrainStop(run_dir, start, args.max_steps, tc.ae_steps, f"dpldm pretrain-ae ... --out {run_dir} --resume")
    data = open_public_data(cfg, tc.ae_batch_size, device, position)
    total, trainable = sum(p.numel() for p in ae.parameters()), sum(p.numel() for p in ae.parameters() if p.requires_grad)
    logger = RunLogger(run_dir, cfg, use_wandb=tc.wandb, total_steps=tc.ae_steps, initial_step=start, job="pretrain-ae",
                       resume=start > 0)
    logger.info(f"[pretrain-ae] {describe_public(cfg, data)}; "
                f"f={cfg.autoencoder.downsample_factor} -> latents ({cfg.autoencoder.latent_channels}, "
                f"{cfg.data.image_size // cfg.autoencoder.downsample_factor}, "
                f"{cfg.data.image_size // cfg.autoencoder.downsample_factor}); parameters {total:,} "
                f"(trainable {trainable:,}); steps {start}->{tc.ae_steps}, batch {tc.ae_batch_size}, lr {tc.ae_lr}, "
                f"warmup {tc.warmup_steps}, device {describe_device(device)}, threads {torch.get_num_threads()}")
    t0 = time.time()

    def wall() -> float | None:
        return None if wall_before is None else round(wall_before + time.time() - t0, 1)


    def checkpoint(done: int) -> None:
        opt_tensors, opt_meta = optimizer_tensors(opt)
        save_step_checkpoint(run_dir, done, {**prefixed("model", ae.state_dict()), **opt_tensors},
                             {"kind": KIND, "config": cfg.to_dict(), "optimizer": opt_meta,
                              "scheduler": sched.state_dict(), "last_stats": last, "train_wall_s": wall(),
                              "public_stream": data.position},
                             keep=tc.keep_checkpoints)

    try:
        for step in range(start, tc.ae_steps):
            ae.train()
            g = step_generator(tc.seed, step, "ae")  # CPU: the batch (in memory), then the posterior noise
            x, _ = data.next(g)  # (B, C, H, W) on the device
            loss, stats = ae_loss(ae, x, cfg.autoencoder.kl_weight, generator=g)
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
            stopping = stop.requested(done)
            if done % tc.checkpoint_every == 0 or done == tc.ae_steps or stopping:
                checkpoint(done)
            if stopping:
                stop.finish(done, "pretrain-ae")
                return 0
        held_out, which = held_out_images(cfg, data)
        mse = reconstruction_mse(ae, held_out)
        logger.log(tc.ae_steps, {f"{which}_mse": mse})
        scores = {"heldout_mse": mse} if which == "heldout" else {"heldout_mse": None, f"{which}_mse": mse}
        out = save_autoencoder(run_dir / "model", ae.cpu(), cfg,
                               {"steps": tc.ae_steps, "last_train_stats": last, **scores, "train_wall_s": wall()})
        what = "held-out" if which == "heldout" else f"training-set ({which}; a shard folder has no test split)"
        logger.info(f"[pretrain-ae] {what} reconstruction MSE {mse:.5f} (pixels in [-1, 1]); model saved to {out}")
    finally:
        stop.signals.restore()
        logger.close()
    return 0
