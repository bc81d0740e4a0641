"""Row operations on an opaque batch (the structure a per-example loss function takes): a tensor,
a tuple/list/namedtuple/dict of them, or a dataclass. Every tensor whose leading size is the
batch size is a per-example field; anything else (ints, strings, other tensors) is kept as is."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch


def map_rows(batch: Any, size: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """`batch` with fn applied to every per-example tensor (leading size `size`)."""
    if isinstance(batch, torch.Tensor):
        return fn(batch) if batch.dim() and batch.shape[0] == size else batch
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(map_rows(b, size, fn) for b in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_rows(b, size, fn) for b in batch)
    if isinstance(batch, dict):
        return {k: map_rows(v, size, fn) for k, v in batch.items()}
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(batch, **{f.name: map_rows(getattr(batch, f.name), size, fn)
                                             for f in dataclasses.fields(batch) if f.init})
    return batch


def tensors_of(batch: Any):
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, (list, tuple)):
        for b in batch:
            yield from tensors_of(b)
    elif isinstance(batch, dict):
        for b in batch.values():
            yield from tensors_of(b)
    elif dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        for f in dataclasses.fields(batch):
            yield from tensors_of(getattr(batch, f.name))


def batch_size_of(batch: Any) -> int | None:
    """The leading size of the first tensor in `batch` (None when it has none)."""
    for t in tensors_of(batch):
        return int(t.shape[0]) if t.dim() else None
    return None


def select_rows(batch: Any, idx: torch.Tensor, size: int) -> Any:
    """`batch` restricted to rows `idx`."""
    return map_rows(batch, size, lambda t: t[idx.to(t.device)])


def pad_rows(batch: Any, size: int, rows: int) -> Any:
    """`batch` of `size` examples padded with zero rows to `rows` examples (the padding is a public
    dummy: zero inputs, label 0, example index 0; fixed-shape steps give it clipping factor 0)."""
    if rows < size:
        raise ValueError(f"cannot pad a batch of {size} examples to {rows} rows")
    return map_rows(batch, size, lambda t: torch.cat([t, t.new_zeros((rows - size, *t.shape[1:]))]))
