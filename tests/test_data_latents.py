"""Latent cache: encode through a (stub) frozen encoder, bit-exact against a direct computation,
keyed by the autoencoder hash; adapter from a real autoencoder checkpoint."""
import numpy as np
import pytest
import torch

from dpldm.data.errors import AutoencoderMismatchError, SourceError
from dpldm.data.latents import ae_state_hash, autoencoder_hash, encode_shards, load_encoder
from dpldm.data.loaders import PoissonBatchLoader, PrivateIndexedDataset, open_private_dataset
from dpldm.data.shards import import_arrays
from dpldm.data.testing import indexed_images
from dpldm.privacy.sampler import PoissonPlan

def stub_encoder(x):  # (B, 4, 8, 8) in [-1, 1] -> (B, 3, 4, 4); elementwise, so exact for any batching
    return x[:, 1:, ::2, ::2] * 0.75 - x[:, :3, 1::2, 1::2]


@pytest.fixture(scope="module")
def images_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("img") / "s"
    images, labels, meta = indexed_images(45, (8, 8, 4), num_classes=3)  # RGBA, like cryptopunks
    import_arrays(images, labels, meta, out, shard_size=20, fmt="png")
    return out, images, labels


@pytest.mark.parametrize("fmt", ["npy", "pth"])
def test_encode_matches_direct_computation(tmp_path, images_folder, fmt):
    src, images, labels = images_folder
    report = encode_shards(src, tmp_path / "z", stub_encoder, autoencoder_sha256="c" * 64, batch_size=7, fmt=fmt)
    m = report.manifest
    assert m["kind"] == "latents" and m["latent_shape"] == [3, 4, 4] and m["autoencoder_sha256"] == "c" * 64
    assert m["num_examples"] == 45 and [s["nsamples"] for s in m["shards"]] == [20, 20, 5]
    assert m["class_histogram"] == np.bincount(labels).tolist()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # reference, computed here
    want = torch.cat([stub_encoder(x[i:i + 7]) for i in range(0, 45, 7)])
    ds = PrivateIndexedDataset(tmp_path / "z", expected_ae_hash="c" * 64)
    got, y = ds.get_batch(torch.arange(45))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    np.testing.assert_array_equal(y.numpy(), labels)


def test_latents_are_keyed_by_autoencoder(tmp_path, images_folder):
    src, _, _ = images_folder
    encode_shards(src, tmp_path / "z", stub_encoder, autoencoder_sha256="d" * 64)
    with pytest.raises(AutoencoderMismatchError, match="encoded by autoencoder dddddddddddd"):
        PrivateIndexedDataset(tmp_path / "z", expected_ae_hash="e" * 64)
    with pytest.raises(AutoencoderMismatchError):
        open_private_dataset(tmp_path / "z", expected_ae_hash="e" * 64, in_memory=True)
    with pytest.raises(AutoencoderMismatchError, match="expected latent shards"):
        PrivateIndexedDataset(src, expected_ae_hash="d" * 64)
    before = (tmp_path / "z" / "shard-000000.tar").read_bytes()
    with pytest.raises(SourceError, match="already holds a different dataset.*autoencoder_sha256=d"):
        encode_shards(src, tmp_path / "z", lambda x: 2 * stub_encoder(x), autoencoder_sha256="e" * 64)
    assert (tmp_path / "z" / "shard-000000.tar").read_bytes() == before  # stale latents neither reused nor lost
    r = encode_shards(src, tmp_path / "z", lambda x: 2 * stub_encoder(x), autoencoder_sha256="e" * 64, overwrite=True)
    assert r.written == [0, 1, 2]
    ds = PrivateIndexedDataset(tmp_path / "z", expected_ae_hash="e" * 64)
    x = torch.from_numpy(images_folder[1][:1]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    torch.testing.assert_close(ds.get_batch(torch.tensor([0]))[0], 2 * stub_encoder(x), rtol=0, atol=0)


def test_poisson_chunks_from_latent_shards(tmp_path, images_folder):
    src, _, labels = images_folder
    encode_shards(src, tmp_path / "z", stub_encoder, autoencoder_sha256="f" * 64)
    ds = open_private_dataset(tmp_path / "z", expected_ae_hash="f" * 64)
    plan = PoissonPlan(len(ds), 0.5, seed=9)
    chunks = list(PoissonBatchLoader(ds, plan, physical_batch_size=4).chunks(0))
    y = torch.cat([c[1] for c in chunks])
    np.testing.assert_array_equal(y.numpy(), labels[plan.indices(0).numpy()])
    assert all(c[0].shape[1:] == (3, 4, 4) for c in chunks)


def test_autoencoder_hash_from_checkpoint(tmp_path):
    from dpldm.checkpoint import save_checkpoint

    state = {"conv.weight": torch.randn(4, 3, 3, 3), "conv.bias": torch.zeros(4)}
    save_checkpoint(tmp_path / "a", {**{f"ae.{k}": v for k, v in state.items()}, "unet.w": torch.ones(2)},
                    {"kind": "ldm"})
    save_checkpoint(tmp_path / "b", {**{f"ae.{k}": v for k, v in state.items()}, "unet.w": torch.zeros(2)},
                    {"kind": "ldm"})
    h = autoencoder_hash(tmp_path / "a")
    assert h == ae_state_hash(dict(reversed(list(state.items())))) == autoencoder_hash(tmp_path / "b")  # UNet-independent
    changed = dict(state, **{"conv.bias": torch.tensor([0.0, 0.0, 0.0, 1e-7])})
    assert ae_state_hash(changed) != h


def test_load_encoder_adapter_with_real_autoencoder(tmp_path):
    from dpldm.config import RunConfig
    from dpldm.models.autoencoder import Autoencoder
    from dpldm.models.ldm import save_autoencoder

    cfg = RunConfig()  # grayscale autoencoder (data.channels = 1)
    torch.manual_seed(0)
    ae = Autoencoder(cfg.autoencoder)
    save_autoencoder(tmp_path / "ae", ae, cfg)
    encode_fn, h, info = load_encoder(tmp_path / "ae")
    assert h == ae_state_hash(ae.state_dict()) == autoencoder_hash(tmp_path / "ae") and info["kind"] == "autoencoder"
    images, labels, meta = indexed_images(12, (8, 8), num_classes=2)
    import_arrays(images, labels, meta, tmp_path / "s", shard_size=5)
    encode_shards(tmp_path / "s", tmp_path / "z", encode_fn, autoencoder_sha256=h)
    x = torch.from_numpy(images[:5]).unsqueeze(1).float() / 127.5 - 1.0  # (5, 1, 8, 8)
    with torch.no_grad():
        want = ae.eval().encode(x).mean
    got, _ = PrivateIndexedDataset(tmp_path / "z", expected_ae_hash=h).get_batch(torch.arange(5))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # oneDNN convs are not bitwise reproducible
