"""The public set of `dpldm pretrain-ae` / `pretrain-ldm` (no privacy): `data.public` is either a
source (loaded into memory, see dpldm.data.sources) or an image shard folder written by
`dpldm data import`, streamed through `dpldm.data.loaders.stream_loader`.

A shard folder is recognised by its manifest.json (or named explicitly as `shards:PATH`). It is
read in epochs: shards shuffled by (seed, epoch), a shuffle buffer of `shuffle_buffer` examples,
fixed-size batches (the last incomplete batch of an epoch is dropped; the next epoch reshuffles).
`PublicStream.position` = (epoch, batches taken in that epoch) is saved in every step checkpoint;
a resumed run re-opens that epoch's stream and skips the batches already taken, so it sees exactly
the batches an uninterrupted run would (the stream is deterministic for its seed; the skipped
batches are read again, costing at most one epoch of reading). Each shard's sha256 is verified
against the manifest when the stream opens it, before any of its samples is used: a shard whose
bytes changed at the same size stops the run with one error naming it (ShardError).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from dpldm.data.errors import ShardError
from dpldm.data.manifest import MANIFEST, ShardFolder, open_shard_folder

SHARDS_PREFIX = "shards:"
HELD_OUT_MAX = 2000  # images of the reconstruction check


def shard_folder_of(spec: str) -> Path | None:
    """The shard folder `data.public` names, or None when it names a source."""
    if spec.startswith(SHARDS_PREFIX):
        return Path(spec[len(SHARDS_PREFIX):])
    p = Path(spec)
    return p if p.is_dir() and (p / MANIFEST).is_file() else None


def open_public_shards(folder: str | Path, channels: int, image_size: int, num_classes: int) -> ShardFolder:
    """Open an image shard folder and check it fits the recipe (kind, image shape, classes)."""
    f = open_shard_folder(folder)
    if f.kind != "images":
        raise ShardError(f"holds {f.kind}, not images: pretraining reads image shards written by "
                         "`dpldm data import`", shard=str(f.path))
    shape = f.spec.shape  # (H, W) or (H, W, C)
    c = 1 if len(shape) == 2 else shape[2]
    if shape[:2] != (image_size, image_size) or not (c == channels or (c == 1 and channels == 3)):
        raise ShardError(f"images are {tuple(shape)} (H, W[, C]) but data.image_size/data.channels ask for "
                         f"({image_size}, {image_size}, {channels})", shard=str(f.path))
    if f.spec.num_classes > num_classes:
        raise ShardError(f"{f.spec.num_classes} classes > unet.num_classes ({num_classes})", shard=str(f.path))
    return f


def _fit_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, 1, H, W) grey -> (B, 3, H, W) when the recipe wants RGB (as for in-memory sources)."""
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 and channels == 3 else x


class PublicStream:
    """Endless fixed-size batches (x (B, C, H, W) float32 in [-1, 1], y (B,) int64) streamed from
    an image shard folder, epoch after epoch, resumable at a `position` (see the module doc)."""

    def __init__(self, folder: str | Path, *, batch_size: int, channels: int, image_size: int, num_classes: int,
                 seed: int = 0, shuffle_buffer: int = 1000, num_workers: int = 0,
                 position: tuple[int, int] = (0, 0), device: torch.device | str = "cpu"):
        self.folder = open_public_shards(folder, channels, image_size, num_classes)
        if self.folder.num_examples < batch_size:
            raise ShardError(f"{self.folder.num_examples} examples cannot fill one batch of {batch_size}",
                             shard=str(self.folder.path))
        self.batch_size, self.channels, self.seed = batch_size, channels, seed
        self.shuffle_buffer, self.num_workers = shuffle_buffer, num_workers
        self.device = torch.device(device)
        self.epoch, self.taken = int(position[0]), 0
        self._it = self._open(self.epoch)
        for _ in range(int(position[1])):  # resume: the batches this epoch already gave
            self._next_raw()
        # open time: read the first batch now, so the first shards are opened (sha256) and decoded before
        # the caller writes anything; it is handed out by the first next() (position excludes it until then)
        self._pending_position = self.position
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = self._next_raw()

    @property
    def num_examples(self) -> int:
        return self.folder.num_examples

    @property
    def position(self) -> tuple[int, int]:
        """(epoch, batches handed out in it): reopening there gives the next batch next() would give."""
        if getattr(self, "_pending", None) is not None:
            return self._pending_position
        return self.epoch, self.taken

    def _open(self, epoch: int) -> Iterator:
        from dpldm.data.loaders import stream_loader

        return iter(stream_loader(self.folder.path, batch_size=self.batch_size, num_workers=self.num_workers,
                                  shuffle_buffer=self.shuffle_buffer, seed=self.seed, epoch=epoch, partial=False,
                                  verify="sha256"))  # every shard's sha256, before its first sample

    def _next_raw(self) -> tuple[torch.Tensor, torch.Tensor]:
        for _ in range(2):
            try:
                batch = next(self._it)
                self.taken += 1
                return batch
            except StopIteration:
                if self.taken == 0:
                    break
                self.epoch, self.taken = self.epoch + 1, 0
                self._it = self._open(self.epoch)
        raise ShardError(f"epoch {self.epoch} gave no full batch of {self.batch_size} (too few examples per "
                         "DataLoader worker?)", shard=str(self.folder.path))

    def next(self, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch on the device (`generator` is not used: the stream has its own seed)."""
        if self._pending is not None:
            (x, y), self._pending = self._pending, None
        else:
            x, y = self._next_raw()
        return _fit_channels(x, self.channels).to(self.device), y.to(self.device)

    def first_images(self, n: int) -> torch.Tensor:
        """The first `n` images of the folder in stored order (B, C, H, W), for statistics and checks."""
        from dpldm.data.loaders import to_model_tensor
        from dpldm.data.shards import read_shard_arrays

        parts, have = [], 0
        for k in range(len(self.folder.shards)):
            xs, _ = read_shard_arrays(self.folder, k, verify="sha256")
            parts.append(xs[: n - have])
            have += len(parts[-1])
            if have >= n:
                break
        return _fit_channels(to_model_tensor(np.concatenate(parts), "images"), self.channels)


class PublicMemory:
    """A public set held in memory (x (N, C, H, W) float32 in [-1, 1], y (N,) int64) on `device`;
    each step's batch is drawn with replacement from that step's generator (resumes exactly)."""

    position = None  # nothing to save: the batches are a function of (seed, step)

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.x, self.y, self.batch_size = x.to(self.device), y.to(self.device), batch_size

    @property
    def num_examples(self) -> int:
        return self.x.shape[0]

    def indices(self, generator: torch.Generator) -> torch.Tensor:
        """(B,) indices drawn on the generator's device (the CPU), moved to the data's device."""
        return torch.randint(0, self.num_examples, (self.batch_size,), generator=generator).to(self.device)

    def next(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.indices(generator)
        return self.x[idx], self.y[idx]
