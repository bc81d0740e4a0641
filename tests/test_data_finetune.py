"""Issue acceptance: `dpldm finetune` runs from latent shards made by `dpldm data encode`, and
feeds the DP engine the same latents as encoding the images inside fine-tuning."""
import json

import numpy as np
import pytest
import torch

from dpldm.cli import main
from dpldm.config import load_config
from dpldm.data.latents import ae_state_hash
from dpldm.errors import InputError
from dpldm.models.ldm import LatentDiffusion, load_ldm, save_ldm
from dpldm.parallel.dist import single_process_context
from dpldm.train.dp_finetune import FinetuneOptions, train
from dpldm.train.private_data import open_private_data

TINY = [
    "autoencoder.base_channels=8", "autoencoder.channel_mult=[1, 2]", "autoencoder.latent_channels=2",
    "unet.in_channels=2", "unet.model_channels=16", "unet.channel_mult=[1, 2]", "unet.attention_levels=[1]",
    "unet.num_heads=2", "unet.context_dim=16", "unet.num_classes=5", "data.image_size=16", "data.num_classes=3",
    "privacy.expected_batch_size=8", "privacy.steps=2", "privacy.noise_multiplier=1.0", "privacy.delta=1e-3",
    "privacy.physical_batch_size=3", "privacy.backend=\"torch\"", "train.finetune=\"attention:all\"", "train.lr=1e-3", "train.wandb=false",
    "train.threads=1", "train.log_every=1", "train.checkpoint_every=2", "train.deterministic=true", "train.not_private=true",
    "diffusion.timesteps_per_example=2",
]


def test_finetune_from_encoded_latent_shards(tmp_path, capsys):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, 16, 16), dtype=np.uint8)
    np.savez(tmp_path / "private.npz", images=images, labels=np.arange(40) % 3)
    torch.manual_seed(0)
    cfg = load_config(None, TINY)
    public = save_ldm(tmp_path / "public", LatentDiffusion(cfg, scale_factor=0.7))
    assert main(["data", "import", "--source", str(tmp_path / "private.npz"), "--out", str(tmp_path / "img"),
                 "--shard-size", "40"]) == 0
    assert main(["data", "encode", "--shards", str(tmp_path / "img"), "--autoencoder", str(public),
                 "--out", str(tmp_path / "z")]) == 0
    capsys.readouterr()

    # the latents the DP engine sees are those fine-tuning would compute from the images itself
    ldm = load_ldm(public)
    ctx, h = single_process_context(), ae_state_hash(ldm.ae.state_dict())

    def private(spec):
        c = load_config(None, TINY + [f"data.private={json.dumps(spec)}"])
        return open_private_data(c, ctx, ae=ldm.ae, ae_sha256=h).dataset

    direct, cached = private(str(tmp_path / "private.npz")), private(str(tmp_path / "z"))
    idx = torch.arange(40)
    (xd, yd), (xc, yc) = direct.get_batch(idx), cached.get_batch(idx)
    torch.testing.assert_close(xc, xd, rtol=1e-4, atol=1e-5)  # oneDNN convs: last-bit differences
    assert torch.equal(yc, yd)

    c = load_config(None, TINY + [f"data.private={json.dumps(str(tmp_path / 'z'))}"])
    c.train.out_dir = str(tmp_path / "a")
    res = train(c, FinetuneOptions(out=tmp_path / "a", init=str(public)))
    assert res["finished"] and res["privacy"]["steps"] == 2 and "latent shards" in capsys.readouterr().out

    other = LatentDiffusion(cfg, scale_factor=0.7)  # another autoencoder (fresh random weights)
    save_ldm(tmp_path / "other", other)
    c = load_config(None, TINY + [f"data.private={json.dumps(str(tmp_path / 'z'))}"])
    c.train.out_dir = str(tmp_path / "c")
    with pytest.raises(InputError, match="encoded by autoencoder"):
        train(c, FinetuneOptions(out=tmp_path / "c", init=str(tmp_path / "other")))
