"""`dpldm export --format diffusers`: the folder loads with diffusers' own `from_pretrained`, and
diffusers reproduces dpldm's UNet forward, decode and DDIM sampling (fp32 tolerance); the folder
loads back as a dpldm model with identical tensors. The reference is the diffusers package itself
(pinned in requirements.txt)."""
from __future__ import annotations

import argparse
import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # from_pretrained on a local folder: never the network

import numpy as np
import pytest
import torch

from dpldm import export as export_cmd
from dpldm.checkpoint import CheckpointError
from dpldm.diffusion.sampling import ddim_sample
from dpldm.errors import UserError
from dpldm.interop.diffusers_folder import CARD_SNIPPET_FOLDER, export_diffusers, load_diffusers
from dpldm.models.ldm import load_ldm
from dpldm.privacy.accountant import compute_epsilon
from tiny_ldm import EXPORTABLE, TINY, save_tiny

diffusers = pytest.importorskip("diffusers")  # a pinned requirement: this skip only fires on a broken install
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel  # noqa: E402

PRIVACY = {"epsilon": compute_epsilon(1.1, 0.01, 700, 1e-5), "delta": 1e-5, "noise_multiplier": 1.1,
           "sample_rate": 0.01, "num_examples": 5000, "expected_batch_size": 50.0, "steps": 700, "accountant": "prv",
           "max_grad_norm": 1.0, "sampling": "poisson", "finetune": "attention:all"}


def run_export(*argv):
    p = argparse.ArgumentParser()
    export_cmd.add_arguments(p)
    return export_cmd.run(p.parse_args(list(argv)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model = save_tiny(root / "model", EXPORTABLE, seed=3, extra={"privacy": PRIVACY})
    assert run_export("--checkpoint", str(model), "--out", str(root / "hub"), "--device", "cpu") == 0
    return model, root / "hub"


def components(folder):
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
    sched = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    from safetensors.torch import load_file

    table = load_file(str(folder / "class_embedder" / "embedding.safetensors"))["weight"]
    return unet, vae, sched, table


@torch.no_grad()
def test_diffusers_reproduces_unet_forward_and_decode(exported):
    model, hub = exported
    ldm = load_ldm(model)
    unet, vae, sched, table = components(hub)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, *ldm.latent_shape, generator=g)  # (B, 3, 8, 8)
    t = torch.tensor([0, 3, 9, 17, 19])
    y = torch.tensor([0, 1, 3, 4, 5])  # 5 = the null class
    ours = ldm.ema.module(x, t, y)
    theirs = unet(x, t, encoder_hidden_states=table[y][:, None, :]).sample
    assert ours.abs().max() > 0.1  # perturbed weights: a wrong mapping cannot hide behind zero-init layers
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    z = torch.randn(3, *ldm.latent_shape, generator=g)
    torch.testing.assert_close(vae.decode(z / vae.config.scaling_factor).sample.clamp(-1, 1), ldm.decode(z),
                               rtol=1e-4, atol=1e-5)
    assert vae.config.scaling_factor == pytest.approx(ldm.scale_factor)
    torch.testing.assert_close(sched.alphas_cumprod.double(), ldm.schedule.alphas_cumprod, rtol=0, atol=1e-6)


@torch.no_grad()
def test_encoder_is_documented_as_not_exact(exported):
    """diffusers' Encoder pads asymmetrically before downsampling: AutoencoderKL.encode differs.
    If this starts to pass as equal, diffusers changed and docs/interop.md must be updated."""
    model, hub = exported
    ldm = load_ldm(model)
    vae = AutoencoderKL.from_pretrained(hub, subfolder="vae").eval()
    img = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert not torch.allclose(vae.encode(img).latent_dist.mean, ldm.ae.encode(img).mean, atol=1e-3)
    info = json.loads((hub / "dpldm.json").read_text())
    assert info["exact"]["vae.encoder"].startswith("NOT exact")


@torch.no_grad()
@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_model_card_snippet_samples_like_dpldm(exported, guidance):
    """The README's diffusers sampling code, run as written, equals dpldm's DDIM (eta 0, steps = T)."""
    model, hub = exported
    card = (hub / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert CARD_SNIPPET_FOLDER in code and "guidance = 1.0" in code
    code = code.replace(CARD_SNIPPET_FOLDER, f"folder = {str(hub)!r}").replace("guidance = 1.0", f"guidance = {guidance}")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    ldm = load_ldm(model)
    x_T = torch.randn(3, *ldm.latent_shape, generator=torch.Generator().manual_seed(0))
    z = ddim_sample(ldm.ema.module, ldm.schedule, torch.tensor([0, 1, 2]), (3, *ldm.latent_shape),
                    steps=ldm.cfg.diffusion.timesteps, eta=0.0, guidance_scale=guidance, x_T=x_T)
    torch.testing.assert_close(scope["images"], ldm.decode(z), rtol=1e-4, atol=1e-4)


def test_model_card_states_the_privacy_guarantee(exported, tmp_path):
    _, hub = exported
    card = (hub / "README.md").read_text()
    for row in (f"| epsilon | {PRIVACY['epsilon']:.6g} |", "| delta | 1e-05 |", "| noise multiplier sigma | 1.1 |",
                "| Poisson sample rate q | 0.01 |", "| private examples N | 5000 |", "| noisy steps | 700 |",
                "| accountant | prv |"):
        assert row in card, row
    public = save_tiny(tmp_path / "public", EXPORTABLE)  # no privacy record
    export_diffusers(load_ldm(public), tmp_path / "hub")
    card = (tmp_path / "hub" / "README.md").read_text()
    assert "No differential-privacy guarantee" in card and "| epsilon |" not in card
    declared = save_tiny(tmp_path / "np", EXPORTABLE, extra={"privacy": {**PRIVACY, "private": False,
                                                                          "epsilon": float("inf")}})
    export_diffusers(load_ldm(declared), tmp_path / "hub_np")
    card = (tmp_path / "hub_np" / "README.md").read_text()
    assert "declared not private" in card and "| epsilon |" not in card


@torch.no_grad()
def test_round_trip_back_into_dpldm_is_exact(exported, tmp_path):
    model, hub = exported
    a, b = load_ldm(model), load_ldm(hub)  # load_ldm reads the diffusers folder (the public-init path)
    sa, sb = a.ema.module.state_dict(), b.unet.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(torch.equal(v, b.ae.state_dict()[k]) for k, v in a.ae.state_dict().items())
    assert b.cfg.to_dict() == a.cfg.to_dict() and b.scale_factor == a.scale_factor
    assert b.meta["privacy"] == PRIVACY
    img = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    assert torch.equal(a.encode(img), b.encode(img))  # dpldm's encoder, exact, from the exported weights
    # and through a native folder again (--format dpldm)
    assert run_export("--checkpoint", str(hub), "--format", "dpldm", "--out", str(tmp_path / "native")) == 0
    c = load_ldm(tmp_path / "native")
    assert all(torch.equal(v, c.unet.state_dict()[k]) for k, v in sb.items())
    assert c.meta["privacy"] == PRIVACY


@torch.no_grad()
def test_import_without_dpldm_json_derives_the_architecture(exported, tmp_path):
    import shutil

    model, hub = exported
    bare = tmp_path / "bare"
    shutil.copytree(hub, bare)
    (bare / "dpldm.json").unlink()
    a, b = load_ldm(model), load_diffusers(bare)
    for k in ("unet", "autoencoder"):
        assert b.cfg.to_dict()[k] == a.cfg.to_dict()[k]
    assert b.cfg.diffusion.timesteps == 20 and b.cfg.data.image_size == 16 and b.meta["privacy"] is None
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 7]), torch.tensor([2, 5])
    assert torch.equal(a.ema.module(x, t, y), b.unet(x, t, y))


def test_export_refuses_what_diffusers_cannot_express(tmp_path):
    model = save_tiny(tmp_path / "tiny", TINY)  # widths 16/32/48: GroupNorms with 16 and 32 groups
    with pytest.raises(UserError, match=r"unet: its GroupNorms have different group counts \(16 for 16 channels, "
                                        r"32 for 32 channels\)"):
        run_export("--checkpoint", str(model), "--out", str(tmp_path / "hub"))
    for override, needle in (("unet.channel_mult=[2, 4]", "unet.channel_mult[0] = 2"),
                             ("unet.middle_attention=false", "unet.middle_attention = false")):
        m = save_tiny(tmp_path / needle[:10].replace(".", "_"), EXPORTABLE + [override])
        with pytest.raises(UserError, match=re.escape(needle)):
            export_diffusers(load_ldm(m), tmp_path / "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny", "unet_chann", "unet_middl"]  # nothing written


def test_export_is_atomic_and_never_overwrites_silently(exported, tmp_path, monkeypatch):
    import dpldm.interop.diffusers_folder as folder_mod

    model, _ = exported
    out = tmp_path / "hub"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        run_export("--checkpoint", str(model), "--out", str(out))
    with pytest.raises(UserError, match="was not written by dpldm"):  # the user's folder: never replaced
        run_export("--checkpoint", str(model), "--out", str(out), "--overwrite")
    assert (out / "mine.txt").read_text() == "keep"
    (out / "mine.txt").unlink()
    out.rmdir()
    assert run_export("--checkpoint", str(model), "--out", str(out)) == 0
    first = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    calls = {"n": 0}
    real = folder_mod.save_file

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(*a, **k)

    monkeypatch.setattr(folder_mod, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        run_export("--checkpoint", str(model), "--out", str(out), "--overwrite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub"]  # no temporary left behind
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == first  # old export whole
    monkeypatch.setattr(folder_mod, "save_file", real)
    assert run_export("--checkpoint", str(model), "--out", str(out), "--overwrite", "--no-ema") == 0
    assert json.loads((out / "dpldm.json").read_text())["weights"] == "raw"  # replaced by the new export
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub"]


def test_verify_flag_compares_with_diffusers(exported, tmp_path, capsys):
    model, _ = exported
    assert run_export("--checkpoint", str(model), "--out", str(tmp_path / "v"), "--verify", "--device", "cpu") == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if "verify on cpu" in ln][0]
    errs = [float(v) for v in re.findall(r"rel\. error ([0-9.e+-]+)", line)]
    assert len(errs) == 2 and max(errs) < 1e-5


def test_import_errors_name_the_file(exported, tmp_path):
    import shutil

    _, hub = exported
    bad = tmp_path / "bad"
    shutil.copytree(hub, bad)
    cfg = json.loads((bad / "unet" / "config.json").read_text())
    cfg["cross_attention_dim"] = 32
    (bad / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"unet/config.json: does not match .*dpldm.json: "
                                              r"unet.context_dim: 32 here, 24 in dpldm.json"):
        load_ldm(bad)
    shutil.rmtree(bad)
    shutil.copytree(hub, bad)
    w = bad / "vae" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"vae/diffusion_pytorch_model.safetensors: unreadable safetensors"):
        load_ldm(bad)
    shutil.rmtree(bad)
    shutil.copytree(hub, bad)
    (bad / "class_embedder" / "embedding.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"class_embedder/embedding.safetensors: missing"):
        load_ldm(bad)


def test_exported_sampling_matches_through_dpldm_sample(exported, tmp_path):
    """`dpldm sample` on the diffusers folder gives the same samples as on the original model."""
    from dpldm.cli import main
    from dpldm.eval.cli import load_images

    model, hub = exported
    for name, ck in (("a.npz", model), ("b.npz", hub)):
        assert main(["sample", "--checkpoint", str(ck), "--out", str(tmp_path / name), "--format", "npz",
                     "--per-class", "2", "--steps", "4", "--device", "cpu"]) == 0
    a, b = load_images(str(tmp_path / "a.npz"), "a")[0], load_images(str(tmp_path / "b.npz"), "b")[0]
    assert np.array_equal(a, b)
