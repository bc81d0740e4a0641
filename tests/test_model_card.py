"""The model card (README.md) of a native model folder: the numbers in its privacy table equal the
privacy report in the folder's meta.json, for the model a private DP run releases (`<run>/model`),
for `launch/train.py --consolidate`'s folder and after `dpldm export --format dpldm`; a run
declared not private and a public pretrained model get no DP claim. The card's privacy section is
the diffusers export's (dpldm.interop.diffusers_folder.privacy_table), word for word."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from dpldm.config import load_config
from dpldm.interop.diffusers_folder import privacy_table
from dpldm.models.ldm import LatentDiffusion, save_ldm
from dpldm.train.dp_finetune import FinetuneOptions, release_from_checkpoint, train

TINY = [
    "autoencoder.base_channels=8", "autoencoder.channel_mult=[1, 2]", "autoencoder.latent_channels=2",
    "unet.in_channels=2", "unet.model_channels=16", "unet.channel_mult=[1, 2]", "unet.attention_levels=[1]",
    "unet.num_heads=2", "unet.context_dim=16", "unet.num_classes=5", "data.image_size=16", "data.num_classes=3",
    "privacy.expected_batch_size=8", "privacy.steps=2", "privacy.epsilon=5.0", "privacy.delta=1e-3",
    "privacy.physical_batch_size=4", "privacy.max_grad_norm=0.5", "privacy.backend=\"torch\"",
    "train.finetune=\"attention:all\"", "train.wandb=false", "train.threads=1", "train.checkpoint_every=1",
]
ROWS = {"epsilon": "epsilon", "delta": "delta", "noise multiplier sigma": "noise_multiplier",
        "Poisson sample rate q": "sample_rate", "private examples N": "num_examples",
        "expected batch size q*N": "expected_batch_size", "noisy steps": "steps", "accountant": "accountant",
        "per-example clip norm C": "max_grad_norm", "sampling": "sampling", "trained modules": "finetune"}


def card_table(card: str) -> dict[str, str]:
    return dict(re.findall(r"^\| ([^|]+?) \| ([^|]+?) \|$", card, flags=re.M))


def assert_card_matches_meta(folder):
    card = (folder / "README.md").read_text()
    report = json.loads((folder / "meta.json").read_text())["privacy"]
    table = card_table(card)
    for label, key in ROWS.items():
        shown, value = table[label], report[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert math.isclose(float(shown), value, rel_tol=5e-6), (label, shown, value)  # 6 significant digits
        else:
            assert shown == str(value), (label, shown, value)
    assert privacy_table(report) in card  # the export's wording, not a second one
    assert f"{report['trainable_parameters']:,} of {report['total_unet_parameters']:,} UNet parameters" in card
    return card, report


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    rng = np.random.default_rng(0)
    np.savez(root / "private.npz", images=rng.integers(0, 256, size=(40, 16, 16), dtype=np.uint8),
             labels=np.arange(40) % 3)
    torch.manual_seed(0)
    public = save_ldm(root / "public", LatentDiffusion(load_config(None, TINY), scale_factor=0.7))
    out = {}
    for name, extra in (("private", []), ("seeded", ["train.deterministic=true", "train.not_private=true"])):
        cfg = load_config(None, TINY + [f"data.private={json.dumps(str(root / 'private.npz'))}", *extra])
        cfg.train.out_dir = str(root / name)
        res = train(cfg, FinetuneOptions(out=root / name, init=str(public), verbose=False))
        assert res["finished"]
        out[name] = root / name
    return root, public, out


def test_card_of_a_private_run_states_the_meta_json_report(runs):
    _, _, out = runs
    card, report = assert_card_matches_meta(out["private"] / "model")
    assert report["private"] is True and math.isfinite(report["epsilon"]) and report["steps"] == 2
    assert 0 < report["epsilon"] <= 5.0 + 1e-6
    assert "differentially private fine-tune" in card and "- differential-privacy" in card
    assert "No differential-privacy guarantee" not in card
    assert "dpldm sample --checkpoint THIS_FOLDER" in card and "dpldm export --checkpoint THIS_FOLDER" in card


def test_consolidated_and_reexported_folders_carry_the_same_card_numbers(runs, tmp_path):
    from dpldm.cli import main

    _, _, out = runs
    consolidated = release_from_checkpoint(out["private"], tmp_path / "consolidated")
    card, report = assert_card_matches_meta(consolidated)
    assert "released from step 2 (ema weights) by `launch/train.py --consolidate`" in card
    run_report = json.loads((out["private"] / "model" / "meta.json").read_text())["privacy"]
    assert report == run_report
    assert main(["export", "--checkpoint", str(out["private"]), "--format", "dpldm", "--out",
                 str(tmp_path / "native"), "--device", "cpu"]) == 0
    _, again = assert_card_matches_meta(tmp_path / "native")
    assert again == run_report


def test_no_dp_claim_for_a_run_declared_not_private_or_a_public_model(runs):
    _, public, out = runs
    card = (out["seeded"] / "model" / "README.md").read_text()
    report = json.loads((out["seeded"] / "model" / "meta.json").read_text())["privacy"]
    assert report["private"] is False and report["epsilon"] == math.inf
    assert "**No differential-privacy guarantee.**" in card and "declared not private" in card
    assert "| epsilon |" not in card and "- differential-privacy" not in card
    card = (public / "README.md").read_text()
    assert "**No differential-privacy guarantee.**" in card and "a public pretrained model" in card
    assert "| epsilon |" not in card and "differentially private" not in card


def test_pretrained_card_names_the_public_data(tmp_path):
    torch.manual_seed(0)
    folder = save_ldm(tmp_path / "m", LatentDiffusion(load_config(None, TINY)), {"public": "glyphs", "steps": 7})
    card = (folder / "README.md").read_text()
    assert "Pretrained by `dpldm pretrain-ldm` on the public data `glyphs` for 7 steps." in card
    assert "1x16x16 in [-1, 1]; 5 classes (labels 0..4) plus the\nnull class 5" in card


def test_a_readme_that_is_not_a_dpldm_card_is_never_replaced(tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "README.md").write_text("# my project\n")
    with pytest.warns(UserWarning, match="not a dpldm model card; left as it is"):
        save_ldm(folder, LatentDiffusion(load_config(None, TINY)))
    assert (folder / "README.md").read_text() == "# my project\n"
    save_ldm(tmp_path / "n", LatentDiffusion(load_config(None, TINY)))
    save_ldm(tmp_path / "n", LatentDiffusion(load_config(None, TINY)), {"public": "glyphs"})  # its own card: renewed
    assert "on the public data `glyphs`" in (tmp_path / "n" / "README.md").read_text()


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_consolidate_writes_only_a_new_or_empty_folder(runs, tmp_path):
    """`launch/train.py --consolidate RUN --out DIR`: the user's folder, the run's released model
    (the default RUN/model) and the run folder itself are refused, byte for byte unchanged."""
    from dpldm.errors import InputError

    _, _, out = runs
    run = out["private"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my own file")
    for dest, needle in ((mine, "already exists"), (run / "model", "already exists"), (run, "is the input")):
        before = _tree(dest)
        with pytest.raises(InputError, match=needle):
            release_from_checkpoint(run, dest)
        assert _tree(dest) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (release_from_checkpoint(run, empty) / "meta.json").is_file()
