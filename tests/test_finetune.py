"""DP fine-tuning end to end on a tiny model: runs, spends the accounted epsilon, touches only
the selected parameters, and resumes exactly (deterministic mode)."""
import json

import numpy as np
import pytest
import torch

from dpldm.checkpoint import list_step_checkpoints, load_checkpoint
from dpldm.config import load_config
from dpldm.models.ldm import LatentDiffusion, load_ldm, save_ldm
from dpldm.privacy.accountant import compute_epsilon
from dpldm.train.finetune import finetune

TINY = [
    "autoencoder.base_channels=8", "autoencoder.channel_mult=[1, 2]", "autoencoder.latent_channels=2",
    "unet.in_channels=2", "unet.model_channels=16", "unet.channel_mult=[1, 2]", "unet.attention_levels=[1]",
    "unet.num_heads=2", "unet.context_dim=16", "unet.num_classes=5",
    "data.image_size=16", "data.num_classes=3",
    "privacy.expected_batch_size=8", "privacy.steps=4", "privacy.epsilon=5.0", "privacy.delta=1e-3",
    "privacy.physical_batch_size=3", "privacy.max_grad_norm=0.5",
    "train.finetune=\"attention:all\"", "train.lr=1e-3", "train.wandb=false", "train.threads=1",
    "train.log_every=2", "train.checkpoint_every=2", "train.deterministic=true", "train.ema_decay=0.5",
    "diffusion.timesteps_per_example=2",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, 16, 16), dtype=np.uint8)
    labels = np.arange(40) % 3
    npz = root / "private.npz"
    np.savez(npz, images=images, labels=labels)
    cfg = load_config(None, TINY + [f"data.private={json.dumps(str(npz))}"])
    ldm = LatentDiffusion(cfg, scale_factor=0.7)
    public = save_ldm(root / "public", ldm)
    return root, cfg, public


def _run(cfg, out, public, **kw):
    cfg.train.out_dir = str(out)
    return finetune(cfg, out, init=str(public), **kw)


def test_finetune_spends_accounted_epsilon_and_touches_only_attention(setup):
    root, cfg, public = setup
    res = _run(cfg, root / "run_a", public)
    assert res["finished"]
    rep = res["privacy"]
    expected = compute_epsilon(rep["noise_multiplier"], 8 / 40, 4, 1e-3, "prv")
    assert rep["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert rep["epsilon"] <= 5.0 + 1e-6
    assert rep["steps"] == 4 and rep["sampling"] == "poisson"
    before, after = load_ldm(public), load_ldm(res["model"])
    changed = {n for (n, a), (_, b) in zip(before.unet.named_parameters(), after.unet.named_parameters())
               if not torch.equal(a, b)}
    assert changed, "fine-tuning changed nothing"
    # independent reference: the parameters of the attention modules and the class embedder
    allowed_ids = {id(p) for m in before.unet.attention_modules() for p in m.parameters()}
    allowed_ids |= {id(p) for p in before.unet.label_embedder.parameters()}
    allowed = {n for n, p in before.unet.named_parameters() if id(p) in allowed_ids}
    assert changed <= allowed, sorted(changed - allowed)
    assert len(allowed - changed) < len(allowed) // 2  # most of the selection moved
    # the autoencoder never changes
    for (_, a), (_, b) in zip(before.ae.state_dict().items(), after.ae.state_dict().items()):
        assert torch.equal(a, b)


def test_resume_equals_uninterrupted(setup):
    root, cfg, public = setup
    full = _run(cfg, root / "full", public)
    part = _run(cfg, root / "part", public, max_steps=2)
    assert not part["finished"] and part["steps_done"] == 2
    tensors, meta = load_checkpoint(list_step_checkpoints(root / "part")[-1])
    assert meta["privacy_ledger"]["steps_done"] == 2
    resumed = _run(cfg, root / "part", public, resume=True)
    assert resumed["finished"]
    assert resumed["privacy"]["epsilon"] == pytest.approx(full["privacy"]["epsilon"], rel=1e-12)
    a, b = load_ldm(full["model"]), load_ldm(resumed["model"])
    for (n, x), (_, y) in zip(a.unet.state_dict().items(), b.unet.state_dict().items()):
        assert torch.equal(x, y), n


def test_every_shipped_recipe_loads_and_builds_its_attention_selection():
    """configs/*.toml and configs/paper/*.toml are valid recipes whose finetune spec selects
    attention modules that exist in their UNet (built on the meta device: no memory)."""
    from pathlib import Path

    from dpldm.models.selection import apply_finetune
    from dpldm.models.unet import UNet

    root = Path(__file__).resolve().parents[1] / "configs"
    recipes = sorted(root.glob("*.toml")) + sorted((root / "paper").glob("*.toml"))
    assert len(recipes) >= 5
    for path in recipes:
        cfg = load_config(path)
        with torch.device("meta"):
            unet = UNet(cfg.unet)
        names = apply_finetune(unet, cfg.train.finetune)
        assert names, path
