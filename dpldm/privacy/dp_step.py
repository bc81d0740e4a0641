"""One DP-SGD logical step, in named parts that can only run in order:

    idx = dp.begin_step()          # this rank's share of the Poisson sample of step s (may be empty)
    for chunk in dp.my_chunks:     # (or any split of idx when no physical batch size was given)
        dp.accumulate(chunk)       # clipped per-example sums, added to the accumulators
    dp.add_noise()                 # noise rank: + N(0, sigma^2 C^2) once; ledger.step() (all ranks)
    dp.reduce()                    # world.all_reduce_sum over ranks (no-op on one process)
    dp.scale()                     # / (q*N), the EXPECTED batch size, never the realised one
    dp.step()                      # p.grad = update; optimizer.step(); (runs any missing part first)

`step()` alone after the accumulates does add_noise -> reduce -> scale -> write -> optimizer.
Memory is flat in the logical batch: only the accumulators (one copy of the trainable
parameters) persist between chunks.

World-size-independent results (`physical_batch_size=P`, `acc_dtype=torch.float64`, what the
trainer uses): the GLOBAL Poisson sample is cut into ceil(|S|/P) nearly equal chunks, a function
of the sample and P only, and chunk k goes to rank k mod W. Each chunk is computed exactly as on
one process (same examples, same order, same shapes), in the parameters' dtype; its clipped sums
are added into fp64 accumulators, where summing a few fp32 chunk sums (and the fp32 noise) is
exact in practice, so the order in which ranks and the all-reduce add them does not change the
result: one process, 1 rank and W ranks produce bit-identical updates
(tests/test_trainer_equivalence.py). Without P, a rank's share is the strided slice of the sample. Noise is drawn exactly once per logical step on exactly one
rank (before the all-reduce, so the reduced sum carries it once), and `noise.draws` counts it.
`add_noise` refuses to run unless every example of this rank's Poisson share went through
`accumulate` exactly once: feeding fixed-size shuffled batches instead fails loudly.

Distributed engineers plug in a `World`: per-rank clipped sums are summed with
`all_reduce_sum(list_of_tensors)` (in place, SUM over ranks), and `is_noise_rank()` picks the
one rank that draws the noise. Models never import torch.distributed; dpldm.parallel does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from dpldm.privacy.accountant import PrivacyLedger
from dpldm.privacy.engine import BookKeepingEngine, PerExampleLossFn
from dpldm.privacy.fixed_shape import FixedShape, fixed_chunks
from dpldm.privacy.noise import GaussianNoise
from dpldm.privacy.sampler import PoissonPlan

PHASES = ("idle", "open", "noised", "reduced", "scaled")


class DPStepOrderError(RuntimeError):
    """A named part of the DP step was called out of order (e.g. noise twice in one step)."""


@dataclass
class World:
    """How this process sees the others. Defaults: a single process."""

    rank: int = 0
    world_size: int = 1
    all_reduce_sum: Callable[[list[torch.Tensor]], None] | None = None  # in place, SUM over all ranks
    is_noise_rank: Callable[[], bool] | None = None  # default: rank == 0

    def __post_init__(self) -> None:
        if not (0 <= self.rank < self.world_size):
            raise ValueError(f"rank {self.rank} outside world of size {self.world_size}")
        if self.world_size > 1 and self.all_reduce_sum is None:
            raise ValueError("a World with several ranks needs all_reduce_sum")

    def noise_rank(self) -> bool:
        return self.is_noise_rank() if self.is_noise_rank is not None else self.rank == 0


def global_chunks(sample: torch.Tensor, physical_batch_size: int) -> list[torch.Tensor]:
    """The global sample (sorted indices) cut into ceil(|S|/P) contiguous, nearly equal chunks of at
    most P examples: a function of the sample and P only (not of the world size)."""
    n = -(-int(sample.numel()) // int(physical_batch_size))
    return list(torch.tensor_split(sample, n)) if n else []


class DPStep:
    """Owns the clipping engine, the accumulators, the noise and the ledger of one DP run."""

    def __init__(self, model: nn.Module, per_example_loss_fn: PerExampleLossFn, ledger: PrivacyLedger, *,
                 noise: GaussianNoise | None = None, optimizer: torch.optim.Optimizer | None = None,
                 world: World | None = None, norm_method: str = "auto", backend: str = "auto",
                 nonfinite: str = "raise", physical_batch_size: int | None = None,
                 acc_dtype: torch.dtype | None = None, selector=None, fixed_shape: FixedShape | None = None) -> None:
        if not isinstance(ledger, PrivacyLedger):
            raise TypeError(f"ledger must be a PrivacyLedger, got {type(ledger).__name__}")
        self.model, self.loss_fn, self.ledger = model, per_example_loss_fn, ledger
        self.engine = BookKeepingEngine(model, ledger.max_grad_norm, norm_method=norm_method, backend=backend,
                                        nonfinite=nonfinite, selector=selector)
        self.noise = noise if noise is not None else GaussianNoise()
        self.optimizer = optimizer
        self.world = world or World()
        self.params = self.engine.trainable  # name -> Parameter
        # compute dtype of a chunk's sums and of the noise: fp64 for fp64 (test) models, else fp32
        self._compute_dtype = torch.float64 if any(p.dtype == torch.float64 for p in self.params.values()) \
            else torch.float32
        if acc_dtype not in (None, torch.float32, torch.float64):
            raise ValueError(f"acc_dtype must be torch.float32 or torch.float64, got {acc_dtype}")
        self._acc_dtype = acc_dtype if acc_dtype is not None else self._compute_dtype
        if physical_batch_size is not None and (isinstance(physical_batch_size, bool) or physical_batch_size < 1):
            raise ValueError(f"physical_batch_size must be >= 1, got {physical_batch_size!r}")
        self.physical_batch_size = physical_batch_size
        # fixed-shape steps (dpldm.privacy.fixed_shape): every step runs fixed_shape.num_chunks chunks of
        # fixed_shape.rows slots, padded with masked rows; the sample is truncated to max_batch
        if fixed_shape is not None and physical_batch_size is None:
            raise ValueError("fixed_shape needs a physical_batch_size (the chunks are cut from the global sample)")
        self.fixed_shape = fixed_shape
        self.chunk_rows: int | None = fixed_shape.rows if fixed_shape is not None else None
        self.dropped = 0  # examples truncated away in the current step (private: tests only, never logged)
        self.global_size = 0  # examples in the current step's global sample (private: tests and debugging only)
        self.my_chunks: list[torch.Tensor] = []  # this rank's chunks of the current step
        self.passes_per_rank = 0  # chunks per rank of the current step (the same on every rank)
        self.acc: dict[str, torch.Tensor] | None = None
        self.phase = "idle"
        self._share = 0  # size of this rank's share of the current Poisson sample
        self._seen = 0  # examples accumulated in the current step

    @property
    def step_index(self) -> int:
        """The logical step being built (= steps already accounted)."""
        return self.ledger.steps_done

    def _need(self, *phases: str, part: str) -> None:
        if self.phase not in phases:
            raise DPStepOrderError(f"DPStep.{part}() called in phase {self.phase!r} (step {self.step_index}); "
                                   f"allowed only in {phases}. Order: begin_step, accumulate*, add_noise, reduce, "
                                   "scale, step")

    def probe(self, public_batch: Any, *, low_precision: bool = False) -> None:
        """Set-up, before any private chunk: discarded forward+backward passes of a PUBLIC batch through
        the engine (BookKeepingEngine.probe): refuses a model that writes state in forward, draws
        from a global RNG, or (batch of >= 2) mixes examples -- each example's loss must depend on
        that example alone --, and leaves a kernel selector measured on public shapes only. Touches
        no accumulator, count, noise or ledger."""
        self._need("idle", part="probe")
        self.engine.probe(self.loss_fn, public_batch, low_precision=low_precision)

    # -- named parts ---------------------------------------------------------------------------------
    def begin_step(self) -> torch.Tensor:
        """Open logical step s; returns this rank's share of its Poisson sample (sorted indices)."""
        self._need("idle", part="begin_step")
        plan: PoissonPlan = self.ledger.plan
        sample = plan.indices(self.step_index)  # (|S|,) the global sample, sorted
        W, r = self.world.world_size, self.world.rank
        self.global_size = int(sample.numel())
        if self.fixed_shape is not None:
            chunks, self.dropped = fixed_chunks(sample, self.fixed_shape, plan.seed, self.step_index)
            self.my_chunks = chunks[r::W]
            self.passes_per_rank = -(-len(chunks) // W)
            idx = torch.cat(self.my_chunks) if self.my_chunks else sample[:0]  # W > num_chunks: some ranks idle
        elif self.physical_batch_size is not None:
            chunks = global_chunks(sample, self.physical_batch_size)
            self.my_chunks = chunks[r::W]
            self.passes_per_rank = -(-len(chunks) // W)
            idx = torch.cat(self.my_chunks) if self.my_chunks else sample[:0]
        else:
            idx = PoissonPlan.rank_share(sample, r, W)
            self.my_chunks, self.passes_per_rank = [idx] if idx.numel() else [], int(idx.numel() > 0)
        if self.acc is None:
            self.acc = {n: torch.zeros(p.shape, dtype=self._acc_dtype, device=p.device) for n, p in self.params.items()}
        else:
            for t in self.acc.values():
                t.zero_()
        self._share, self._seen = int(idx.numel()), 0
        self.phase = "open"
        return idx

    def accumulate(self, chunk: Any, example_mask: torch.Tensor | None = None) -> int:
        """Add the clipped per-example gradients of one physical chunk; returns its number of
        examples (rows where `example_mask` is False are padding: clipping factor 0, not counted)."""
        self._need("open", part="accumulate")
        where = f"logical step {self.step_index}"
        if self._acc_dtype == self._compute_dtype:  # in place, no per-chunk copy
            res = self.engine.clipped_sums(self.loss_fn, chunk, acc_dtype=self._acc_dtype, where=where, out=self.acc,
                                           example_mask=example_mask)
        else:  # the chunk's sums in the compute dtype, then added exactly into the wider accumulators
            res = self.engine.clipped_sums(self.loss_fn, chunk, acc_dtype=self._compute_dtype, where=where,
                                           example_mask=example_mask)
            for n, t in res.sums.items():
                self.acc[n] += t.to(self._acc_dtype)
        self._seen += res.num_examples
        return res.num_examples

    def add_noise(self) -> None:
        """The one noise draw of this logical step (noise rank only) and the accountant step."""
        self._need("open", part="add_noise")
        if self._seen != self._share:
            raise DPStepOrderError(
                f"step {self.step_index}: accumulated {self._seen} examples but this rank's Poisson sample has "
                f"{self._share}; every sampled example must go through accumulate() exactly once (batches from "
                "anything other than begin_step()'s Poisson sample are not what the accountant assumes)")
        if self.world.noise_rank():
            names = list(self.acc)
            z = self.noise.draw([self.acc[n] for n in names], self.ledger.noise_std, self.step_index,
                                dtype=self._compute_dtype)
            for n, zi in zip(names, z):
                self.acc[n] += zi.to(self.acc[n].dtype)
        self.ledger.step()  # privacy is spent once the noisy sum exists
        self.phase = "noised"

    def reduce(self) -> None:
        """Sum the (noisy on one rank) clipped sums over ranks."""
        self._need("noised", part="reduce")
        if self.world.world_size > 1:
            self.world.all_reduce_sum(list(self.acc.values()))
        self.phase = "reduced"

    def scale(self) -> None:
        """Divide by the expected batch size q*N (public), never by the realised one."""
        self._need("reduced", part="scale")
        denom = self.ledger.expected_batch_size
        for t in self.acc.values():
            t.div_(denom)
        self.phase = "scaled"

    def step(self) -> None:
        """Finish the logical step: any missing part, then p.grad = update and optimizer.step()."""
        if self.phase == "open":
            self.add_noise()
        if self.phase == "noised":
            self.reduce()
        if self.phase == "reduced":
            self.scale()
        self._need("scaled", part="step")
        for n, p in self.params.items():  # a copy: p.grad must not alias the accumulator reused next step
            p.grad = self.acc[n].to(p.dtype, copy=True)
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.phase = "idle"

    @property
    def update(self) -> dict[str, torch.Tensor]:
        """The scaled noisy gradient of the last step (valid after scale()/step() until begin_step)."""
        if self.phase not in ("scaled", "idle") or self.acc is None:
            raise DPStepOrderError(f"no scaled update in phase {self.phase!r}")
        return self.acc

    def state_dict(self) -> dict:
        if self.phase != "idle":
            raise DPStepOrderError(f"cannot checkpoint in the middle of a logical step (phase {self.phase!r})")
        return {"ledger": self.ledger.state_dict(), "noise": self.noise.state_dict()}
