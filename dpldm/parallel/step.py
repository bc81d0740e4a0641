"""One distributed DP-SGD logical step on top of `dpldm.privacy.dp_step.DPStep`.

    share = dp.begin_step()                    # rank r's slice of the GLOBAL Poisson sample of step s
    for chunk in balanced_chunks(...):         # the same number of chunks on every rank
        dp.accumulate(load(chunk))             # clipped per-example sums, local
        (or a discarded dummy pass)            # ZeRO-3 only, when this rank's share ran out
    dp.step()                                  # noise on rank 0, all-reduce SUM, / q*N, optimizer

Every rank derives the same global sample from (seed, step) without communication and reads
only its share (`PoissonPlan.rank_share`: strided, so shares differ by at most one example).

Chunking: the number of physical chunks n = ceil(max_share / physical_batch) is computed from
the global sample size, which every rank knows, and each rank splits its share into n nearly
equal chunks (each <= physical_batch). Under ZeRO-3 every forward/backward gathers parameters
with collectives, so all ranks must run the same passes; with equal n they do, and only a rank
whose share is smaller than n (an empty share while another rank has one example) runs a
dummy pass whose result is thrown away: it touches no accumulator, no count, no noise.
Memory is flat in the logical batch: a chunk at a time, plus one fp32 accumulator per
trainable parameter.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from dpldm.privacy.sampler import PoissonPlan


def max_share(global_size: int, world_size: int) -> int:
    return -(-int(global_size) // int(world_size))


def num_chunks(global_size: int, world_size: int, physical_batch: int) -> int:
    """Physical chunks per rank for a global sample of `global_size` (the same on every rank)."""
    if physical_batch < 1:
        raise ValueError(f"physical batch must be >= 1, got {physical_batch}")
    return -(-max_share(global_size, world_size) // int(physical_batch))


def balanced_chunks(share: torch.Tensor, n: int) -> list[torch.Tensor]:
    """`share` cut into exactly n contiguous, nearly equal pieces (some empty only if len < n)."""
    if n == 0:
        if share.numel():
            raise ValueError(f"{share.numel()} examples cannot go into 0 chunks")
        return []
    return list(torch.tensor_split(share, n))


def run_logical_step(dp, load_batch: Callable[[torch.Tensor], Any], physical_batch: int, *,
                     lockstep: bool = False, dummy_batch: Any = None,
                     after_pass: Callable[[], None] | None = None) -> dict[str, int]:
    """Run one whole logical step of `dp` (a DPStep whose World is this process group).

    load_batch(indices) -> the batch the DPStep's per-example loss takes (indices are global,
    sorted). `lockstep`: ZeRO-3 with several ranks (see module docstring); then `dummy_batch`
    (any valid batch of public/synthetic data, e.g. zeros) feeds the discarded passes.
    Returns counts for this rank (private: for tests and debugging, never for logs)."""
    world = dp.world
    plan: PoissonPlan = dp.ledger.plan
    step = dp.step_index
    global_size = int(plan.indices(step).numel())
    share = dp.begin_step()
    n = num_chunks(global_size, world.world_size, physical_batch)
    dummies = 0
    for chunk in balanced_chunks(share, n):
        if chunk.numel():
            dp.accumulate(load_batch(chunk))
        elif lockstep:
            if dummy_batch is None:
                raise ValueError("ZeRO-3 lock-step needs a dummy_batch for ranks whose Poisson share is empty")
            dp.engine.clipped_sums(dp.loss_fn, dummy_batch, acc_dtype=torch.float32, where="lock-step dummy pass")
            dummies += 1
        if after_pass is not None:
            after_pass()
    dp.step()
    return {"step": step, "global": global_size, "share": int(share.numel()), "chunks": n, "dummies": dummies}


def expected_chunks(expected_batch: float, world_size: int, physical_batch: int) -> int:
    """Chunks per rank for a logical batch of the expected size (for plans and printing)."""
    return num_chunks(int(math.ceil(expected_batch)), world_size, physical_batch)
