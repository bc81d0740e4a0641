"""The one DP trainer end to end on a tiny model (in-process): it spends the accounted epsilon,
touches only the selected parameters, starts from the public EMA weights, resumes exactly,
keeps its secrets out of the released model, fails closed on privacy settings, locks its run
folder, refuses resuming on other data or other hyperparameters and records the allowed changes."""
import json
import math
import os
import stat

import numpy as np
import pytest
import torch

from dpldm.checkpoint import list_step_checkpoints, load_checkpoint
from dpldm.config import load_config
from dpldm.errors import InputError, RunFolderError, UserError
from dpldm.models.ldm import LatentDiffusion, load_ldm, save_ldm
from dpldm.privacy.accountant import PrivacyParameterError, compute_epsilon
from dpldm.train.dp_finetune import FinetuneOptions, train
from dpldm.train.run_folder import RunFolderLock
from dpldm.utils.logging import read_metrics

TINY = [
    "autoencoder.base_channels=8", "autoencoder.channel_mult=[1, 2]", "autoencoder.latent_channels=2",
    "unet.in_channels=2", "unet.model_channels=16", "unet.channel_mult=[1, 2]", "unet.attention_levels=[1]",
    "unet.num_heads=2", "unet.context_dim=16", "unet.num_classes=5",
    "data.image_size=16", "data.num_classes=3",
    "privacy.expected_batch_size=8", "privacy.steps=4", "privacy.epsilon=5.0", "privacy.delta=1e-3",
    "privacy.physical_batch_size=3", "privacy.max_grad_norm=0.5", "privacy.backend=\"torch\"",
    "train.finetune=\"attention:all\"", "train.lr=1e-3", "train.wandb=false", "train.threads=1",
    "train.log_every=2", "train.checkpoint_every=2", "train.ema_decay=0.5",
    "diffusion.timesteps_per_example=2",
]
SEEDED = ["train.deterministic=true", "train.not_private=true"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, 16, 16), dtype=np.uint8)
    np.savez(root / "private.npz", images=images, labels=np.arange(40) % 3)
    images[0] = 255 - images[0]  # the same N, one example different
    np.savez(root / "other.npz", images=images, labels=np.arange(40) % 3)
    torch.manual_seed(0)
    ldm = LatentDiffusion(load_config(None, TINY), scale_factor=0.7)
    with torch.no_grad():  # a public model whose EMA differs from its raw UNet weights
        for p in ldm.ema.module.parameters():
            p.add_(0.01 * torch.randn_like(p))
    public = save_ldm(root / "public", ldm)
    return root, public


def cfg_for(root, *extra, private="private.npz"):
    return load_config(None, TINY + [f"data.private={json.dumps(str(root / private))}", *extra])


def run(cfg, out, public, **kw):
    cfg.train.out_dir = str(out)
    return train(cfg, FinetuneOptions(out=out, init=str(public), **kw))


def test_spends_accounted_epsilon_touches_only_attention_and_starts_from_ema(setup):
    root, public = setup
    res = run(cfg_for(root, "train.sample_every=2"), root / "a", public)
    assert res["finished"] and res["device"].startswith("cpu") and res["precision"] == "fp32"
    rep = res["privacy"]
    expected = compute_epsilon(rep["noise_multiplier"], 8 / 40, 4, 1e-3, "prv")
    assert rep["epsilon"] == pytest.approx(expected, rel=1e-9) and rep["epsilon"] <= 5.0 + 1e-6
    assert rep["steps"] == 4 and rep["sampling"] == "poisson" and rep["private"] is True
    before, after = load_ldm(public), load_ldm(res["model"])
    start = before.ema.module.state_dict()  # the public model's EMA weights: where fine-tuning starts
    changed = {n for n, t in after.unet.state_dict().items() if not torch.equal(start[n], t)}
    assert changed, "fine-tuning changed nothing"
    allowed_ids = {id(p) for m in before.unet.attention_modules() for p in m.parameters()}
    allowed_ids |= {id(p) for p in before.unet.label_embedder.parameters()}
    allowed = {n for n, p in before.unet.named_parameters() if id(p) in allowed_ids}
    assert changed <= allowed, sorted(changed - allowed)  # every frozen tensor is the public EMA's, bit for bit
    assert len(allowed - changed) < len(allowed) // 2
    raw = before.unet.state_dict()
    assert any(not torch.equal(raw[n], t) for n, t in after.unet.state_dict().items() if n not in allowed)
    for (_, a), (_, b) in zip(before.ae.state_dict().items(), after.ae.state_dict().items()):
        assert torch.equal(a, b)
    rows = [r for r in read_metrics(root / "a") if "epsilon" in r]
    assert [r["step"] for r in rows] == [2, 4] and rows[-1]["epsilon"] == pytest.approx(rep["epsilon"])
    assert set(rows[0]) == {"step", "epsilon", "lr"}  # a private run logs no timing (tests/test_privacy_path.py)
    grids = [r["samples"] for r in read_metrics(root / "a") if "samples" in r]  # EMA grids (post-processing)
    assert [os.path.basename(g) for g in grids] == ["step_00000002.png", "step_00000004.png"]
    assert all(os.path.getsize(g) > 0 for g in grids)


def test_secrets_stay_in_private_checkpoints(setup):
    root, public = setup
    run(cfg_for(root), root / "s", public)
    ck = list_step_checkpoints(root / "s")[-1]
    _, meta = load_checkpoint(ck)
    secrets = [str(meta["privacy"]["ledger"]["plan"]["seed"]), str(meta["secrets"]["diffusion_seed"])]
    assert all(len(s) > 6 for s in secrets)  # drawn from the OS (63-bit), not train.seed = 0
    assert stat.S_IMODE(os.stat(ck).st_mode) == 0o700
    assert all(stat.S_IMODE(os.stat(f).st_mode) == 0o600 for f in ck.iterdir())
    released = (root / "s" / "model" / "meta.json").read_text()
    assert not any(s in released for s in secrets)
    assert json.loads(released)["privacy"]["epsilon"] <= 5.0


def test_resume_equals_uninterrupted_and_seeded_runs_report_infinite_epsilon(setup):
    root, public = setup
    full = run(cfg_for(root, *SEEDED), root / "full", public)
    part = run(cfg_for(root, *SEEDED), root / "part", public, max_steps=2)
    assert not part["finished"] and part["steps_done"] == 2 and part["stop_reason"] == "--max-steps 2"
    resumed = run(cfg_for(root, *SEEDED), root / "part", public, resume=True)
    assert resumed["finished"]
    for res in (full, resumed):
        assert math.isinf(res["privacy"]["epsilon"]) and res["privacy"]["private"] is False
    assert resumed["privacy"]["epsilon_if_noise_were_secret"] == full["privacy"]["epsilon_if_noise_were_secret"]
    a, b = load_ldm(full["model"]), load_ldm(resumed["model"])
    for (n, x), (_, y) in zip(a.unet.state_dict().items(), b.unet.state_dict().items()):
        assert torch.equal(x, y), n
    assert math.isinf(json.loads((root / "full" / "model" / "meta.json").read_text())["privacy"]["epsilon"])


def test_fail_closed_on_privacy_settings(setup):
    root, public = setup
    with pytest.raises(UserError, match="NOT private"):
        run(cfg_for(root, "train.deterministic=true"), root / "d", public)
    # an explicit sigma that spends more than the target epsilon
    with pytest.raises(PrivacyParameterError, match=r"above the target privacy.epsilon=5"):
        run(cfg_for(root, "privacy.noise_multiplier=0.3"), root / "e", public)
    assert not list_step_checkpoints(root / "e")
    # the same sigma with the target raised to what it spends is accepted
    eps = compute_epsilon(0.3, 8 / 40, 4, 1e-3, "prv")
    res = run(cfg_for(root, "privacy.noise_multiplier=0.3", f"privacy.epsilon={eps * 1.001}"), root / "e2", public)
    assert res["privacy"]["epsilon"] == pytest.approx(eps, rel=1e-9)


def test_run_folder_is_locked_and_never_clobbered(setup):
    root, public = setup
    out = root / "locked"
    out.mkdir()
    lock = RunFolderLock(out).acquire()  # another trainer holds the folder
    try:
        with pytest.raises(RunFolderError, match="in use by another dpldm run"):
            run(cfg_for(root), out, public)
    finally:
        lock.release()
    run(cfg_for(root), out, public, max_steps=2)
    with pytest.raises(RunFolderError, match="already holds step checkpoints"):
        run(cfg_for(root), out, public)
    (root / "afile").write_text("x")
    with pytest.raises(RunFolderError, match="not a folder"):
        run(cfg_for(root), root / "afile", public)


def test_resume_refuses_other_data_and_changed_hyperparameters_records_allowed_changes(setup):
    root, public = setup
    out = root / "r"
    run(cfg_for(root, *SEEDED), out, public, max_steps=2)
    with pytest.raises(RunFolderError, match="other private data"):
        run(cfg_for(root, *SEEDED, private="other.npz"), out, public, resume=True)
    with pytest.raises(RunFolderError, match=r"train.lr: checkpoint 0.001 != now 0.002"):
        run(cfg_for(root, *SEEDED, "train.lr=2e-3"), out, public, resume=True)
    with pytest.raises(RunFolderError, match=r"privacy.steps"):
        run(cfg_for(root, *SEEDED, "privacy.steps=6"), out, public, resume=True)
    res = run(cfg_for(root, *SEEDED, "privacy.physical_batch_size=5"), out, public, resume=True)
    assert res["finished"]
    _, meta = load_checkpoint(list_step_checkpoints(out)[-1])
    assert meta["resumes"] == [{"at_step": 2, "world_size": 1,
                                "changed": {"privacy.physical_batch_size": [3, 5]}}]


def test_bf16_run_finishes_and_stays_close_to_fp32(setup):
    """bf16 autocast forward/backward with fp32 norms/accumulators: the same seeded run lands
    near the fp32 one (an independent run of the same recipe in fp32)."""
    root, public = setup
    a = run(cfg_for(root, *SEEDED), root / "fp32", public)
    b = run(cfg_for(root, *SEEDED, "train.precision=\"bf16\""), root / "bf16", public)
    assert b["precision"] == "bf16" and b["finished"]
    x, y = load_ldm(a["model"]).unet.state_dict(), load_ldm(b["model"]).unet.state_dict()
    moved = sum((x[n] - load_ldm(public).ema.module.state_dict()[n]).norm() for n in x)
    diff = sum((x[n] - y[n]).norm() for n in x)
    assert 0 < diff < 0.05 * moved, (float(diff), float(moved))


def test_asking_for_a_missing_gpu_is_an_input_error(setup, monkeypatch):
    root, public = setup
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without a GPU, wherever this runs
    with pytest.raises(InputError, match="--device=cuda: "):
        run(cfg_for(root, "train.device=\"cuda\""), root / "dev", public)
    assert not (root / "dev").exists()  # refused before the run folder is touched


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
