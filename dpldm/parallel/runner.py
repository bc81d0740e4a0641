"""The distributed DP fine-tuning run behind `launch/train.py` (any launcher, any ZeRO stage).

    plan      resolve and print every derived quantity (world size, batches, sigma, epsilon)
    ranks     init_distributed(): deepspeed / torchrun / srun / bare python
    ledger    built on rank 0, broadcast (same Poisson plan everywhere), or restored from the
              newest checkpoint of --out (any world size)
    UNet      built for the ZeRO stage (stage 3: frozen part partitioned, trainable replicated),
              weights from train.init_checkpoint (an LDM folder) loaded from rank 0
    loop      run_logical_step(): this rank's share, clipped sums, noise once (rank 0),
              all-reduce, / q*N, the same AdamW step on every rank
    stop      SIGTERM / SIGUSR1 on any rank, or a STOP file in --out: finish the logical step,
              checkpoint, exit 0 (the sbatch script requeues; the next start resumes)
    end       final checkpoint; rank 0 writes the consolidated single-process model to --out/model

Logged: step, epsilon spent, seconds per step. Never logged: losses, norms, batch sizes (private).
Per-example diffusion randomness (timesteps, noise, label drop) is drawn from (seed, step,
example index), so the result does not depend on how the sample is split over ranks and chunks.
"""
from __future__ import annotations

import dataclasses
import json
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dpldm.config import RunConfig, load_config, save_resolved
from dpldm.parallel.plan import PlanError, format_plan, read_hostfile, resolve_plan, unet_counts

STOP_FILE = "STOP"
_MIX = 0x9E3779B97F4A7C15


@dataclass
class RunOptions:
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    zero: str = "0"  # stage 0-3 or a DeepSpeed JSON path
    out: str | None = None
    resume: str = "auto"  # auto | never
    dry_run: bool = False
    hostfile: str | None = None  # dry run: world size from a hostfile
    world_size: int | None = None  # dry run: world size given directly
    synthetic_latents: int = 0  # >0: a random latent set of this size (smoke tests; not private data)
    sampling_seed: int | None = None  # Poisson plan seed (default: from the OS; private)
    noise_seed: int | None = None  # seeded noise (tests/deterministic reruns only; private)
    stop_after: int = 0  # >0: stop (checkpoint, exit 0) after this many steps in this invocation
    backend: str = "auto"
    check_every: int = 0  # >0: check replicas are bit-identical every this many steps
    random_init: bool = False  # smoke runs: a random model instead of train.init_checkpoint
    verbose: bool = True


# -- data -------------------------------------------------------------------------------------------

def latent_shape(cfg: RunConfig) -> tuple[int, int, int]:
    f = cfg.autoencoder.downsample_factor
    return (cfg.autoencoder.latent_channels, cfg.data.image_size // f, cfg.data.image_size // f)


def open_private(cfg: RunConfig, opts: RunOptions, ctx, init: dict[str, Any]):
    """The private latents (an IndexedDataset of UNSCALED latents, as the latent cache stores them):
      * a latent shard folder (`dpldm data encode`): every rank opens it and reads its share by
        index; the folder must come from the init model's autoencoder (checked by hash);
      * a source name / image folder / .npz (as `dpldm finetune` takes): rank 0 encodes it once
        with the frozen encoder and broadcasts the latents (fine for sets that fit in memory;
        encode large sets beforehand);
      * --synthetic-latents N: random latents (smoke runs, not private data)."""
    from dpldm.data.loaders import InMemoryDataset, open_private_dataset

    if opts.synthetic_latents:
        g = torch.Generator().manual_seed(12345)
        x = torch.randn((opts.synthetic_latents, *latent_shape(cfg)), generator=g)
        y = torch.randint(0, cfg.data.num_classes, (opts.synthetic_latents,), generator=g)
        return InMemoryDataset(x, y, kind="latents", num_classes=cfg.data.num_classes)
    folder = Path(cfg.data.private)
    if folder.is_dir() and (folder / "manifest.json").is_file():
        ds = open_private_dataset(folder, expected_ae_hash=init["ae_hash"])
        if ds.kind != "latents":
            raise PlanError(f"{folder}: holds {ds.kind}, not latents; run `dpldm data encode --shards {folder} "
                            f"--autoencoder {init['folder']} --out DIR` and set data.private = DIR")
        return ds
    payload = None
    if ctx.is_main:
        from types import SimpleNamespace

        from dpldm.models.ldm import load_autoencoder
        from dpldm.train.finetune import load_private_latents

        ae, _, _ = load_autoencoder(init["folder"])
        data = load_private_latents(cfg, SimpleNamespace(ae=ae.requires_grad_(False)), cfg.data.private, None)
        payload = (data.dataset.x, data.dataset.y, data.dataset.num_classes)
    x, y, k = ctx.broadcast_object(payload)
    return InMemoryDataset(x, y, kind="latents", num_classes=k)


def count_private(cfg: RunConfig, opts: RunOptions) -> int:
    """N without loading the data (dry runs): a latent folder's manifest, or the source's size."""
    if opts.synthetic_latents:
        return int(opts.synthetic_latents)
    folder = Path(cfg.data.private)
    if folder.is_dir() and (folder / "manifest.json").is_file():
        from dpldm.data.manifest import open_shard_folder

        return int(open_shard_folder(folder).num_examples)
    from dpldm.data.sources import load_source

    try:
        _, labels, _ = load_source(cfg.data.private, "train")
    except Exception as e:  # noqa: BLE001 - any source error: say which setting
        raise PlanError(f"data.private={cfg.data.private!r}: {e}") from None
    return int(len(labels))


# -- per-example diffusion randomness, independent of ranks and chunks --------------------------------

def per_example_draws(idx: torch.Tensor, step: int, seed: int, K: int, shape: tuple[int, ...], T: int,
                      drop_prob: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """t (B*K,), noise (B*K, *shape), drop (B,) from one generator per (seed, step, example)."""
    ts, noises, drops = [], [], []
    for i in idx.tolist():
        g = torch.Generator().manual_seed((seed * 1_000_003 + (step + 1) * _MIX + int(i) * 7_919) % (2**63 - 1))
        ts.append(torch.randint(0, T, (K,), generator=g))
        noises.append(torch.randn((K, *shape), generator=g))
        drops.append(torch.rand((), generator=g) < drop_prob)
    if not ts:
        return (torch.zeros(0, dtype=torch.int64), torch.zeros((0, *shape)), torch.zeros(0, dtype=torch.bool))
    return torch.cat(ts), torch.cat(noises), torch.stack(drops)


def make_loss_fn(cfg: RunConfig, schedule, device: torch.device):
    """per_example_loss_fn(unet, batch) for the DPStep; batch = (z0, y, idx, step).
    Classifier-free-guidance label drop is drawn per example (all K copies share it)."""
    from dpldm.diffusion.loss import per_example_loss

    K = cfg.diffusion.timesteps_per_example
    seed = cfg.train.seed

    def loss_fn(unet, batch):
        z0, y, idx, step = batch
        t, noise, drop = per_example_draws(idx, step, seed, K, tuple(z0.shape[1:]), schedule.num_timesteps,
                                           cfg.diffusion.cond_drop_prob)
        y = torch.where(drop, torch.full_like(y, unet.null_class), y)
        return per_example_loss(unet, z0.to(device), y.to(device), schedule, K, t=t.to(device), noise=noise.to(device))

    return loss_fn


# -- the run ------------------------------------------------------------------------------------------

RESUME_FREE = {("privacy", "physical_batch_size"), ("privacy", "backend"), ("privacy", "norm_method")}


def check_resume(cfg: RunConfig, saved: dict[str, Any], where: str) -> None:
    """A resumed run trains the same model on the same data with the same mechanism: the model,
    diffusion and privacy sections must match the checkpoint's (the physical batch, kernel
    backend and norm method may change with the hardware; they do not change the result)."""
    now = cfg.to_dict()
    saved = RunConfig.from_dict(saved, f"{where}/meta.json").to_dict()  # lists -> tuples, as now
    diffs = [f"{sec}.{k}: checkpoint {saved[sec].get(k)!r} != now {now[sec][k]!r}"
             for sec in ("autoencoder", "unet", "diffusion", "privacy") for k in now[sec]
             if (sec, k) not in RESUME_FREE and now[sec][k] != saved[sec].get(k)]
    if cfg.train.finetune != saved["train"]["finetune"]:
        diffs.append(f"train.finetune: checkpoint {saved['train']['finetune']!r} != now {cfg.train.finetune!r}")
    if diffs:
        raise PlanError(f"cannot resume from {where}: the config changed ({'; '.join(diffs)})")


class TrainableEMA:
    """EMA of the trainable tensors (the frozen ones never change, so this is the EMA of the whole
    UNet, as `dpldm finetune` keeps): first update copies, then ema = d*ema + (1-d)*p. Post-
    processing of the released updates: no privacy cost. Replicated like the parameters."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float) -> None:
        self.decay = float(decay)
        self.shadow = {n: p.detach().clone() for n, p in params.items()}
        self.count = 0

    @torch.no_grad()
    def update(self, params: dict[str, torch.nn.Parameter]) -> None:
        for n, p in params.items():
            if self.count == 0:
                self.shadow[n].copy_(p)
            else:
                self.shadow[n].mul_(self.decay).add_(p.detach(), alpha=1 - self.decay)
        self.count += 1

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"ema.{n}": t.detach().cpu().clone() for n, t in self.shadow.items()}
        out["ema_count"] = torch.tensor(self.count, dtype=torch.int64)
        return out

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for n, t in self.shadow.items():
            t.copy_(tensors[f"ema.{n}"].to(device=t.device, dtype=t.dtype))
        self.count = int(tensors["ema_count"])


class _StopFlag:
    """First SIGTERM/SIGUSR1: finish the logical step, checkpoint, exit. A second SIGTERM exits at
    once (a launcher tearing down ranks whose peer died must not wait for a collective)."""

    def __init__(self) -> None:
        self.raised = 0
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                signal.signal(sig, self._handler)
            except (ValueError, OSError):  # not the main thread
                pass

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        if self.raised and signum == signal.SIGTERM:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.raise_signal(signal.SIGTERM)
        self.raised = 1


def _log(ctx, opts: RunOptions, msg: str) -> None:
    if ctx.is_main and opts.verbose:
        print(msg, flush=True)


def dry_run_world_size(opts: RunOptions) -> int:
    if opts.world_size:
        return int(opts.world_size)
    if opts.hostfile:
        return sum(s for _, s in read_hostfile(opts.hostfile))
    from dpldm.parallel.env import resolve_launch_env

    return resolve_launch_env().world_size


def plan_only(opts: RunOptions) -> dict[str, Any]:
    cfg = load_config(opts.config, opts.overrides)
    from dpldm.parallel.zero import load_ds_config, zero_stage

    stage = zero_stage(load_ds_config(opts.zero, cfg.privacy.physical_batch_size))
    world = dry_run_world_size(opts)
    return resolve_plan(cfg, count_private(cfg, opts), world, stage, unet_counts(cfg))


def run(opts: RunOptions) -> int:
    from dpldm.parallel.zero import load_ds_config, zero_stage

    cfg = load_config(opts.config, opts.overrides)
    ds_config = load_ds_config(opts.zero, cfg.privacy.physical_batch_size)
    stage = zero_stage(ds_config)
    if opts.dry_run:
        plan = plan_only(opts)
        print("dry run: resolved plan (nothing trained)")
        print(format_plan(plan))
        print("PLAN_JSON " + json.dumps(plan, sort_keys=True))
        return 0
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)

    from dpldm.parallel.dist import init_distributed

    ctx = init_distributed(opts.backend)
    try:
        return _train(cfg, opts, ctx, ds_config, stage)
    finally:
        ctx.close()


def _init_state(cfg: RunConfig, out: Path, ctx, random_init: bool = False) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
    """Rank 0: the UNet weights to start from -- the public model's EMA weights when it has them,
    as `dpldm finetune` does -- and (all ranks) where they come from: the LDM folder, its latent
    scale factor and its autoencoder's hash. train.init_checkpoint empty or "public": the shipped
    glyph model. `random_init` (--random-init, smoke runs only): a randomly initialised model,
    written to out/init_model so that consolidation and resumption find it."""
    from dpldm.checkpoint import load_checkpoint, unprefixed
    from dpldm.data.latents import ae_state_hash
    from dpldm.models.ldm import LatentDiffusion, _model_folder, public_model_path, save_ldm

    unet_state, info, problem = None, None, None
    if ctx.is_main:
        if random_init:
            folder = out / "init_model"
            if not (folder / "meta.json").is_file():
                print("warning: --random-init: fine-tuning a RANDOMLY initialised model (smoke run); "
                      f"it is saved to {folder}", flush=True)
                torch.manual_seed(cfg.train.seed)
                save_ldm(folder, LatentDiffusion(cfg))
        elif cfg.train.init_checkpoint and cfg.train.init_checkpoint != "public":
            folder = _model_folder(cfg.train.init_checkpoint)
        else:
            folder = public_model_path()  # as `dpldm finetune`: the shipped glyph model
        if not (folder / "meta.json").is_file():
            problem = f"init model {folder} not found (train.init_checkpoint)"
    if ctx.is_main and not problem:
        tensors, meta = load_checkpoint(folder)
        if meta.get("kind") != "ldm":
            problem = f"train.init_checkpoint={folder}: expected an LDM folder, got kind {meta.get('kind')!r}"
        else:
            saved, now = RunConfig.from_dict(meta["config"], f"{folder}/meta.json").to_dict(), cfg.to_dict()
            diffs = [f"{sec}.{k}: recipe {now[sec][k]!r} != init model {saved[sec].get(k)!r}"
                     for sec in ("autoencoder", "unet") for k in now[sec] if now[sec][k] != saved[sec].get(k)]
            if diffs:
                problem = f"train.init_checkpoint={folder} does not match the recipe: {'; '.join(diffs)}"
            ema = unprefixed("module", unprefixed("ema", tensors))
            unet_state = ema if ema else unprefixed("unet", tensors)
            info = {"folder": str(folder), "scale_factor": float(meta.get("scale_factor", 1.0)),
                    "ae_hash": ae_state_hash(unprefixed("ae", tensors)), "weights": "ema" if ema else "unet"}
    problem, info = ctx.broadcast_object((problem, info))
    if problem:
        raise PlanError(problem)
    return unet_state, info


def _train(cfg: RunConfig, opts: RunOptions, ctx, ds_config: dict, stage: int) -> int:
    from dpldm.diffusion.schedule import DiffusionSchedule
    from dpldm.models.selection import apply_finetune
    from dpldm.models.unet import UNet
    from dpldm.parallel.state import (consolidate, load_latest_dp_checkpoint, restore_dp_state, save_dp_checkpoint,
                                      shared_ledger)
    from dpldm.parallel.step import run_logical_step
    from dpldm.parallel.zero import build_model
    from dpldm.privacy.dp_step import DPStep
    from dpldm.privacy.noise import GaussianNoise

    out = Path(opts.out or cfg.train.out_dir)
    stop = _StopFlag()
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if (out / STOP_FILE).exists():  # not removed here: a scheduler may have asked during start-up
            print(f"warning: {out / STOP_FILE} exists: the run stops after its first logical step "
                  "(delete the file to train on)", flush=True)
        save_resolved(cfg, out)
    ctx.barrier()

    state, init = _init_state(cfg, out, ctx, opts.random_init)
    dataset = open_private(cfg, opts, ctx, init)
    N = len(dataset)
    plan = ctx.broadcast_object(resolve_plan(cfg, N, ctx.world_size, stage) if ctx.is_main else None)
    resumed = load_latest_dp_checkpoint(ctx, out) if opts.resume == "auto" else None
    ledger = shared_ledger(ctx, dataclasses.replace(cfg.privacy, noise_multiplier=plan["noise_multiplier"]), N,
                           seed=opts.sampling_seed, state=resumed[1]["privacy"]["ledger"] if resumed else None)
    if ledger.noise_multiplier != plan["noise_multiplier"]:  # resumed: the checkpoint's sigma rules
        plan["noise_multiplier"] = ledger.noise_multiplier
        plan["epsilon"] = ledger.epsilon_after(cfg.privacy.steps)
    _log(ctx, opts, f"distributed DP fine-tuning: {ctx.world_size} rank(s) via {ctx.launcher}, backend {ctx.backend}, "
                    f"ZeRO stage {stage}\n{format_plan(plan)}")

    model = build_model(lambda: UNet(cfg.unet), ctx, ds_config,
                        select_trainable=lambda m: apply_finetune(m, cfg.train.finetune), state=state)
    del state
    unet = model.module
    trainable = model.trainable()
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    from dpldm.train.common import warmup_scheduler

    lr_sched = warmup_scheduler(optimizer, cfg.train.warmup_steps)
    ema = TrainableEMA(trainable, cfg.train.ema_decay)
    schedule = DiffusionSchedule.from_config(cfg.diffusion)
    noise = GaussianNoise(secure=cfg.privacy.secure_noise, seed=opts.noise_seed)
    dp = DPStep(unet, make_loss_fn(cfg, schedule, ctx.device), ledger, noise=noise, optimizer=optimizer,
                world=ctx.world(), norm_method=cfg.privacy.norm_method, backend=cfg.privacy.backend)
    if resumed:
        ck_tensors, ck_meta, ck_folder = resumed
        check_resume(cfg, ck_meta["config"], ck_folder)
        restore_dp_state(model, optimizer, dp, ck_tensors, ck_meta)
        ema.load(ck_tensors)
        lr_sched.load_state_dict(ck_meta["scheduler"])
        del ck_tensors
        _log(ctx, opts, f"resumed from {ck_folder}: step {ledger.steps_done}, epsilon spent "
                        f"{ledger.epsilon_spent():.4g} (saved by {ck_meta['world_size']} rank(s), now {ctx.world_size})")
    model.sync_check()

    def load(idx: torch.Tensor):
        x, y = dataset.get_batch(idx)  # latents as cached (unscaled)
        return (x * scale).to(ctx.device), y, idx, dp.step_index

    scale = init["scale_factor"]
    dummy = (torch.zeros((1, *latent_shape(cfg)), device=ctx.device), torch.zeros(1, dtype=torch.int64),
             torch.zeros(1, dtype=torch.int64), 0)
    meta = {"config": cfg.to_dict(), "init_checkpoint": init["folder"], "init_weights": init["weights"], "plan": plan}
    unet.train()
    done_here = 0
    t_last = time.perf_counter()
    stopped = False
    while dp.step_index < cfg.privacy.steps:
        run_logical_step(dp, load, cfg.privacy.physical_batch_size, lockstep=model.lockstep, dummy_batch=dummy,
                         after_pass=model.after_backward if model.stage == 3 else None)
        lr_sched.step()
        ema.update(trainable)
        done_here += 1
        s = dp.step_index
        if opts.check_every and s % opts.check_every == 0:
            model.sync_check()
        if ctx.is_main and (s % cfg.train.log_every == 0 or s == cfg.privacy.steps):
            now = time.perf_counter()
            print(f"step {s}/{cfg.privacy.steps}  epsilon {ledger.epsilon_spent():.4g}  "
                  f"{(now - t_last):.2f}s", flush=True)
            t_last = now
        want_stop = stop.raised or (ctx.is_main and (out / STOP_FILE).exists()) or \
            (opts.stop_after and done_here >= opts.stop_after)
        want_stop = ctx.all_reduce_max_int(int(bool(want_stop)))
        if s % cfg.train.checkpoint_every == 0 or s == cfg.privacy.steps or want_stop:
            save_dp_checkpoint(ctx, out, model, optimizer, dp, {**meta, "step": s, "scheduler": lr_sched.state_dict()},
                               keep=cfg.train.keep_checkpoints, extra_tensors=ema.tensors())
        if want_stop and s < cfg.privacy.steps:
            stopped = True
            break
    if stopped:
        if ctx.is_main:
            (out / STOP_FILE).unlink(missing_ok=True)  # honoured: a plain rerun trains on
        _log(ctx, opts, f"stopped at step {dp.step_index} (checkpoint written); rerun the same command to resume")
        _log(ctx, opts, "RESULT_JSON " + json.dumps({"stopped": True, "step": dp.step_index,
                                                     "epsilon": ledger.epsilon_spent()}))
        return 0
    if ctx.is_main:
        (out / STOP_FILE).unlink(missing_ok=True)
        model_dir = consolidate(out, out / "model")
        print(f"consolidated single-process model: {model_dir}", flush=True)
        print("RESULT_JSON " + json.dumps({"stopped": False, "step": dp.step_index, "epsilon": ledger.epsilon_spent(),
                                           "model": str(model_dir)}), flush=True)
    ctx.barrier()
    return 0


def options_from_args(args) -> RunOptions:
    return RunOptions(config=args.config, overrides=list(args.set or []), zero=str(args.zero), out=args.out,
                      resume=args.resume, dry_run=args.dry_run, hostfile=args.hostfile, world_size=args.world_size,
                      synthetic_latents=args.synthetic_latents, sampling_seed=args.sampling_seed,
                      noise_seed=args.noise_seed, stop_after=args.stop_after, backend=args.backend,
                      check_every=args.check_every, random_init=args.random_init)


def main_consolidate(checkpoint: str, out: str | None, init: str | None) -> int:
    from dpldm.parallel.state import consolidate

    target = Path(out) if out else Path(checkpoint) / "model"
    folder = consolidate(checkpoint, target, init)
    print(f"consolidated single-process model: {folder}")
    return 0

