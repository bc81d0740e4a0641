"""Readers: Poisson chunks (inclusion frequency, rank shares, determinism), in-memory variant,
streaming loader (epoch coverage, rank/worker split, resampling)."""
import itertools

import numpy as np
import pytest
import torch
from scipy import stats

from dpldm.data.loaders import InMemoryDataset, PoissonBatchLoader, PrivateIndexedDataset, stream_loader
from dpldm.data.shards import import_arrays
from dpldm.data.testing import index_of, indexed_images
from dpldm.privacy.sampler import PoissonPlan


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "s"
    images, labels, meta = indexed_images(300, (6, 6), num_classes=7)
    import_arrays(images, labels, meta, out, shard_size=40)  # 8 shards, the last one short
    return out, images, labels


def _collect(loader, step):
    chunks = list(loader.chunks(step))
    if not chunks:
        return np.zeros(0, np.int64), chunks
    return np.concatenate([index_of(x) for x, _ in chunks]), chunks


def test_chunks_hold_the_plans_examples(folder):
    out, images, labels = folder
    ds = PrivateIndexedDataset(out)
    plan = PoissonPlan(len(ds), 0.3, seed=11)
    loader = PoissonBatchLoader(ds, plan, physical_batch_size=16)
    for step in range(3):
        got, chunks = _collect(loader, step)
        np.testing.assert_array_equal(got, plan.indices(step).numpy())
        assert all(x.shape[0] <= 16 and x.dtype == torch.float32 and y.dtype == torch.int64 for x, y in chunks)
        assert [x.shape[0] for x, _ in chunks][:-1] == [16] * (len(chunks) - 1)
        x, y = chunks[0]
        want = torch.from_numpy(images[got[: len(y)]]).float().div(127.5).sub(1).unsqueeze(1)  # (B, 1, H, W)
        torch.testing.assert_close(x, want, rtol=0, atol=0)
        np.testing.assert_array_equal(y.numpy(), labels[got[: len(y)]])


def test_inclusion_frequency_matches_q(folder):
    out, _, _ = folder
    ds = PrivateIndexedDataset(out)
    q, steps = 0.2, 150
    loader = PoissonBatchLoader(ds, PoissonPlan(len(ds), q, seed=3), physical_batch_size=64)
    counts = np.zeros(len(ds), np.int64)
    for step in range(steps):
        got, _ = _collect(loader, step)
        assert len(np.unique(got)) == len(got)
        counts[got] += 1
    total = stats.binomtest(int(counts.sum()), len(ds) * steps, q)
    assert total.pvalue > 1e-3, total
    per_example = min(stats.binomtest(int(c), steps, q).pvalue for c in counts)
    assert per_example * len(ds) > 1e-3  # Bonferroni over the examples
    # realised batch sizes vary like Binomial(N, q), not a fixed size
    sizes = [loader.share(s).numel() for s in range(steps)]
    assert np.std(sizes) > 0.5 * np.sqrt(len(ds) * q * (1 - q))


def test_two_ranks_partition_the_single_process_sample(folder):
    out, _, _ = folder
    ds = PrivateIndexedDataset(out)
    plan = PoissonPlan(len(ds), 0.25, seed=5)
    single = PoissonBatchLoader(ds, plan, 8)
    ranks = [PoissonBatchLoader(ds, PoissonPlan(len(ds), 0.25, seed=5), 8, rank=r, world_size=2) for r in (0, 1)]
    for step in range(5):
        whole, _ = _collect(single, step)
        a, _ = _collect(ranks[0], step)
        b, _ = _collect(ranks[1], step)
        assert not set(a) & set(b)
        np.testing.assert_array_equal(np.sort(np.concatenate([a, b])), whole)
        assert abs(len(a) - len(b)) <= 1


def test_deterministic_and_empty_share(folder):
    out, _, _ = folder
    ds = PrivateIndexedDataset(out)
    a = [_collect(PoissonBatchLoader(ds, PoissonPlan(len(ds), 0.1, seed=7), 10), s)[0] for s in range(3)]
    b = [_collect(PoissonBatchLoader(ds, PoissonPlan(len(ds), 0.1, seed=7), 10), s)[0] for s in range(3)]
    c = [_collect(PoissonBatchLoader(ds, PoissonPlan(len(ds), 0.1, seed=8), 10), s)[0] for s in range(3)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    plan = PoissonPlan(len(ds), 0.003, seed=1)  # expected batch 0.9: many steps sample nobody
    empty = next(s for s in range(100) if plan.indices(s).numel() == 0)
    assert list(PoissonBatchLoader(ds, plan, 4).chunks(empty)) == []
    one = next(s for s in range(100) if plan.indices(s).numel() == 1)
    loaders = [PoissonBatchLoader(ds, plan, 4, rank=r, world_size=2) for r in (0, 1)]
    assert [len(list(ld.chunks(one))) for ld in loaders] == [1, 0]  # rank 1's share is empty


def test_in_memory_variant_matches(folder):
    out, _, _ = folder
    disk = PrivateIndexedDataset(out)
    mem = InMemoryDataset.from_folder(out)
    assert len(mem) == len(disk) and mem.num_classes == 7
    plan = PoissonPlan(len(disk), 0.2, seed=2)
    for (xd, yd), (xm, ym) in zip(PoissonBatchLoader(disk, plan, 12).chunks(4), PoissonBatchLoader(mem, plan, 12).chunks(4)):
        torch.testing.assert_close(xd, xm, rtol=0, atol=0)
        torch.testing.assert_close(yd, ym, rtol=0, atol=0)
    with pytest.raises(ValueError, match="plan covers N=10"):
        PoissonBatchLoader(mem, PoissonPlan(10, 0.1, seed=0), 4)


def _stream_indices(out, **kw):
    idx = []
    for x, y in stream_loader(out, batch_size=32, **kw):
        assert x.shape[1:] == (1, 6, 6) and x.dtype == torch.float32
        idx.append(index_of(x))
    return np.concatenate(idx)


def test_stream_epoch_covers_everything_once_and_splits_ranks(folder):
    out, _, _ = folder
    one = _stream_indices(out, shuffle_buffer=50, seed=1)
    assert sorted(one.tolist()) == list(range(300)) and one.tolist() != list(range(300))
    assert np.array_equal(one, _stream_indices(out, shuffle_buffer=50, seed=1))  # deterministic
    r0 = _stream_indices(out, rank=0, world_size=2, seed=1)
    r1 = _stream_indices(out, rank=1, world_size=2, seed=1)
    assert not set(r0) & set(r1) and sorted(np.concatenate([r0, r1]).tolist()) == list(range(300))


def test_stream_workers_and_resampled(folder):
    out, _, _ = folder
    w = _stream_indices(out, rank=1, world_size=2, num_workers=2, seed=4)
    assert sorted(w.tolist()) == sorted(_stream_indices(out, rank=1, world_size=2, seed=4).tolist())
    batches = list(itertools.islice(iter(stream_loader(out, batch_size=32, resampled=True, seed=3)), 20))
    assert len(batches) == 20  # endless: more than one epoch's 10 batches
    idx = np.concatenate([index_of(x) for x, _ in batches])
    assert len(np.unique(idx)) < len(idx)  # with replacement
