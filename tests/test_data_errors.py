"""Bad input gives a ShardError/SourceError naming the shard file and the sample key; nothing
already written is lost."""
import json
import shutil

import numpy as np
import pytest
import torch

from dpldm.data.codec import encode_payload, sample_key
from dpldm.data.errors import ShardError
from dpldm.data.latents import encode_shards
from dpldm.data.loaders import InMemoryDataset, PrivateIndexedDataset, stream_loader
from dpldm.data.manifest import open_shard_folder
from dpldm.data.shards import import_arrays, iter_shard
from dpldm.data.testing import indexed_images, plant_shard


def _make(tmp_path, name="s", n=30, shard_size=10, fmt="npy"):
    images, labels, meta = indexed_images(n, (4, 4), num_classes=5)
    import_arrays(images, labels, meta, tmp_path / name, shard_size=shard_size, fmt=fmt)
    return tmp_path / name, images, labels


def _good(i, images, labels, ext="npy"):
    return {"__key__": sample_key(i), ext: encode_payload(images[i], ext), "cls": str(int(labels[i])).encode()}


def _read_everything(folder, verify="size"):
    f = open_shard_folder(folder)
    for k in range(len(f.shards)):
        for _ in iter_shard(f, k, verify=verify):
            pass


def _random_access_everything(folder, verify="size"):
    ds = PrivateIndexedDataset(folder, verify=verify)
    ds.get_batch(torch.arange(len(ds)))


READERS = [_read_everything, _random_access_everything]


@pytest.mark.parametrize("read", READERS)
def test_truncated_tar(tmp_path, read):
    out, _, _ = _make(tmp_path)
    shard = out / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:5000])  # sample 12's .npy is cut (2 KiB per sample)
    with pytest.raises(ShardError, match="truncated") as e:
        read(out)
    assert e.value.shard.endswith("shard-000001.tar") and e.value.key == "00000012"
    assert "shard-000001.tar [sample '00000012']" in str(e.value)


def test_truncated_tar_streaming(tmp_path):
    out, _, _ = _make(tmp_path)
    shard = out / "shard-000002.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    with pytest.raises(ShardError, match="shard-000002.tar.*truncated"):
        for _ in stream_loader(out, batch_size=4, shuffle_buffer=0):
            pass


@pytest.mark.parametrize("read", READERS)
def test_corrupt_tar_same_size(tmp_path, read):
    out, _, _ = _make(tmp_path)
    shard = out / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    data[2048 * 3: 2048 * 3 + 512] = b"\x07" * 512  # the tar header of sample 3
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="sha256 differs from the index") as e:
        read(out, verify="sha256")
    assert e.value.shard.endswith("shard-000000.tar") and e.value.key == "00000003"
    with pytest.raises(ShardError) as e:  # without the checksum, the broken sample itself is caught
        read(out, verify="size")
    assert e.value.shard.endswith("shard-000000.tar") and e.value.key == "00000003"


@pytest.mark.parametrize("read", READERS)
def test_missing_member(tmp_path, read):
    out, images, labels = _make(tmp_path)
    samples = [_good(i, images, labels) for i in range(10, 20)]
    del samples[4]["cls"]
    plant_shard(out, 1, samples)
    with pytest.raises(ShardError, match=r"shard-000001.tar \[sample '00000014'\]: missing .cls member"):
        read(out)


@pytest.mark.parametrize("read", READERS)
def test_missing_sample_key(tmp_path, read):
    out, images, labels = _make(tmp_path)
    plant_shard(out, 1, [_good(i, images, labels) for i in range(10, 20) if i != 13] + [_good(13, images, labels)])
    with pytest.raises(ShardError, match="expects '00000013'") as e:
        read(out)
    assert e.value.shard.endswith("shard-000001.tar") and e.value.key == "00000013"


@pytest.mark.parametrize("read", READERS)
@pytest.mark.parametrize("bad,match", [
    (lambda x: x.astype(np.float32), "wrong dtype float32 \\(expected uint8\\)"),
    (lambda x: x[:3], "wrong shape \\(3, 4\\) \\(expected \\(4, 4\\)\\)"),
])
def test_wrong_dtype_or_shape(tmp_path, read, bad, match):
    out, images, labels = _make(tmp_path)
    samples = [_good(i, images, labels) for i in range(20, 30)]
    samples[7]["npy"] = encode_payload(bad(images[27]), "npy")
    plant_shard(out, 2, samples)
    with pytest.raises(ShardError, match=r"shard-000002.tar \[sample '00000027'\]: " + match):
        read(out)


def test_png_with_wrong_channels(tmp_path):
    out, images, labels = _make(tmp_path, fmt="png")
    samples = [_good(i, images, labels, "png") for i in range(10)]
    samples[2]["png"] = encode_payload(np.repeat(images[2][..., None], 3, axis=2), "png")
    plant_shard(out, 0, samples)
    with pytest.raises(ShardError, match=r"\[sample '00000002'\]: wrong shape \(4, 4, 3\)"):
        _random_access_everything(out)


@pytest.mark.parametrize("read", READERS)
@pytest.mark.parametrize("cls,match", [(b"5", "label 5 out of range \\[0, 5\\)"), (b"-1", "label -1 out of range"),
                                       (b"x1", "label b'x1' is not an integer")])
def test_label_out_of_range(tmp_path, read, cls, match):
    out, images, labels = _make(tmp_path)
    samples = [_good(i, images, labels) for i in range(10)]
    samples[6]["cls"] = cls
    plant_shard(out, 0, samples)
    with pytest.raises(ShardError, match=r"\[sample '00000006'\]: " + match):
        read(out)


def _stub_encoder(x):  # (B, C, 4, 4) -> (B, 2, 2, 2)
    z = torch.nn.functional.avg_pool2d(x, 2)
    return torch.cat([z, -z], dim=1)


@pytest.mark.parametrize("read", READERS)
def test_nan_latents_in_shard(tmp_path, read):
    src, images, _ = _make(tmp_path)
    encode_shards(src, tmp_path / "z", _stub_encoder, autoencoder_sha256="a" * 64)
    f = open_shard_folder(tmp_path / "z")
    samples = []
    for i, z, y in iter_shard(f, 1):
        if i == 15:
            z = z.copy()
            z[1, 0, 1] = np.nan
        samples.append({"__key__": sample_key(i), "npy": encode_payload(z, "npy"), "cls": str(y).encode()})
    plant_shard(tmp_path / "z", 1, samples)
    with pytest.raises(ShardError, match=r"shard-000001.tar \[sample '00000015'\]: 1 non-finite value"):
        read(tmp_path / "z")


def test_nan_from_encoder_keeps_finished_shards(tmp_path):
    src, images, _ = _make(tmp_path)

    def bad_encoder(x):
        z = _stub_encoder(x)
        if x.shape[0] == 10 and torch.equal(x[0], torch.from_numpy(images[20]).float().div(127.5).sub(1)[None]):
            z[3, 1] = float("nan")  # example 23, in the third shard
        return z

    with pytest.raises(ShardError, match=r"shard-000002.tar \[sample '00000023'\]: encoder produced NaN"):
        encode_shards(src, tmp_path / "z", bad_encoder, autoencoder_sha256="b" * 64, batch_size=10)
    assert sorted(p.name for p in (tmp_path / "z").glob("shard-*")) == ["shard-000000.tar", "shard-000001.tar"]
    assert not (tmp_path / "z" / "manifest.json").exists()
    report = encode_shards(src, tmp_path / "z", _stub_encoder, autoencoder_sha256="b" * 64)
    assert report.skipped == [0, 1] and report.written == [2]


def test_empty_shard_list(tmp_path):
    out, _, _ = _make(tmp_path)
    idx = json.loads((out / "index.json").read_text())
    idx["shardlist"] = []
    (out / "index.json").write_text(json.dumps(idx))
    with pytest.raises(ShardError, match="index.json: empty shard list"):
        PrivateIndexedDataset(out)
    m = json.loads((out / "manifest.json").read_text())
    m["shards"], m["num_examples"] = [], 0
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match="manifest.json: empty shard list"):
        stream_loader(out, batch_size=2)
    with pytest.raises(ShardError, match="incomplete"):
        open_shard_folder(tmp_path)  # no manifest at all
    with pytest.raises(ValueError, match="empty dataset"):
        InMemoryDataset(torch.zeros(0, 1, 2, 2), torch.zeros(0, dtype=torch.int64))


def test_index_out_of_date(tmp_path):
    out, images, labels = _make(tmp_path)
    # same-sized shard with other content: the checksum catches it
    other, _, _ = _make(tmp_path, name="other")
    for k in (0, 1):
        shutil.copy(other / f"shard-00000{k}.tar", out / f"shard-00000{1 - k}.tar")  # swapped shards
    with pytest.raises(ShardError, match="shard-000000.tar.*sha256 differs from the index"):
        PrivateIndexedDataset(out).get(3)
    # by size only, the keys give it away: shard 0 now holds samples 10..19
    with pytest.raises(ShardError, match=r"shard-000000.tar \[sample '00000003'\]: found sample '00000013'"):
        PrivateIndexedDataset(out, verify="size").get(3)
    # a shard that grew after indexing
    out2, images, labels = _make(tmp_path, name="grown")
    grown = [dict(_good(i % 30, images, labels), __key__=sample_key(i)) for i in range(20, 40)]
    plant_shard(out2, 2, grown, reindex=False)
    with pytest.raises(ShardError, match="shard-000002.tar.*index says"):
        _read_everything(out2)
    # index.json no longer matches manifest.json
    idx = json.loads((out2 / "index.json").read_text())
    idx["shardlist"][0]["nsamples"] = 9
    (out2 / "index.json").write_text(json.dumps(idx))
    with pytest.raises(ShardError, match="index.json: shard list differs from manifest.json"):
        open_shard_folder(out2)


def test_missing_shard_file(tmp_path):
    out, _, _ = _make(tmp_path)
    (out / "shard-000001.tar").unlink()
    with pytest.raises(ShardError, match="shard-000001.tar: shard file missing"):
        PrivateIndexedDataset(out).get(12)
