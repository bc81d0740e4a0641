"""`dpldm pretrain-ldm`: train the class-conditional LDM on public latents (no privacy).

The frozen autoencoder (`--autoencoder`, a `dpldm pretrain-ae` model or run folder) encodes the
public set once into posterior moments; every step draws fresh latents z ~ q(z|x) from them, as
LDM does. scale_factor = 1 / std of those latents (computed once, stored in the checkpoints),
so the UNet sees roughly unit-variance latents. Loss: `per_example_loss` (K =
diffusion.timesteps_per_example) averaged over the batch, labels dropped to the null class with
probability diffusion.cond_drop_prob (classifier-free guidance). AdamW with train.lr /
train.batch_size / train.steps, global-norm clipping, EMA (train.ema_decay) of the UNet.
Writes `<out>/model/` (kind "ldm": AE + UNet + EMA + config + scale_factor) and `<out>/samples.png`.

`data.public` as a shard folder (dpldm.data.public): the images are streamed and each batch goes
through the frozen encoder when it is drawn (the set is never held in memory); scale_factor comes
from the folder's first SCALE_EXAMPLES images in stored order. The stream position is saved in
every step checkpoint (resume continues with the same batches). `--device` (else `train.device`)
holds the models, the data and the optimizer; the per-step generators stay on the CPU.
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
from dpldm.data.public import PublicMemory, PublicStream
from dpldm.train.common import (add_common_arguments, check_resume_config, load_optimizer_tensors, optimizer_tensors,
                                refuse_to_clobber, resolve_config, run_device, PretrainStop, set_threads, step_generator,
                                warmup_scheduler)
from dpldm.train.pretrain_ae import describe_public, open_public_data
from dpldm.utils.device import describe_device
from dpldm.utils.grid import save_image_grid
from dpldm.utils.logging import RunLogger

KIND = "pretrain-ldm-step"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--autoencoder", required=True, help="pretrained autoencoder: model folder or pretrain-ae run folder")
    parser.add_argument("--restart-ema", action="store_true",
                        help="with --resume: the EMA starts again from the checkpoint's weights (for a run whose "
                             "EMA still holds its first weights, or a recipe that changed train.ema_decay)")


SCALE_EXAMPLES = 10_000  # streamed public sets: images behind scale_factor


@torch.no_grad()
def encode_moments(ae: Autoencoder, x: torch.Tensor, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image: each (N, Z, h, w), on the autoencoder's device."""
    ae.eval()
    device = next(ae.parameters()).device
    means, stds = [], []
    for i in range(0, x.shape[0], batch):
        post = ae.encode(x[i:i + batch].to(device))
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def latent_scale_factor(mean: torch.Tensor, std: torch.Tensor, seed: int) -> float:
    """1 / std of latents sampled once from the posteriors (LDM's scale_factor); noise drawn on the CPU."""
    g = torch.Generator().manual_seed(seed)
    z = mean + std * torch.randn(mean.shape, generator=g).to(mean.device)  # (N, Z, h, w)
    return float(1.0 / z.flatten().std().item())


class LatentBatches:
    """Each step's (posterior mean, posterior std, labels) of the public set under the frozen AE:
    in memory, every image encoded once and batches drawn by the step's generator; streamed,
    each streamed batch encoded when drawn."""

    def __init__(self, ae: Autoencoder, data: PublicMemory | PublicStream):
        self.ae, self.data = ae.eval(), data
        if isinstance(data, PublicMemory):
            self.mean, self.std = encode_moments(ae, data.x)  # (N, Z, h, w) each

    def scale_factor(self, seed: int) -> float:
        if isinstance(self.data, PublicMemory):
            return latent_scale_factor(self.mean, self.std, seed)
        x = self.data.first_images(min(SCALE_EXAMPLES, self.data.num_examples))
        return latent_scale_factor(*encode_moments(self.ae, x), seed)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        if isinstance(self.data, PublicMemory):
            return tuple(self.mean.shape[1:])
        f, s = self.ae.cfg.downsample_factor, self.data.folder.spec.shape[0]
        return (self.ae.cfg.latent_channels, s // f, s // f)

    @torch.no_grad()
    def next(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if isinstance(self.data, PublicMemory):
            idx = self.data.indices(g)  # (B,)
            return self.mean[idx], self.std[idx], self.data.y[idx]
        x, y = self.data.next()  # (B, C, H, W)
        post = self.ae.encode(x)
        return post.mean, post.std, y


def check_autoencoder_config(cfg: RunConfig, ae_cfg: RunConfig, where: str) -> None:
    if ae_cfg.autoencoder != cfg.autoencoder:
        now, then = cfg.to_dict()["autoencoder"], ae_cfg.to_dict()["autoencoder"]
        diffs = [f"autoencoder.{k}: recipe {now[k]!r} != checkpoint {then[k]!r}" for k in now if now[k] != then[k]]
        raise UserError(f"--autoencoder {where} does not match the recipe ({'; '.join(diffs)})")


def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    set_threads(cfg)
    device = run_device(args, cfg)
    tc, dc = cfg.train, cfg.diffusion
    run_dir = Path(tc.out_dir)
    refuse_to_clobber(run_dir, args.resume)
    torch.manual_seed(tc.seed)
    ae, ae_cfg, ae_meta = load_autoencoder(args.autoencoder)
    check_autoencoder_config(cfg, ae_cfg, args.autoencoder)
    ae.requires_grad_(False).to(device)

    found = load_latest_checkpoint(run_dir) if args.resume else None
    data = open_public_data(cfg, tc.batch_size, device, found[1].get("public_stream") if found else None)
    latents = LatentBatches(ae, data)
    scale = float(found[1]["scale_factor"]) if found else latents.scale_factor(tc.seed)

    ldm = LatentDiffusion(cfg, scale_factor=scale)
    ldm.ae.load_state_dict(ae.state_dict())
    ldm.ae.requires_grad_(False).eval()
    ldm.to(device)
    unet = ldm.unet
    opt = torch.optim.AdamW(unet.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    sched = warmup_scheduler(opt, tc.warmup_steps, tc.steps, tc.lr_decay)
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
        if args.restart_ema:
            ldm.ema.restart()  # the first update after the resume copies the weights
    elif args.restart_ema:
        raise UserError("--restart-ema needs --resume (a new run's EMA starts from its first weights anyway)")

    stop = PretrainStop(run_dir, start, args.max_steps, tc.steps,
                        f"dpldm pretrain-ldm ... --autoencoder {args.autoencoder} --out {run_dir} --resume")
    total, trainable = count_parameters(unet)
    logger = RunLogger(run_dir, cfg, use_wandb=tc.wandb, total_steps=tc.steps, initial_step=start, job="pretrain-ldm",
                       resume=start > 0)
    logger.info(f"[pretrain-ldm] {describe_public(cfg, data)} -> latents {latents.latent_shape}, "
                f"scale_factor {scale:.5f} (1/std of public latents); UNet parameters {total:,} (trainable "
                f"{trainable:,}), {len(unet.attention_modules())} attention modules; steps {start}->{tc.steps}, "
                f"batch {tc.batch_size}, K {dc.timesteps_per_example}, lr {tc.lr} ({tc.lr_decay}), warmup {tc.warmup_steps}, "
                f"cond_drop_prob {dc.cond_drop_prob}, ema_decay {tc.ema_decay}"
                f"{' (EMA restarted)' if args.restart_ema else ''}, device {describe_device(device)}, "
                f"threads {torch.get_num_threads()}")
    t0 = time.time()

    def wall() -> float | None:
        return None if wall_before is None else round(wall_before + time.time() - t0, 1)

    def checkpoint(done: int) -> None:
        opt_tensors, opt_meta = optimizer_tensors(opt)
        tensors = {**prefixed("model", unet.state_dict()), **prefixed("ema", ldm.ema.state_dict()), **opt_tensors}
        save_step_checkpoint(run_dir, done, tensors,
                             {"kind": KIND, "config": cfg.to_dict(), "optimizer": opt_meta,
                              "scheduler": sched.state_dict(), "scale_factor": scale,
                              "last_stats": {"loss": last_loss}, "train_wall_s": wall(),
                              "public_stream": data.position}, keep=tc.keep_checkpoints)

    try:
        for step in range(start, tc.steps):
            unet.train()
            g = step_generator(tc.seed, step, "ldm")  # CPU: batch (in memory), posterior noise, t, noise, drops
            mean, std, y = latents.next(g)  # (B, Z, h, w), (B, Z, h, w), (B,)
            z0 = (mean + std * torch.randn(mean.shape, generator=g).to(device)) * scale  # (B, Z, h, w)
            loss = per_example_loss(unet, z0, y, ldm.schedule, dc.timesteps_per_example, generator=g,
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
            stopping = stop.requested(done)
            if done % tc.checkpoint_every == 0 or done == tc.steps or stopping:
                checkpoint(done)
            if stopping:
                stop.finish(done, "pretrain-ldm")
                return 0
        out = save_ldm(run_dir / "model", ldm, {"steps": tc.steps, "last_loss": last_loss,
                                                "autoencoder": str(args.autoencoder),
                                                "autoencoder_heldout_mse": ae_meta.get("heldout_mse"),
                                                "public": cfg.data.public, "train_wall_s": wall()})
        logger.info(f"[pretrain-ldm] model saved to {out}")
        classes = torch.arange(min(cfg.unet.num_classes, 36))
        y = classes.repeat_interleave(4).to(device)  # one row of 4 per class
        images = ldm.sample(y, generator=torch.Generator().manual_seed(tc.seed))  # (4*K, C, H, W)
        grid = save_image_grid(images.cpu(), run_dir / "samples.png", nrow=4 * 6, upscale=2)
        logger.info(f"[pretrain-ldm] EMA samples ({dc.sampler}, {dc.sample_steps} steps, guidance "
                    f"{dc.guidance_scale}) in {grid}")
    finally:
        stop.signals.restore()
        logger.close()
    return 0
