"""THE DP fine-tuning trainer: one loop for `dpldm finetune`, `make demo`, `launch/train.py` under
deepspeed / torchrun / srun, and a bare `python`, on one process or many ranks, CPU or GPU.

    set-up    run folder (writable, locked, no clobber) -> init model (public EMA weights, rank 0)
              -> private data (latent shards by index, or a source encoded once) -> resume
              (newest usable checkpoint: same data, same init, same mechanism) or fresh secrets
              (Poisson seed and diffusion seed from the OS) -> privacy ledger (sigma, q, C, delta)
              -> UNet built for this world (one rank: plain module, no DeepSpeed; several ranks:
              replicated, or ZeRO-3 with the frozen part partitioned) -> AdamW, warm-up, EMA
    step      run_logical_step: this rank's chunks of the GLOBAL Poisson sample (fixed-shape by
              default: the same padded chunks every step, truncation accounted in delta) -> clipped
              per-example sums (book-keeping, fp64 accumulators) -> noise ONCE (rank 0) ->
              all-reduce -> / q*N -> AdamW -> EMA -> the step fsynced to the privacy journal
              before its metrics row, checkpoint or grid
    stop      SIGTERM / SIGUSR1 / SIGINT, a STOP file, or --max-steps: finish the step, checkpoint,
              exit 0 and say how to resume (`stop_reason` in the result)
    end       rank 0 writes <out>/model: the init model with the EMA of the trained tensors, and a
              public privacy report

Only public numbers are logged (step, epsilon, lr): never losses, norms or realised batch sizes of
private data, and in a private run no timing either: no steps/s, examples/s or wall time in
metrics.jsonl, stdout, the progress bar or the released meta; wandb's system metrics and console
capture are off by default. wandb itself stamps each row with `_runtime` and files carry mtimes:
with fixed-shape steps (privacy.fixed_shape, the default) every step does the same work, so these
follow public shapes, not the realised Poisson batch; with privacy.fixed_shape = false a step's
duration grows with |S| (a private count) and they can leak it. A `--not-private` run (seeded,
epsilon = inf) also logs steps/s and wall time.

What reaches the private chunks is covered by the guarantee: the whole UNet runs in eval mode
(dropout off; GroupNorm/LayerNorm behave the same), and at set-up one discarded forward+backward
of a PUBLIC synthetic batch (DPStep.probe) must change no parameter or buffer, draw nothing from
torch's global RNG, and give each example the same clipped gradient alone as in the batch (no op
may mix examples: dpldm.privacy.independence); the kernel selector measures on public shapes in that pass, after reading
free memory before any private data, and is frozen before the first private chunk. A sample grid
is written only at a step already checkpointed (checkpoint, then grid), so a crash never re-runs
a step whose grid was released. See dp_state.py for the checkpoint schema and the resume rule,
dp_loss.py / draws.py for the per-example randomness, and privacy/dp_step.py for the DP step.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from dpldm.checkpoint import list_step_checkpoints
from dpldm.config import RunConfig
from dpldm.errors import RunFolderError, UserError
from dpldm.train.dp_init import load_init, state_sha256
from dpldm.train.dp_options import FinetuneOptions, check_explicit_sigma, check_privacy_settings
from dpldm.train.dp_release import RESULT_PREFIX, print_result, release_from_checkpoint, resume_hint
from dpldm.train.dp_state import InitInfo

KERNEL_CHOICES = "kernel_selection.json"  # the measured kernel choices of a run (public shapes only)
PROBE_EXAMPLES, PROBE_SEED = 3, 0  # the set-up probe's public synthetic batch (per-example independence)


# -- the process context -----------------------------------------------------------------------------

def open_context(cfg: RunConfig, opts: FinetuneOptions):
    """One rank: a plain context on train.device (no process group, no DeepSpeed import).
    Several ranks (from the launcher's environment): a process group via DeepSpeed."""
    from dpldm.parallel.dist import init_distributed, single_process_context
    from dpldm.parallel.env import resolve_launch_env
    from dpldm.utils.device import resolve_device

    env = resolve_launch_env()
    if env.world_size == 1:
        return single_process_context(resolve_device(cfg.train.device, "--device"))
    return init_distributed(opts.dist_backend, timeout_s=opts.collective_timeout_s, env=env, device=cfg.train.device)


def train(cfg: RunConfig, opts: FinetuneOptions) -> dict[str, Any]:
    """Run (or continue) DP fine-tuning; returns {"model", "privacy", "steps_done", "finished", ...}."""
    check_privacy_settings(cfg)
    if opts.max_steps is not None and opts.max_steps < 1:
        raise UserError(f"--max-steps must be >= 1, got {opts.max_steps}")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    ctx = open_context(cfg, opts)
    trainer = None
    try:
        trainer = Trainer(cfg, opts, ctx)
        result = trainer.run()
        ctx.barrier()  # every rank is past its last collective before the process group is torn down
        return result
    except Exception as e:
        from dpldm.parallel.failure import is_collective_failure, peer_failure

        if ctx.world_size > 1 and is_collective_failure(e):
            step = trainer.dp.step_index + 1 if trainer is not None and getattr(trainer, "dp", None) else None
            raise peer_failure(e, ctx.rank, ctx.world_size, step, opts.out, opts.command) from None
        raise
    finally:
        ctx.close()


class _NullLogger:
    def info(self, message: str) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def log(self, step: int, scalars: dict[str, Any], echo: bool = True) -> None:
        pass

    def log_image(self, step: int, path: Path) -> None:
        pass

    def close(self) -> None:
        pass


# -- the trainer ---------------------------------------------------------------------------------------

class Trainer:
    """Holds the run's objects; `run()` is the one loop. Built on every rank."""

    def __init__(self, cfg: RunConfig, opts: FinetuneOptions, ctx) -> None:
        self.cfg, self.opts, self.ctx = cfg, opts, ctx
        self.run_dir = Path(opts.out)
        self.lock = None
        self.created_run_dir = False
        self.init_ldm = None  # rank 0: the init model (CPU), for sample grids and the release
        self.history: list[dict[str, Any]] = []  # resumes and what changed at each

    # -- set-up, in order -------------------------------------------------------------------------------
    def _claim_run_folder(self) -> None:
        from dpldm.train.run_folder import RunFolderLock, check_resumable, check_writable

        def claim():
            self.created_run_dir = not self.run_dir.exists()
            if self.opts.resume == "must":
                check_resumable(self.run_dir)
            check_writable(self.run_dir)
            self.lock = RunFolderLock(self.run_dir).acquire()
            try:
                if self.opts.resume == "never":
                    if list_step_checkpoints(self.run_dir):
                        raise RunFolderError(f"{self.run_dir} already holds step checkpoints: pass --resume to "
                                             "continue that run, or pick another --out")
                    if (self.run_dir / "model" / "meta.json").is_file():
                        raise RunFolderError(f"{self.run_dir}/model already holds a released model: pick another --out")
            except BaseException:
                self._release_lock(failed=True)
                raise

        self.ctx.on_main(claim, share=False)

    def _setup(self) -> None:
        from dpldm.diffusion.schedule import DiffusionSchedule
        from dpldm.models.selection import apply_finetune
        from dpldm.models.unet import UNet
        from dpldm.parallel.zero import build_model, load_ds_config, zero_stage
        from dpldm.privacy import DPStep, GaussianNoise, PrivacyLedger
        from dpldm.train.common import warmup_scheduler
        from dpldm.train.dp_loss import ChunkBatch, DiffusionDPLoss
        from dpldm.train.dp_state import (TrainableEMA, check_same_data, check_same_init, config_changes,
                                          journal_ledger_state, load_latest_state, restore_state,
                                          set_aside_stale_journal)
        from dpldm.train.draws import new_secret_seed
        from dpldm.train.private_data import latent_shape, open_private_data

        cfg, ctx, tc, pc = self.cfg, self.ctx, self.cfg.train, self.cfg.privacy

        # kernels chosen by measurement on this machine (public shapes, synthetic data); the free-memory budget is
        # read now, before any private data is on the device
        self.selector = None
        if pc.backend == "auto":
            from dpldm.kernels.selection import KernelSelector

            self.selector = KernelSelector(pc.physical_batch_size,
                                           cache_path=self.run_dir / KERNEL_CHOICES if ctx.is_main else None)
            self.selector.pin_budget(ctx.device)

        # init model (rank 0 holds it; everyone learns where it came from)
        def init():
            info, self.init_ldm = load_init(cfg, self.opts, self.run_dir)
            return info
        self.init: InitInfo = ctx.on_main(init)

        # private data
        ae = self.init_ldm.ae.to(ctx.device) if ctx.is_main else None
        self.data = open_private_data(cfg, ctx, ae=ae, ae_sha256=self.init.ae_sha256,
                                      synthetic=self.opts.synthetic_latents)
        if ctx.is_main:
            self.init_ldm.ae.cpu()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()  # nothing of an encoded private source stays cached on the device
        N = len(self.data)
        if self.selector is not None:  # a chunk never holds more than N examples: measure at most N rows
            self.selector.cap_rows(N)

        # resume, or fresh secrets: everything decided on rank 0 and shared
        resumed = ctx.on_main(lambda: load_latest_state(self.run_dir, self.opts.allow_older_checkpoint)
                              if self.opts.resume != "never" else None)
        if resumed is not None:
            tensors, meta, folder = resumed
            changed = config_changes(cfg, meta["config"], str(folder))
            check_same_data(meta, self.data.fingerprint, N, str(folder))
            check_same_init(meta, self.init, str(folder))
            ledger_state = ctx.on_main(lambda: journal_ledger_state(self.run_dir, meta["privacy"]["ledger"],
                                                                    self.opts.verbose))
            diffusion_seed = int(meta["secrets"]["diffusion_seed"])
            self.history = list(meta.get("resumes", [])) + [{"at_step": int(meta["step"]), "world_size":
                                                               ctx.world_size, "changed": changed}]
        else:
            def fresh():
                ledger = PrivacyLedger.from_config(pc, N, seed=tc.seed if tc.deterministic else None)
                ledger.epsilon_after(pc.steps)  # accountable to the end (bounded; raises before any work)
                check_explicit_sigma(pc, ledger)
                return ledger.state_dict(), (tc.seed if tc.deterministic else new_secret_seed())
            ledger_state, diffusion_seed = ctx.on_main(fresh)
            ctx.on_main(lambda: set_aside_stale_journal(self.run_dir), share=False)
        self.ledger = PrivacyLedger.from_state_dict(ledger_state)
        self.diffusion_seed = diffusion_seed

        # the model for this world
        W = ctx.world_size
        ds_config = load_ds_config(self.opts.zero if W > 1 else 0, pc.physical_batch_size)
        self.stage = zero_stage(ds_config)
        state = self.init_ldm.unet.state_dict() if ctx.is_main else None
        self.model = build_model(lambda: UNet(cfg.unet), ctx, ds_config,
                                 select_trainable=lambda m: apply_finetune(m, tc.finetune), state=state)
        del state
        unet = self.model.module
        unet.eval()  # the whole UNet: frozen modules and dropout off (GroupNorm/LayerNorm behave the same)
        self.trainable = self.model.trainable()
        self.optimizer = torch.optim.AdamW(list(self.trainable.values()), lr=tc.lr, weight_decay=tc.weight_decay)
        self.scheduler = warmup_scheduler(self.optimizer, tc.warmup_steps, pc.steps, tc.lr_decay)
        self.ema = TrainableEMA(self.trainable, tc.ema_decay)
        noise = GaussianNoise(secure=pc.secure_noise, seed=tc.seed if tc.deterministic else None)
        loss = DiffusionDPLoss(DiffusionSchedule.from_config(cfg.diffusion), scale_factor=self.init.scale_factor,
                               timesteps_per_example=cfg.diffusion.timesteps_per_example,
                               cond_drop_prob=cfg.diffusion.cond_drop_prob, seed=diffusion_seed, device=ctx.device,
                               precision=tc.precision)
        self.dp = DPStep(unet, loss, self.ledger, noise=noise, optimizer=self.optimizer, world=ctx.world(),
                         norm_method=pc.norm_method, backend=pc.backend, physical_batch_size=pc.physical_batch_size,
                         acc_dtype=torch.float64, selector=self.selector, fixed_shape=self._fixed_shape(N))
        if resumed is not None:
            tensors, meta, folder = resumed
            restore_state(tensors, meta, trainable=self.trainable, ema=self.ema, optimizer=self.optimizer,
                          scheduler=self.scheduler)
        self.dummy = ChunkBatch(torch.zeros((1, *latent_shape(cfg))), torch.zeros(1, dtype=torch.int64),
                                torch.zeros(1, dtype=torch.int64), 0)  # public, discarded (ZeRO-3 lock-step, probe)
        g = torch.Generator().manual_seed(PROBE_SEED)  # public synthetic latents: nothing private in the probe
        n = PROBE_EXAMPLES
        self.probe_batch = ChunkBatch(torch.randn((n, *latent_shape(cfg)), generator=g),
                                      torch.arange(n, dtype=torch.int64) % cfg.data.num_classes,
                                      torch.arange(n, dtype=torch.int64), 0)
        self._probe()
        self.model.sync_check()
        self.resumed_from = str(resumed[2]) if resumed is not None else None
        self.saved_by = resumed[1]["world_size"] if resumed is not None else None

    def _fixed_shape(self, N: int):
        """The public step shape of a fixed-shape run (privacy.fixed_shape), else None."""
        from dpldm.privacy.fixed_shape import plan_fixed_shape

        pc, led = self.cfg.privacy, self.ledger
        if not pc.fixed_shape:
            return None
        eps = pc.epsilon if pc.epsilon is not None else led.epsilon_after(pc.steps)
        return plan_fixed_shape(N, led.sample_rate, pc.steps, eps, led.delta, pc.physical_batch_size,
                                pc.truncation_delta)

    def _probe(self) -> None:
        """Before the first private chunk (collective): discarded forward+backward passes of the PUBLIC
        synthetic probe batch must change no parameter or buffer, draw nothing from torch's global RNG
        and mix no examples (DPStep.probe), and measures every kernel choice on public shapes; then every rank adopts
        rank 0's choices and the selector is frozen (no measurement beside private data)."""
        self.dp.probe(self.probe_batch, low_precision=self.cfg.train.precision != "fp32")
        if self.stage == 3:
            self.model.after_backward()
        if self.selector is not None:
            choices = self.ctx.broadcast_object(self.selector.state_dict() if self.ctx.is_main else None)
            if not self.ctx.is_main:
                self.selector.load_state_dict(choices, replace=True)
            self.selector.freeze("measured at set-up on the public dummy batch, before any private chunk")

    def _start_logger(self):
        from dpldm.models.selection import count_parameters
        from dpldm.utils.device import describe_device
        from dpldm.utils.logging import RunLogger

        self.total_params, self.trainable_params = count_parameters(self.model.module)
        if not self.ctx.is_main:
            return _NullLogger()
        cfg, pc, tc, led = self.cfg, self.cfg.privacy, self.cfg.train, self.ledger
        logger = RunLogger(self.run_dir, cfg, use_wandb=tc.wandb, total_steps=pc.steps, initial_step=led.steps_done,
                           job="finetune", resume=self.resumed_from is not None, private=not tc.not_private)
        where = (f"{self.ctx.world_size} rank(s) via {self.ctx.launcher}, {self.ctx.backend}, ZeRO stage {self.stage}"
                 if self.ctx.world_size > 1 else "one process")
        private = "" if not tc.not_private else " -- NOT PRIVATE (train.not_private: epsilon reported as inf)"
        chunks = math.ceil(math.ceil(led.expected_batch_size) / pc.physical_batch_size)
        if self.ctx.world_size > chunks:
            logger.info(f"warning: {self.ctx.world_size} ranks but about {chunks} physical chunk(s) per step (q*N = "
                        f"{led.expected_batch_size:g}, privacy.physical_batch_size={pc.physical_batch_size}): some "
                        "ranks idle; a smaller physical batch uses them all")
        logger.info(
            f"[finetune] device {describe_device(self.ctx.device)}, precision {tc.precision}, {where}\n"
            f"[finetune] public model {self.init.folder}; private data: {self.data.description}\n"
            f"[finetune] trainable {self.trainable_params:,} of {self.total_params:,} UNet parameters "
            f"({100 * self.trainable_params / self.total_params:.1f}%, {tc.finetune} + class embedder; cross-attention "
            f"q/k frozen: zero gradient with a one-token context)\n"
            f"[finetune] DP: N={led.num_examples}, q={led.sample_rate:.5g}, expected batch q*N={led.expected_batch_size:.1f}, "
            f"steps={pc.steps}, C={led.max_grad_norm:g}, sigma={led.noise_multiplier:.4f}, noise std on the sum "
            f"sigma*C={led.noise_std:.4g}, on the update sigma*C/(qN)={led.noise_std / led.expected_batch_size:.3g}, "
            f"delta={led.delta:g}, accountant={led.accountant_name}, epsilon after all steps="
            f"{led.epsilon_after(pc.steps):.3f} (target {pc.epsilon}){private}\n"
            f"[finetune] K={self.cfg.diffusion.timesteps_per_example}, physical batch {pc.physical_batch_size}, lr {tc.lr} "
            f"({tc.lr_decay}), warm-up {tc.warmup_steps}, EMA {tc.ema_decay}, noise {self.dp.noise.mode}, seeds "
            f"{'from train.seed (deterministic)' if tc.deterministic else 'from the OS (secret)'}"
            + (f"\n[finetune] resumed from {self.resumed_from} at step {led.steps_done} (epsilon spent "
               f"{led.epsilon_spent():.4g}; saved by {self.saved_by} rank(s), now {self.ctx.world_size}); changed "
               f"since: {self.history[-1]['changed'] or 'nothing'}" if self.resumed_from else ""))
        if cfg.unet.dropout > 0:
            logger.info(f"[finetune] unet.dropout = {cfg.unet.dropout:g} is OFF in DP fine-tuning: the UNet runs in eval "
                        "mode (dropout masks drawn from the global RNG by row position would break the DP bound)")
        fs = self.dp.fixed_shape
        if fs is not None:
            logger.info(f"[finetune] fixed-shape steps: {fs.num_chunks} chunks x {fs.rows} slots = {fs.num_chunks * fs.rows} "
                        f"per step ({fs.num_chunks * fs.rows / led.expected_batch_size:.2f}x the expected batch); "
                        f"samples above {fs.max_batch} are truncated (probability {fs.truncation_probability:.2g} per "
                        f"step, accounted: delta + {fs.delta_truncation:.2g})")
        if not tc.not_private:
            logger.info("[finetune] private run: no step timings are logged (a step's duration grows with its "
                        "realised Poisson batch, a private count" + ("; with fixed-shape steps it does not" if fs
                                                                    else "") + ")")
        if self.selector is not None:
            logger.info(f"[finetune] kernels chosen by measurement at set-up on public shapes (cached in "
                        f"{self.run_dir / KERNEL_CHOICES}):\n" + self.selector.summary())
        return logger

    # -- the loop ---------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Claim the run folder and build everything (collective)."""
        self._claim_run_folder()
        try:
            self._setup()
        except BaseException:
            self._release_lock(failed=True)
            raise

    def load(self, idx: torch.Tensor):
        """The chunk `idx` (global example indices, sorted) as the loss function takes it."""
        from dpldm.train.dp_loss import ChunkBatch

        z0, y = self.data.dataset.get_batch(idx)  # (B, Z, h, w) unscaled latents, (B,)
        return ChunkBatch(z0, y, idx, self.dp.step_index)

    def step(self) -> None:
        """One logical DP step (collective): this rank's chunks, noise once, all-reduce, / q*N,
        AdamW, EMA. The loop below calls nothing else to train."""
        from dpldm.parallel.step import run_logical_step

        run_logical_step(self.dp, self.load, lockstep=self.model.lockstep, dummy_batch=self.dummy,
                         after_pass=self.model.after_backward if self.stage == 3 else None)
        self.scheduler.step()
        self.ema.update(self.trainable)

    def run(self) -> dict[str, Any]:
        from dpldm.train.run_folder import STOP_FILE, StopRequest

        self.setup()
        try:
            logger = self._start_logger()
        except BaseException:
            self._release_lock()
            raise
        pc, tc, ctx, dp = self.cfg.privacy, self.cfg.train, self.ctx, self.dp
        start = dp.step_index
        stop_at = pc.steps if self.opts.max_steps is None else min(pc.steps, start + self.opts.max_steps)
        stop = StopRequest()
        stop_reason = None
        timed = tc.not_private  # a private run logs no timing (module docstring)
        t0 = t_log = time.perf_counter()
        steps_at_log = start
        try:
            while dp.step_index < stop_at:
                self.step()
                s = dp.step_index
                self.ctx.on_main(self._journal_step, share=False)  # fsynced before anything of step s is released
                logger.advance()
                if self.opts.check_every and s % self.opts.check_every == 0:
                    self.model.sync_check()
                if s % tc.log_every == 0 or s == pc.steps:
                    scalars = {"epsilon": self._epsilon_now(), "lr": self.scheduler.get_last_lr()[0]}
                    if timed:
                        now = time.perf_counter()
                        rate = (s - steps_at_log) / max(now - t_log, 1e-9)
                        scalars.update(steps_per_s=rate, expected_examples_per_s=rate * self.ledger.expected_batch_size,
                                       wall_s=now - t0)
                        t_log, steps_at_log = now, s
                    logger.log(s, scalars)
                asked = stop.signal_name or (STOP_FILE if ctx.is_main and (self.run_dir / STOP_FILE).exists() else None)
                want_stop = ctx.all_reduce_max_int(int(asked is not None or s >= stop_at))
                grid_due = bool(tc.sample_every) and s % tc.sample_every == 0
                # checkpoint FIRST, then the grid: a released grid's step is never re-run after a crash
                if s % tc.checkpoint_every == 0 or s == pc.steps or want_stop or grid_due:
                    self._checkpoint()
                if grid_due and ctx.is_main:
                    logger.log_image(s, self._sample_grid(s))
                if want_stop and s < pc.steps:
                    stop_reason = asked or (f"--max-steps {self.opts.max_steps}" if s >= stop_at
                                            else "a stop request on another rank")
                    break
        finally:
            stop.restore()
            logger.close()
        return self._finish(stop_reason, time.perf_counter() - t0 if timed else None)

    def _journal_step(self) -> None:
        """Record the step just executed in the append-only privacy journal (rank 0)."""
        from dpldm.privacy.journal import PrivacyJournal

        led, s = self.ledger, self.dp.step_index
        execution = 1 + led.extra_executions.get(s, 0)  # this run's execution of s counts as one
        PrivacyJournal(self.run_dir).append(s, execution, led.noise_multiplier, led.sample_rate)

    def _epsilon_now(self) -> float:
        return self.ledger.epsilon_spent() if not self.cfg.train.not_private else math.inf

    def _meta(self) -> dict[str, Any]:
        from dpldm.utils.device import describe_device

        fixed = self.dp.fixed_shape.to_dict() if self.dp.fixed_shape is not None else None
        return {"config": self.cfg.to_dict(), "init": self.init.to_dict(),
                "privacy": {**self.dp.state_dict(), "fixed_shape": fixed},
                "secrets": {"diffusion_seed": self.diffusion_seed},
                "data": {"fingerprint": self.data.fingerprint, "num_examples": len(self.data),
                         "description": self.data.description},
                "world_size": self.ctx.world_size, "zero_stage": self.stage,
                "device": describe_device(self.ctx.device), "precision": self.cfg.train.precision,
                "resumes": self.history, "epsilon_spent": self._epsilon_now()}

    def _checkpoint(self) -> None:
        """Collective: the replicas and ledgers must agree; rank 0 writes."""
        from dpldm.train.dp_state import save_state

        digest = self.model.sync_check()
        ledgers = self.ctx.all_gather_object(json.dumps(self.ledger.state_dict(), sort_keys=True))
        if len(set(ledgers)) != 1:
            raise RuntimeError("the ranks' privacy ledgers disagree; refusing to checkpoint")
        self.ctx.on_main(lambda: save_state(self.run_dir, self.dp.step_index, trainable=self.trainable, ema=self.ema,
                                            optimizer=self.optimizer, scheduler=self.scheduler,
                                            meta={**self._meta(), "replica_digest": digest},
                                            keep=self.cfg.train.keep_checkpoints), share=False)

    def _released_ldm(self):
        """Rank 0: the init model with the EMA of the trained tensors put back (CPU)."""
        from dpldm.diffusion.ema import EMA

        ldm = self.init_ldm
        ldm.cfg = self.cfg  # sampling options and the saved config come from the recipe
        sd = ldm.unet.state_dict()
        for n, t in self.ema.shadow.items():
            sd[n] = t.detach().cpu().to(sd[n].dtype)
        ldm.unet.load_state_dict(sd)
        ldm.ema = EMA(ldm.unet, self.cfg.train.ema_decay)
        return ldm.eval()

    @torch.no_grad()
    def _sample_grid(self, step: int) -> Path:
        """An EMA sample grid (post-processing of released updates: no privacy cost)."""
        from dpldm.utils.grid import save_image_grid

        ldm = self._released_ldm()
        k = self.cfg.data.num_classes
        g = torch.Generator().manual_seed(0)  # public
        x = ldm.sample(torch.arange(k).repeat_interleave(2), generator=g)  # (2k, C, H, W)
        path = self.run_dir / "samples" / f"step_{step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        return save_image_grid(x, path, nrow=2 * min(k, 10) if k <= 10 else 10, upscale=2)

    def _finish(self, stop_reason: str | None, wall_s: float | None) -> dict[str, Any]:
        from dpldm.models.ldm import save_ldm
        from dpldm.train.run_folder import STOP_FILE
        from dpldm.train.dp_state import privacy_report
        from dpldm.utils.device import describe_device

        cfg, led = self.cfg, self.ledger
        report = privacy_report(led, cfg.privacy, private=not cfg.train.not_private, trainable=self.trainable_params,
                                total=self.total_params, finetune=cfg.train.finetune,
                                fixed_shape=self.dp.fixed_shape.to_dict() if self.dp.fixed_shape else None)
        result: dict[str, Any] = {"model": None, "privacy": report, "steps_done": led.steps_done,
                                  "finished": led.steps_done >= cfg.privacy.steps, "stop_reason": stop_reason,
                                  "device": describe_device(self.ctx.device), "precision": cfg.train.precision,
                                  "world_size": self.ctx.world_size, "rank": self.ctx.rank}
        if result["finished"]:
            trained = {"device": result["device"], "precision": cfg.train.precision,
                       "world_size": self.ctx.world_size, "zero_stage": self.stage}
            if wall_s is not None:  # --not-private runs only: a private run's duration is a private count
                trained["wall_s_last_invocation"] = round(wall_s, 1)

            def release():
                path = save_ldm(self.run_dir / "model", self._released_ldm(), {
                    "privacy": report, "finetuned_from": self.init.folder, "private_data": self.data.description,
                    "trained": trained})
                return str(path)
            result["model"] = self.ctx.on_main(release)
        elif self.ctx.is_main and self.opts.verbose:
            if stop_reason == STOP_FILE:
                (self.run_dir / STOP_FILE).unlink(missing_ok=True)  # honoured: the resumed run trains on
            print(f"[finetune] stopped at step {led.steps_done} of {cfg.privacy.steps} ({stop_reason}); checkpoint "
                  f"written. {resume_hint(self.opts)}", flush=True)
        self._release_lock()
        return result

    def _release_lock(self, failed: bool = False) -> None:
        """Free the run folder; after a failed set-up, remove the folder again if this run made it
        and nothing was written (errors found before training leave no trace)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
            if failed and self.created_run_dir:
                try:
                    self.run_dir.rmdir()  # only if empty
                except OSError:
                    pass


__all__ = ["FinetuneOptions", "Trainer", "train", "print_result", "release_from_checkpoint", "check_privacy_settings",
           "RESULT_PREFIX", "load_init", "resume_hint", "state_sha256", "check_explicit_sigma"]  # older imports
