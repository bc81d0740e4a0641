"""One DP-SGD logical step on top of `dpldm.privacy.dp_step.DPStep`, on any number of ranks.

    share = dp.begin_step()              # rank r's chunks of the GLOBAL Poisson sample of step s
    for k in range(dp.passes_per_rank):  # the same number of passes on every rank
        dp.accumulate(load(chunk_k))     # clipped per-example sums, local
        (or a discarded dummy pass)      # ZeRO-3 only, when this rank has no chunk k
    dp.step()                            # noise on rank 0, all-reduce SUM, / q*N, optimizer

Every rank derives the same global sample from (seed, step) without communication. The DPStep
(built with `physical_batch_size=P`) cuts it into ceil(|S|/P) nearly equal chunks -- a function
of the sample and P only -- and rank r takes chunks r, r+W, r+2W, ...; so a chunk is computed
the same way whatever the world size, which (with fp64 accumulators) makes one process, 1 rank
and W ranks give bit-identical updates.

ZeRO-3 lock-step: every forward/backward gathers parameters with collectives, so all ranks must
run the same passes; a rank with fewer chunks than `passes_per_rank` runs a dummy pass on a
public batch whose result is thrown away: it touches no accumulator, no count, no noise.
Memory is flat in the logical batch: a chunk at a time, plus the accumulators.

Fixed-shape steps (a DPStep built with `fixed_shape`, the trainer's default for private runs):
every step has the same number of chunks, each padded to the same number of rows with masked
public dummy rows, so no step's duration depends on its realised Poisson batch.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from dpldm.privacy.batches import pad_rows


def run_logical_step(dp, load_batch: Callable[[torch.Tensor], Any], *, lockstep: bool = False,
                     dummy_batch: Any = None, after_pass: Callable[[], None] | None = None) -> dict[str, int]:
    """Run one whole logical step of `dp` (a DPStep with a physical batch size and this process
    group's World). load_batch(indices) -> the batch the DPStep's per-example loss takes.
    `lockstep`: ZeRO-3 with several ranks; then `dummy_batch` feeds the discarded passes.
    Returns counts for this rank (private: for tests and debugging, never for logs)."""
    if dp.physical_batch_size is None:
        raise ValueError("run_logical_step needs a DPStep built with physical_batch_size")
    step = dp.step_index
    share = dp.begin_step()
    dummies = 0
    rows = getattr(dp, "chunk_rows", None)  # fixed-shape steps: every chunk padded to `rows` slots
    for k in range(dp.passes_per_rank):
        if k < len(dp.my_chunks) and rows is not None:
            idx = dp.my_chunks[k]
            n = int(idx.numel())
            batch = pad_rows(load_batch(idx), n, rows)  # (rows, ...): n examples, then masked padding
            dp.accumulate(batch, example_mask=torch.arange(rows) < n)
        elif k < len(dp.my_chunks):
            dp.accumulate(load_batch(dp.my_chunks[k]))
        elif lockstep:
            if dummy_batch is None:
                raise ValueError("ZeRO-3 lock-step needs a dummy_batch for ranks with fewer chunks than the others")
            dp.engine.clipped_sums(dp.loss_fn, dummy_batch, acc_dtype=torch.float32, where="lock-step dummy pass")
            dummies += 1
        else:
            break
        if after_pass is not None:
            after_pass()
    dp.step()
    return {"step": step, "global": dp.global_size, "share": int(share.numel()),
            "chunks": len(dp.my_chunks), "passes": dp.passes_per_rank, "dummies": dummies}


def expected_passes(expected_batch: float, world_size: int, physical_batch: int) -> int:
    """Forward/backward passes per rank for a logical batch of the expected size (plans, printing)."""
    if physical_batch < 1:
        raise ValueError(f"physical batch must be >= 1, got {physical_batch}")
    chunks = math.ceil(math.ceil(expected_batch) / physical_batch)
    return -(-chunks // world_size)
