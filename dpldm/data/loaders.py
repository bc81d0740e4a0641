"""Readers of shard folders.

Public pretraining (no privacy): `stream_loader` — a webdataset pipeline: shard list (shuffled per
epoch, or `resampled` with replacement) -> split by rank -> split by DataLoader worker -> tar ->
shuffle buffer -> validate/decode -> batches (x float32, y int64).

Private fine-tuning: Poisson sampling needs every example to be drawable at every step, so the
private readers work by global index:
  `PrivateIndexedDataset(folder)`  random access through `wids.ShardListDataset` (memory-mapped
                                   shards in a small LRU; the dataset is never loaded whole)
  `InMemoryDataset(x, y)`          the same interface over tensors, for tiny sets
  `PoissonBatchLoader(dataset, plan, physical_batch_size, rank, world_size)`
        `.chunks(step)` yields this rank's share of `plan.indices(step)` (the global Poisson sample)
        as physical chunks (x, y) of at most physical_batch_size examples. Deterministic for the
        plan's seed; an empty share yields no chunk (the DP engine still adds the step's noise).

x is float32: images (B, C, H, W) in [-1, 1]; latents (B, C, h, w) as stored. y is int64 (B,).
"""
from __future__ import annotations

import bisect
import contextlib
import io
import os
import random
import shutil
import tempfile
import weakref
from itertools import islice
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch

from dpldm.data.codec import decode_sample, images_to_tensor, sample_key
from dpldm.data.errors import ShardError
from dpldm.data.manifest import ShardFolder, diagnose_tar, open_shard_folder
from dpldm.data.shards import read_shard_arrays
from dpldm.privacy.sampler import PoissonPlan

Batch = tuple[torch.Tensor, torch.Tensor]  # x (B, C, H, W) float32, y (B,) int64


def to_model_tensor(xs: np.ndarray, kind: str) -> torch.Tensor:
    """Stored examples (B, *shape) -> the float32 tensor the models take."""
    if kind == "images":
        return images_to_tensor(xs)  # uint8 (B, H, W[, C]) -> (B, C, H, W) in [-1, 1]
    return torch.from_numpy(np.ascontiguousarray(xs, dtype=np.float32))  # (B, C, h, w)


class IndexedDataset(Protocol):
    kind: str

    def __len__(self) -> int: ...

    def get_batch(self, indices: torch.Tensor) -> Batch: ...


# -- private: random access by global index ----------------------------------------------------

class _SymlinkLocalname:
    """wids "downloads" each shard to a local name; point that name at the shard itself (a
    symlink in a private temp folder) so nothing is copied and nothing is written beside the data."""

    def __init__(self, folder: str):
        self.folder = folder

    def __call__(self, url: str) -> str:
        link = os.path.join(self.folder, os.path.basename(url))
        if not os.path.lexists(link):
            os.symlink(os.path.abspath(url), link)
        return link


class PrivateIndexedDataset:
    """Examples of a shard folder by global index, through `wids.ShardListDataset`.

    verify: "sha256" (default) hashes each shard once, when first touched, against the index;
    "size" only compares file sizes. Every sample is checked against its expected key, dtype,
    shape, finiteness and label range (ShardError naming the shard and key otherwise).
    expected_ae_hash: for latent folders, refuse latents made by another autoencoder.
    lru_size: shards kept open (memory-mapped + indexed by wids; about 0.5 KiB of index per example);
    default all shards up to 64. Poisson steps touch every shard, so fewer open shards than
    shards means re-indexing shards every step (about 5x slower in bench/data.py)."""

    def __init__(self, folder: str | Path, *, expected_ae_hash: str | None = None, verify: str = "sha256",
                 lru_size: int | None = None):
        import wids

        self.folder: ShardFolder = open_shard_folder(folder, expected_ae_hash)
        self.kind = self.folder.kind
        self.spec = self.folder.spec
        self.verify = verify
        self._checked: set[int] = set()
        self._offsets = self.folder.offsets.tolist()
        self._paths = [str(self.folder.shard_path(k)) for k in range(len(self.folder.shards))]
        links = tempfile.mkdtemp(prefix="dpldm-wids-")
        self._cleanup = weakref.finalize(self, shutil.rmtree, links, True)
        shardlist = [{"url": str(self.folder.shard_path(k).resolve()), "nsamples": s.nsamples}
                     for k, s in enumerate(self.folder.shards)]
        with contextlib.redirect_stderr(io.StringIO()):  # wids prints a banner on every construction
            self._wids = wids.ShardListDataset(shardlist, localname=_SymlinkLocalname(links), transformations=[],
                                               lru_size=max(1, min(lru_size or 64, len(shardlist))))

    def __len__(self) -> int:
        return self.folder.num_examples

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    def close(self) -> None:
        self._wids.close()
        self._cleanup()

    def read_labels(self) -> np.ndarray:
        """Every label (N,) int64 in index order, read shard by shard in the same pass that verifies
        each shard's size and sha256 (`ShardFolder.read_labels`); the shards count as checked after,
        so the first Poisson steps do not hash them again. For open-time checks of the label range."""
        parts = []
        for k in range(len(self.folder.shards)):
            parts.append(self.folder.read_labels(k))
            if self.verify != "none":
                self._checked.add(k)
        return np.concatenate(parts)

    def _shard_of(self, index: int) -> int:
        return bisect.bisect_right(self._offsets, index) - 1

    def get(self, index: int) -> tuple[np.ndarray, int]:
        """(stored example, label) of global index `index`."""
        if not (0 <= index < len(self)):
            raise IndexError(f"example index {index} outside [0, {len(self)})")
        k = self._shard_of(index)
        path = self._paths[k]
        if k not in self._checked:
            self.folder.check_shard(k, self.verify)
            self._checked.add(k)
        try:
            sample = self._wids[index]
        except ShardError:
            raise
        except Exception as e:  # noqa: BLE001 - wids/tar failure: say where (the broken sample, if found)
            key, why = diagnose_tar(Path(path))
            raise ShardError(f"cannot read shard for sample {sample_key(index)!r} ({type(e).__name__}: "
                             f"{str(e)[:200]}); {why}", shard=path, key=key or sample_key(index)) from None
        return decode_sample(sample, self.spec, shard=path, expected_key=sample_key(index))

    def get_batch(self, indices: torch.Tensor) -> Batch:
        """indices (B,) int64 -> x (B, ...) float32, y (B,) int64, in the order given."""
        idx = indices.tolist()
        xs = np.empty((len(idx), *self.spec.shape), dtype=self.spec.dtype)
        ys = np.empty(len(idx), dtype=np.int64)
        for j, i in enumerate(idx):
            xs[j], ys[j] = self.get(int(i))
        return to_model_tensor(xs, self.kind), torch.from_numpy(ys)


class InMemoryDataset:
    """The same interface over tensors already in memory (tiny sets, tests).

    x: float32 (N, C, H, W) model tensors; y: int64 (N,)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, kind: str = "latents", num_classes: int | None = None):
        if x.shape[0] != y.shape[0] or y.ndim != 1:
            raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} disagree on the number of examples")
        if x.shape[0] == 0:
            raise ValueError("empty dataset")
        if not torch.isfinite(x).all():
            raise ValueError("x holds NaN/inf values")
        self.x, self.y, self.kind = x.to(torch.float32), y.to(torch.int64), kind
        self.num_classes = int(num_classes if num_classes is not None else int(self.y.max()) + 1)
        if int(self.y.min()) < 0 or int(self.y.max()) >= self.num_classes:
            raise ValueError(f"labels outside [0, {self.num_classes})")

    @classmethod
    def from_folder(cls, folder: str | Path, *, expected_ae_hash: str | None = None) -> "InMemoryDataset":
        """Load a whole (small) shard folder, validated, into memory."""
        f = open_shard_folder(folder, expected_ae_hash)
        parts = [read_shard_arrays(f, k, verify="sha256") for k in range(len(f.shards))]
        xs = np.concatenate([p[0] for p in parts])
        ys = np.concatenate([p[1] for p in parts])
        return cls(to_model_tensor(xs, f.kind), torch.from_numpy(ys), kind=f.kind, num_classes=f.spec.num_classes)

    def __len__(self) -> int:
        return self.x.shape[0]

    def get_batch(self, indices: torch.Tensor) -> Batch:
        return self.x[indices], self.y[indices]


class PoissonBatchLoader:
    """This rank's physical chunks of the Poisson-sampled logical batch of each step."""

    def __init__(self, dataset: IndexedDataset, plan: PoissonPlan, physical_batch_size: int,
                 rank: int = 0, world_size: int = 1):
        if plan.num_examples != len(dataset):
            raise ValueError(f"plan covers N={plan.num_examples} examples but the dataset holds {len(dataset)}")
        if physical_batch_size < 1:
            raise ValueError(f"physical_batch_size must be >= 1, got {physical_batch_size}")
        if not (0 <= rank < world_size):
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.dataset, self.plan = dataset, plan
        self.physical_batch_size, self.rank, self.world_size = int(physical_batch_size), rank, world_size

    @property
    def expected_batch_size(self) -> float:
        return self.plan.expected_batch_size  # q*N: the public denominator of the DP step

    def share(self, step: int) -> torch.Tensor:
        """Global indices (sorted) this rank reads at `step`; the ranks' shares partition the sample."""
        return PoissonPlan.rank_share(self.plan.indices(step), self.rank, self.world_size)

    def chunks(self, step: int) -> Iterator[Batch]:
        """(x, y) chunks of at most physical_batch_size examples; none when the share is empty."""
        idx = self.share(step)
        for start in range(0, idx.numel(), self.physical_batch_size):
            yield self.dataset.get_batch(idx[start:start + self.physical_batch_size])


def open_private_dataset(folder: str | Path, *, expected_ae_hash: str | None = None,
                         in_memory: bool = False, verify: str = "sha256") -> IndexedDataset:
    if in_memory:
        return InMemoryDataset.from_folder(folder, expected_ae_hash=expected_ae_hash)
    return PrivateIndexedDataset(folder, expected_ae_hash=expected_ae_hash, verify=verify)


# -- public: streaming -------------------------------------------------------------------------

def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class _Stages:
    """Pipeline stages (picklable, so they run inside DataLoader workers)."""

    def __init__(self, folder: ShardFolder, rank: int, world_size: int, seed: int, epoch: int,
                 shuffle_buffer: int, verify: str):
        self.folder, self.rank, self.world_size = folder, rank, world_size
        self.seed, self.epoch, self.shuffle_buffer, self.verify = seed, epoch, shuffle_buffer, verify
        self.by_name = {s.name: k for k, s in enumerate(folder.shards)}

    def split_by_rank(self, src):
        return islice(src, self.rank, None, self.world_size)

    def split_by_worker(self, src):
        w, nw = _worker()
        return islice(src, w, None, nw)

    def worker_seed(self) -> int:
        w, _ = _worker()
        return (self.seed * 1_000_003 + self.rank * 10_007 + w) % (2**63 - 1)

    def check_shards(self, src):
        for item in src:
            self.folder.check_shard(self.by_name[os.path.basename(item["url"])], self.verify)
            yield item

    def shuffle(self, src):
        if self.shuffle_buffer <= 1:
            yield from src
            return
        w, _ = _worker()
        rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{w}")
        import webdataset as wds

        yield from wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(src)

    def decode(self, src):
        spec, path = self.folder.spec, self.folder.path
        src = iter(src)
        while True:
            try:
                sample = next(src)
            except StopIteration:
                return
            except ShardError:
                raise
            except Exception as e:  # noqa: BLE001 - tar-level failure; webdataset appends the url
                url = next((a for a in reversed(getattr(e, "args", ())) if isinstance(a, str) and a.endswith(".tar")), None)
                key, why = diagnose_tar(Path(url)) if url else (None, "")
                msg = str(e.args[0] if e.args else e).split(" @ ")[0]
                raise ShardError(f"unreadable tar ({type(e).__name__}: {msg}); {why}", shard=url or str(path),
                                 key=key) from None
            x, y = decode_sample(sample, spec, shard=sample.get("__url__"))
            yield x, y


def _collate(kind: str):
    def collate(samples: list[tuple[np.ndarray, int]]) -> Batch:
        xs = np.stack([s[0] for s in samples])
        ys = torch.tensor([s[1] for s in samples], dtype=torch.int64)
        return to_model_tensor(xs, kind), ys
    return collate


def stream_loader(folder: str | Path, *, batch_size: int, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                  shuffle_buffer: int = 1000, seed: int = 0, epoch: int = 0, resampled: bool = False,
                  partial: bool = True, verify: str = "sha256") -> torch.utils.data.DataLoader:
    """A DataLoader of (x, y) batches streamed from the shards (public pretraining, no privacy).

    Without `resampled`, one pass per epoch: shards shuffled by (seed, epoch), the same order on
    every rank, then rank r takes shards r, r+W, ... and worker w every num_workers-th of those;
    each (rank, worker) needs at least one shard. With `resampled`, every rank/worker draws shards
    with replacement from its own seed (endless: stop with islice or a step count).

    verify: each shard is checked against the manifest when it is opened, before any of its samples
    is yielded: "sha256" (default: the whole file is hashed, so a corrupt shard of the right size
    stops the stream with one error naming it), "size" (stat only) or "none"."""
    import webdataset as wds

    f = open_shard_folder(folder)
    urls = [str(f.shard_path(k)) for k in range(len(f.shards))]
    st = _Stages(f, rank, world_size, seed, epoch, shuffle_buffer, verify)
    if resampled:
        stages = [wds.ResampledShards(urls, seed=seed + epoch, worker_seed=st.worker_seed, deterministic=True)]
    else:
        need = world_size * max(1, num_workers)
        if len(urls) < need:
            raise ShardError(f"{len(urls)} shard(s) cannot feed {world_size} rank(s) x {max(1, num_workers)} worker(s) "
                             "without resampling: write smaller shards or pass resampled=True", shard=str(f.path))
        stages = [wds.SimpleShardList(urls, seed=seed + epoch), st.split_by_rank, st.split_by_worker]
    stages += [st.check_shards, wds.tarfile_to_samples(), st.decode, st.shuffle,
               wds.batched(batch_size, collation_fn=_collate(f.kind), partial=partial)]
    pipeline = wds.DataPipeline(*stages)
    return torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=num_workers)
