"""`dpldm finetune`: DP fine-tuning of the attention modules (+ class embedder) of a public LDM.

    public LDM (frozen AE, UNet) --apply_finetune--> trainable attention params
    private images --frozen encoder, once--> latents (N, Z, h, w)
    for each logical step s:  Poisson sample (PoissonPlan, seed private) -> physical chunks
        -> DPStep: clipped per-example sums (book-keeping), ONE noise draw, / (q*N), AdamW
        -> EMA of the UNet (post-processing: no privacy cost)
    -> <out>/model (kind "ldm", EMA weights for sampling) with the privacy report in meta.json

Privacy covers exactly the fine-tuning gradients: the encoder is applied per example, so the
latent cache costs nothing; only aggregate numbers (loss of the noisy step is NOT computed
per example, epsilon from the accountant) are logged. Every step checkpoint carries the privacy
ledger (accountant history + Poisson plan), so a resumed run neither re-spends nor forgets
privacy. SIGTERM (SLURM preemption) finishes the current logical step, writes a checkpoint and
exits cleanly; `--resume` continues.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dpldm.checkpoint import (list_step_checkpoints, load_latest_checkpoint, prefixed, save_step_checkpoint,
                              unprefixed)
from dpldm.errors import UserError
from dpldm.config import RunConfig
from dpldm.diffusion.ema import EMA
from dpldm.diffusion.loss import per_example_loss
from dpldm.models.ldm import LatentDiffusion, load_ldm, load_public_model, public_model_path, save_ldm
from dpldm.models.selection import apply_finetune, count_parameters
from dpldm.privacy import DPStep, GaussianNoise, PrivacyLedger
from dpldm.train.common import (add_common_arguments, check_resume_config, load_optimizer_tensors, optimizer_tensors,
                                refuse_to_clobber, resolve_config, set_threads, warmup_scheduler)
from dpldm.utils.logging import RunLogger

KIND = "finetune-step"
_FINETUNE_STREAM = 4  # seed stream of the per-chunk timestep/noise draws (distinct from pretraining's)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--init", help="public LDM to start from (model or run folder); default: "
                                       "train.init_checkpoint, else the shipped glyph model")
    parser.add_argument("--private", help="private data: a built-in source name, an image folder, a .npz, or a "
                                          "latent shard folder from `dpldm data encode` (overrides data.private)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop after this many logical steps in this invocation (checkpoint, resumable)")


# -- private latents -------------------------------------------------------------------------------

@dataclass
class PrivateLatents:
    """Random access to the private set as unscaled latents (posterior means) and labels."""

    dataset: Any  # dpldm.data.loaders.IndexedDataset yielding (latents (B, Z, h, w), labels (B,))
    description: str

    def __len__(self) -> int:
        return len(self.dataset)


@torch.no_grad()
def encode_images(ldm: LatentDiffusion, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1] -> unscaled posterior means (N, Z, h, w), frozen encoder."""
    ldm.ae.eval()
    return torch.cat([ldm.ae.encode(x[i:i + batch]).mean for i in range(0, x.shape[0], batch)])


def load_private_latents(cfg: RunConfig, ldm: LatentDiffusion, spec: str, init_folder: Path | None) -> PrivateLatents:
    from dpldm.data.errors import ShardError
    from dpldm.data.loaders import InMemoryDataset, open_private_dataset
    from dpldm.data.latents import ae_state_hash
    from dpldm.data.manifest import open_shard_folder
    from dpldm.data.sources import load_source

    path = Path(spec)
    if path.is_dir() and (path / "manifest.json").is_file():
        folder = open_shard_folder(path)
        if folder.kind != "latents":
            raise UserError(f"{path}: holds {folder.kind}, not latents; run `dpldm data encode --shards {path} "
                            f"--autoencoder <the LDM folder> --out DIR` first and pass DIR")
        try:
            ds = open_private_dataset(path, expected_ae_hash=ae_state_hash(ldm.ae.state_dict()))
        except ShardError as e:
            raise UserError(str(e)) from None
        return PrivateLatents(ds, f"latent shards {path} ({len(ds)} examples)")
    images, labels, meta = load_source(spec, "train")
    x = torch.from_numpy(images).float().div(127.5).sub(1.0)  # (N, H, W[, C]) in [-1, 1]
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)  # (N, C, H, W)
    if tuple(x.shape[1:]) != (cfg.data.channels, cfg.data.image_size, cfg.data.image_size):
        raise UserError(f"private source {spec!r} has images {tuple(x.shape[1:])}, the model expects "
                        f"{(cfg.data.channels, cfg.data.image_size, cfg.data.image_size)}")
    if int(labels.max()) >= cfg.unet.num_classes:
        raise UserError(f"private source {spec!r} has label {int(labels.max())} >= the model's "
                        f"{cfg.unet.num_classes} classes")
    z = encode_images(ldm, x)  # (N, Z, h, w)
    ds = InMemoryDataset(z, torch.from_numpy(labels), kind="latents", num_classes=cfg.unet.num_classes)
    return PrivateLatents(ds, f"source {spec!r} train split ({len(ds)} examples, encoded once by the frozen AE)")


# -- the per-example loss the DP engine differentiates ----------------------------------------------

def chunk_generator(seed: int, step: int, chunk: int) -> torch.Generator:
    """Timesteps, noises and label drops of one chunk: a pure function of (seed, step, chunk)."""
    state = np.random.SeedSequence([seed, _FINETUNE_STREAM, step, chunk]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class DiffusionLossFn:
    """per_example_loss_fn(unet, (latents, labels)) -> (B,); draws from (seed, step, chunk)."""

    def __init__(self, ldm: LatentDiffusion, cfg: RunConfig, seed: int):
        self.ldm, self.cfg, self.seed = ldm, cfg, seed
        self.step, self.chunk = 0, 0

    def at(self, step: int) -> None:
        self.step, self.chunk = step, 0

    def __call__(self, unet: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        z, y = batch  # (B, Z, h, w) unscaled, (B,)
        g = chunk_generator(self.seed, self.step, self.chunk)
        self.chunk += 1
        d = self.cfg.diffusion
        return per_example_loss(unet, z * self.ldm.scale_factor, y, self.ldm.schedule, d.timesteps_per_example,
                                generator=g, cond_drop_prob=d.cond_drop_prob)  # (B,)


# -- set-up ----------------------------------------------------------------------------------------

def resolve_init(args: argparse.Namespace, cfg: RunConfig) -> tuple[LatentDiffusion, Path]:
    init = args.init or cfg.train.init_checkpoint
    if not init or init == "public":
        return load_public_model(), public_model_path()
    return load_ldm(init), Path(init)


def check_model_config(cfg: RunConfig, ldm: LatentDiffusion, where: Path) -> None:
    """The recipe's model sections must describe the checkpoint being fine-tuned."""
    now, then = cfg.to_dict(), ldm.cfg.to_dict()
    diffs = [f"{s}.{k}: recipe {now[s][k]!r} != checkpoint {then[s][k]!r}"
             for s in ("autoencoder", "unet") for k in now[s] if now[s][k] != then[s][k]]
    for k in ("schedule", "timesteps", "beta_start", "beta_end"):
        if now["diffusion"][k] != then["diffusion"][k]:
            diffs.append(f"diffusion.{k}: recipe {now['diffusion'][k]!r} != checkpoint {then['diffusion'][k]!r}")
    if diffs:
        raise UserError(f"--init {where} does not match the recipe: {'; '.join(diffs)}")


class _Preemption:
    """SIGTERM/SIGUSR1 -> finish the current logical step, checkpoint, exit 0 (SLURM requeue)."""

    def __init__(self) -> None:
        self.requested = False
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    if args.private:
        cfg.data.private = args.private
    set_threads(cfg)
    tc, pc = cfg.train, cfg.privacy
    if args.max_steps is not None and args.max_steps < 1:
        raise UserError(f"--max-steps must be >= 1, got {args.max_steps}")
    if not pc.enabled:
        raise UserError("privacy.enabled = false: `dpldm finetune` is the DP fine-tuning command; use "
                        "`bench/utility.py` for the non-private ceiling")
    run_dir = Path(tc.out_dir)
    refuse_to_clobber(run_dir, args.resume)
    torch.manual_seed(tc.seed)
    result = finetune(cfg, run_dir, init=args.init, resume=args.resume, max_steps=args.max_steps)
    print(json.dumps(result["privacy"], indent=2))
    return 0


def finetune(cfg: RunConfig, run_dir: Path, *, init: str | None = None, resume: bool = False,
             max_steps: int | None = None) -> dict[str, Any]:
    """Run (or continue) single-process DP fine-tuning; returns {"model": path, "privacy": report, ...}.

    Several ranks go through `launch/train.py` (dpldm.parallel.runner): one shared Poisson plan
    and ledger, lock-step chunks under ZeRO-3, rank-0 checkpoints."""
    tc, pc, dc = cfg.train, cfg.privacy, cfg.diffusion
    world_size = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")) or 1)
    if world_size > 1:
        raise UserError(f"`dpldm finetune` is single-process but WORLD_SIZE/SLURM_NTASKS = {world_size}: launch "
                        "several ranks with `deepspeed launch/train.py ...` (or torchrun/srun), see docs/distributed.md")
    ldm, init_path = resolve_init(argparse.Namespace(init=init), cfg)
    check_model_config(cfg, ldm, init_path)
    ldm.cfg = cfg  # sampling options and the saved config come from the recipe
    ldm.copy_ema_to_unet()  # fine-tune from the public EMA weights
    ldm.ae.requires_grad_(False).eval()
    unet = ldm.unet
    trainable_names = apply_finetune(unet, tc.finetune)
    unet.train()
    data = load_private_latents(cfg, ldm, cfg.data.private, init_path)
    N = len(data)

    found = load_latest_checkpoint(run_dir) if resume else None
    if resume and found is None and list_step_checkpoints(run_dir):
        raise UserError(f"{run_dir}: --resume, but none of its {len(list_step_checkpoints(run_dir))} step checkpoints "
                        "can be loaded (see the warnings above); refusing to start over, which would forget the "
                        "privacy already spent. Restore a checkpoint, or start a new run in another folder")
    if found is not None:
        tensors, meta, folder = found
        if meta.get("kind") != KIND:
            raise UserError(f"{folder}: not a fine-tuning checkpoint (kind {meta.get('kind')!r})")
        check_resume_config(cfg, meta["config"], ("autoencoder", "unet", "diffusion", "privacy"), folder)
        ledger = PrivacyLedger.from_state_dict(meta["privacy_ledger"])
        if ledger.num_examples != N:
            raise UserError(f"{folder}: the ledger covers N={ledger.num_examples} private examples, the data now "
                            f"has {N}; resuming on other data would void the accounting")
    else:
        seed = tc.seed if tc.deterministic else None  # None: the Poisson seed comes from the OS
        ledger = PrivacyLedger.from_config(pc, N, seed=seed)

    noise = GaussianNoise(secure=pc.secure_noise, seed=tc.seed if (tc.deterministic and not pc.secure_noise) else None)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    sched = warmup_scheduler(opt, tc.warmup_steps)
    loss_fn = DiffusionLossFn(ldm, cfg, tc.seed)
    dp = DPStep(unet, loss_fn, ledger, noise=noise, optimizer=opt, norm_method=pc.norm_method, backend=pc.backend)
    ema = EMA(unet, tc.ema_decay)
    if found is not None:
        tensors, meta, folder = found
        unet.load_state_dict({**unet.state_dict(), **unprefixed("model", tensors)})
        ema.load_state_dict(unprefixed("ema", tensors))
        load_optimizer_tensors(opt, tensors, meta["optimizer"])
        sched.load_state_dict(meta["scheduler"])
    start = ledger.steps_done

    total, trainable = count_parameters(unet)
    logger = RunLogger(run_dir, cfg, use_wandb=tc.wandb, total_steps=pc.steps, initial_step=start, job="finetune")
    logger.info(
        f"[finetune] public model {init_path}; private data: {data.description}\n"
        f"[finetune] trainable {trainable:,} of {total:,} UNet parameters ({100 * trainable / total:.1f}%, "
        f"{tc.finetune} + class embedder; cross-attention q/k frozen: zero gradient with a one-token context)\n"
        f"[finetune] DP: N={N}, expected batch q*N={ledger.expected_batch_size:.1f}, q={ledger.sample_rate:.5f}, "
        f"steps={pc.steps}, C={ledger.max_grad_norm:g}, sigma={ledger.noise_multiplier:.4f}, "
        f"noise std on the sum sigma*C={ledger.noise_std:.4g}, delta={ledger.delta:g}, accountant={ledger.accountant_name}, "
        f"epsilon after all steps={ledger.epsilon_after(pc.steps):.3f} (target {pc.epsilon}); K={dc.timesteps_per_example}, "
        f"physical batch {pc.physical_batch_size}, lr {tc.lr}, warmup {tc.warmup_steps}, noise "
        f"{noise.mode}, Poisson seed {'from config (deterministic)' if tc.deterministic else 'from the OS'}")

    preempt = _Preemption()
    t0 = time.time()
    stop_at = pc.steps if max_steps is None else min(pc.steps, start + max_steps)
    step = start
    try:
        while step < stop_at:
            loss_fn.at(step)
            idx = dp.begin_step()  # this rank's share of the Poisson sample (sorted, may be empty)
            for s in range(0, idx.numel(), pc.physical_batch_size):
                dp.accumulate(data.dataset.get_batch(idx[s:s + pc.physical_batch_size]))
            dp.step()  # noise once, reduce, / (q*N), AdamW
            sched.step()
            ema.update(unet)
            step += 1
            logger.advance()
            if step % tc.log_every == 0 or step == pc.steps:
                logger.log(step, {"epsilon": ledger.epsilon_spent(), "lr": sched.get_last_lr()[0],
                                  "steps_per_s": (step - start) / (time.time() - t0)})
            if step % tc.checkpoint_every == 0 or step == stop_at or preempt.requested:
                _save_step(run_dir, step, unet, ema, opt, sched, dp, cfg, trainable_names, tc.keep_checkpoints)
            if preempt.requested:
                logger.info(f"[finetune] preemption signal: checkpoint at step {step} written, exiting; rerun with --resume")
                break
    finally:
        preempt.restore()
        logger.close()

    report = privacy_report(ledger, pc, trainable, total, tc.finetune)
    if step < pc.steps:
        return {"model": None, "privacy": report, "steps_done": step, "finished": False}
    ldm.unet.load_state_dict(ema.module.state_dict())  # release the EMA weights (post-processing)
    ldm.ema = EMA(ldm.unet, tc.ema_decay)
    out = save_ldm(run_dir / "model", ldm, {"privacy": report, "finetuned_from": str(init_path),
                                            "private_data": data.description, "wall_s": round(time.time() - t0, 1)})
    return {"model": out, "privacy": report, "steps_done": step, "finished": True}


def privacy_report(ledger: PrivacyLedger, pc, trainable: int, total: int, finetune: str) -> dict[str, Any]:
    return {"epsilon": ledger.epsilon_spent(), "epsilon_target": pc.epsilon, "delta": ledger.delta,
            "noise_multiplier": ledger.noise_multiplier, "max_grad_norm": ledger.max_grad_norm,
            "sample_rate": ledger.sample_rate, "expected_batch_size": ledger.expected_batch_size,
            "num_examples": ledger.num_examples, "steps": ledger.steps_done, "accountant": ledger.accountant_name,
            "sampling": "poisson", "trainable_parameters": trainable, "total_unet_parameters": total,
            "finetune": finetune}


def _save_step(run_dir: Path, step: int, unet: nn.Module, ema: EMA, opt, sched, dp: DPStep, cfg: RunConfig,
               trainable_names: list[str], keep: int) -> None:
    trainable = {n: p for n, p in unet.named_parameters() if n in set(trainable_names)}
    opt_tensors, opt_meta = optimizer_tensors(opt)
    tensors = {**prefixed("model", trainable), **prefixed("ema", ema.state_dict()), **opt_tensors}
    state = dp.state_dict()
    save_step_checkpoint(run_dir, step, tensors,
                         {"kind": KIND, "config": cfg.to_dict(), "optimizer": opt_meta, "scheduler": sched.state_dict(),
                          "privacy_ledger": state["ledger"], "noise": state["noise"],
                          "epsilon_spent": dp.ledger.epsilon_spent()}, keep=keep)
