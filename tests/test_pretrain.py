"""pretrain-ae / pretrain-ldm / sample through the CLI on a tiny config: they finish, resume
continues from the saved step and lands on the same weights as an uninterrupted run."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dpldm.checkpoint import list_step_checkpoints, load_checkpoint
from dpldm.cli import main
from dpldm.models.ldm import load_autoencoder, load_ldm

TINY = [
    "autoencoder.base_channels=8", "autoencoder.channel_mult=[1,2,2]", "autoencoder.latent_channels=2",
    "unet.in_channels=2", "unet.model_channels=8", "unet.num_heads=2", "unet.context_dim=8",
    "diffusion.timesteps=20", "diffusion.sample_steps=2",
    "data.public_size=96",
    "train.batch_size=6", "train.ae_batch_size=6", "train.checkpoint_every=2", "train.log_every=1",
    "train.threads=1", "train.warmup_steps=2", "train.keep_checkpoints=5",
]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cli(*args: str, steps: dict[str, int] | None = None) -> int:
    sets = TINY + [f"train.{k}={v}" for k, v in (steps or {}).items()]
    argv = [args[0]] + [a for s in sets for a in ("--set", s)] + list(args[1:])  # the test's own --set last
    return main(argv)


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(folder)[0]


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 4-step AE and LDM run, and the same runs cut at step 2 and resumed."""
    root = tmp_path_factory.mktemp("pretrain")
    torch.set_num_threads(1)
    assert cli("pretrain-ae", "--out", str(root / "ae"), "--no-wandb", steps={"ae_steps": 4}) == 0
    assert cli("pretrain-ae", "--out", str(root / "ae_cut"), "--no-wandb", steps={"ae_steps": 2}) == 0
    assert cli("pretrain-ae", "--out", str(root / "ae_cut"), "--no-wandb", "--resume", steps={"ae_steps": 4}) == 0
    ae = str(root / "ae" / "model")
    assert cli("pretrain-ldm", "--autoencoder", ae, "--out", str(root / "ldm"), "--no-wandb", steps={"steps": 4}) == 0
    assert cli("pretrain-ldm", "--autoencoder", ae, "--out", str(root / "ldm_cut"), "--no-wandb", steps={"steps": 2}) == 0
    assert cli("pretrain-ldm", "--autoencoder", ae, "--out", str(root / "ldm_cut"), "--no-wandb", "--resume",
               steps={"steps": 4}) == 0
    # the cosine learning-rate decay: an uninterrupted run, and one stopped by --max-steps and resumed
    cos = ("--set", "train.lr_decay=cosine")
    assert cli("pretrain-ldm", "--autoencoder", ae, "--out", str(root / "ldm_cos"), "--no-wandb", *cos,
               steps={"steps": 4}) == 0
    assert cli("pretrain-ldm", "--autoencoder", ae, "--out", str(root / "ldm_cos_cut"), "--no-wandb", *cos,
               "--max-steps", "2", steps={"steps": 4}) == 0
    assert cli("pretrain-ldm", "--autoencoder", ae, "--out", str(root / "ldm_cos_cut"), "--no-wandb", *cos,
               "--resume", steps={"steps": 4}) == 0
    return root


def cosine_reference(step: int, warmup: int, total: int) -> float:
    """The multiplier of 0-based `step`, written out independently of dpldm.train.common.lr_factor."""
    if step < warmup:
        return (step + 1) / warmup
    return (1 + np.cos(np.pi * (step - warmup) / (total - warmup))) / 2


def test_lr_factor_warms_up_then_stays_or_follows_half_a_cosine_to_zero():
    from dpldm.train.common import lr_factor

    for warmup, total in ((0, 10), (3, 10), (100, 4000)):
        for step in sorted({0, 1, warmup - 1, warmup, warmup + 1, (warmup + total) // 2, total - 1, total}):
            if step < 0:
                continue
            assert lr_factor(step, warmup, total, "constant") == (min(1.0, (step + 1) / warmup) if warmup else 1.0)
            assert lr_factor(step, warmup, total, "cosine") == pytest.approx(cosine_reference(step, warmup, total),
                                                                              abs=1e-12)
    assert lr_factor(2, 3, 10, "cosine") == 1.0 and lr_factor(3, 3, 10, "cosine") == 1.0  # warm-up ends at 1
    assert lr_factor(10, 3, 10, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(50, 3, 10, "cosine") == pytest.approx(0.0, abs=1e-12)  # past the end: stays at 0
    with pytest.raises(ValueError, match="constant|cosine"):
        lr_factor(5, 0, 10, "linear")


def test_pretrain_ldm_cosine_decay_logs_the_closed_form_lr_and_resumes_exactly(runs):
    lr = 1e-3  # TrainConfig's default: TINY does not set it
    logged = [json.loads(line) for line in (runs / "ldm_cos" / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r["lr"] for r in logged if "lr" in r}
    # after `done` optimizer steps the scheduler holds the multiplier of 0-based step `done` (warm-up 2, 4 steps)
    assert sorted(by_step) == [1, 2, 3, 4]
    for done, value in by_step.items():
        assert value == pytest.approx(lr * cosine_reference(done, 2, 4), abs=1e-15), done
    assert by_step[3] == pytest.approx(lr / 2) and by_step[4] == pytest.approx(0.0, abs=1e-15)
    a, b = tensors_of(runs / "ldm_cos" / "model"), tensors_of(runs / "ldm_cos_cut" / "model")
    assert_same_tensors(a, b)  # stopped by --max-steps at step 2 and resumed: the same weights
    const = tensors_of(runs / "ldm" / "model")
    assert not torch.equal(a["unet.out.2.weight"], const["unet.out.2.weight"])  # the decay changed the training
    saved = json.loads((runs / "ldm_cos" / "config.json").read_text())
    assert saved["train"]["lr_decay"] == "cosine"


def test_pretrain_ae_finishes_and_resume_matches_uninterrupted(runs, capsys):
    ae, cfg, meta = load_autoencoder(runs / "ae")
    assert cfg.autoencoder.base_channels == 8 and meta["kind"] == "autoencoder" and meta["steps"] == 4
    assert np.isfinite(meta["heldout_mse"])
    assert [p.name for p in list_step_checkpoints(runs / "ae_cut")] == ["step_00000002", "step_00000004"]
    assert_same_tensors(tensors_of(runs / "ae" / "model"), tensors_of(runs / "ae_cut" / "model"))
    cut_meta = load_checkpoint(runs / "ae_cut" / "model")[1]
    assert cut_meta["last_train_stats"] == meta["last_train_stats"] and cut_meta["train_wall_s"] > 0
    saved = json.loads((runs / "ae" / "config.json").read_text())
    assert saved["train"]["ae_steps"] == 4 and saved["train"]["wandb"] is False


def test_pretrain_ldm_finishes_and_resume_matches_uninterrupted(runs):
    ldm = load_ldm(runs / "ldm")
    assert ldm.meta["steps"] == 4 and ldm.ema.num_updates == 4
    assert 0 < ldm.scale_factor < 1e6
    assert [p.name for p in list_step_checkpoints(runs / "ldm_cut")] == ["step_00000002", "step_00000004"]
    a, b = tensors_of(runs / "ldm" / "model"), tensors_of(runs / "ldm_cut" / "model")
    assert_same_tensors(a, b)
    cut = load_ldm(runs / "ldm_cut")
    assert cut.meta["last_loss"] == ldm.meta["last_loss"] and np.isfinite(ldm.meta["last_loss"])
    assert cut.meta["train_wall_s"] > 0
    assert not torch.equal(a["unet.out.2.weight"], a["ema.out.2.weight"])  # EMA is its own average
    assert (runs / "ldm" / "samples.png").is_file()


def test_resume_refusals_and_config_errors(runs, tmp_path, capsys):
    # an existing run folder is not overwritten without --resume
    assert cli("pretrain-ae", "--out", str(runs / "ae"), "--no-wandb", steps={"ae_steps": 4}) == 2
    assert "--resume" in capsys.readouterr().err
    # resuming with a different model is refused, naming the key
    assert cli("pretrain-ae", "--out", str(runs / "ae_cut"), "--no-wandb", "--resume",
               "--set", "autoencoder.latent_channels=3", "--set", "unet.in_channels=3", steps={"ae_steps": 6}) == 2
    assert "autoencoder.latent_channels" in capsys.readouterr().err
    assert cli("pretrain-ae", "--out", str(tmp_path / "x"), "--set", "unet.model_channels=12") == 2
    assert "unet.model_channels" in capsys.readouterr().err
    assert cli("pretrain-ldm", "--autoencoder", str(runs / "ae"), "--out", str(tmp_path / "y"),
               "--set", "autoencoder.base_channels=16") == 2
    assert "autoencoder.base_channels" in capsys.readouterr().err
    ldm_args = ("pretrain-ldm", "--autoencoder", str(runs / "ae"), "--out", str(runs / "ldm_cut"), "--no-wandb", "--resume")
    assert cli(*ldm_args, "--set", "diffusion.timesteps=30", steps={"steps": 4}) == 2
    assert "diffusion.timesteps" in capsys.readouterr().err
    # sampling-only settings may change on resume; a finished run just re-saves its model
    before = tensors_of(runs / "ldm_cut" / "model")
    assert cli(*ldm_args, "--set", "diffusion.guidance_scale=2.5", steps={"steps": 4}) == 0
    assert load_ldm(runs / "ldm_cut").cfg.diffusion.guidance_scale == 2.5
    assert_same_tensors(before, tensors_of(runs / "ldm_cut" / "model"))


def test_sample_command_writes_one_row_per_class(runs, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(runs / "ldm"), "--classes", "0,3", "--n", "3", "--out", str(out),
                 "--steps", "2", "--upscale", "1", "--guidance", "2.0"]) == 0
    img = np.asarray(Image.open(out))
    assert img.shape == (2 * (32 + 2) + 2, 3 * (32 + 2) + 2)  # 2 rows (classes) x 3 columns, 2 px padding
    assert main(["sample", "--checkpoint", str(runs / "ldm"), "--classes", "0,99", "--out", str(out)]) == 2
    assert "99" in capsys.readouterr().err


def test_wandb_offline_files_go_to_the_run_folder_unless_the_user_says_otherwise(tmp_path, monkeypatch):
    """Unset WANDB_DIR: wandb's offline files stay inside the run folder. A WANDB_DIR the user set
    is respected (issue 13: wandb used to ignore it)."""
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    assert cli("pretrain-ae", "--out", str(run), steps={"ae_steps": 1}) == 0
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and any(offline[0].rglob("*.wandb"))
    mine = tmp_path / "elsewhere"
    mine.mkdir()
    monkeypatch.setenv("WANDB_DIR", str(mine))
    assert cli("pretrain-ae", "--out", str(tmp_path / "run2"), steps={"ae_steps": 1}) == 0
    assert list((mine / "wandb").glob("offline-run-*")) and not (tmp_path / "run2" / "wandb").exists()


def test_shipped_public_model_loads_and_denoises_glyphs():
    from dpldm.config import load_config
    from dpldm.data.codec import images_to_tensor
    from dpldm.data.glyphs import render_glyphs
    from dpldm.models.ldm import load_public_model, public_model_path

    assert sum(f.stat().st_size for f in public_model_path().iterdir()) <= 20_000_000
    ldm = load_public_model()
    for recipe in ("glyphs_pretrain.toml", "demo.toml"):  # the pretraining recipe and the DP demo's
        demo = load_config(Path(__file__).resolve().parents[1] / "configs" / recipe)
        assert ldm.cfg.autoencoder == demo.autoencoder and ldm.cfg.unet == demo.unet, recipe
        for key in ("schedule", "timesteps", "beta_start", "beta_end"):
            assert getattr(ldm.cfg.diffusion, key) == getattr(demo.diffusion, key), key
    assert ldm.meta["steps"] == ldm.ema.num_updates
    images, labels = render_glyphs(128, seed=123)
    x, y = images_to_tensor(images), torch.from_numpy(labels)
    with torch.no_grad():
        assert (ldm.ae.decode(ldm.ae.encode(x).mode()) - x).pow(2).mean() < 0.02
        z = ldm.encode(x)  # scaled latents: unit variance by construction of scale_factor
        assert 0.8 < z.std().item() < 1.25
        g = torch.Generator().manual_seed(0)
        t, noise = torch.randint(100, 900, (128,), generator=g), torch.randn(z.shape, generator=g)
        x_t = ldm.schedule.q_sample(z, t, noise)
        unet = ldm.sampling_unet()
        right = (unet(x_t, t, y) - noise).pow(2).mean().item()
        wrong = (unet(x_t, t, (y + 7) % 36) - noise).pow(2).mean().item()
    assert right < 0.2  # predicting eps = 0 scores 1.0
    assert right < 0.9 * wrong  # the class context matters


# -- public data from shards (issue 11, item 8) and --device (item 5) ----------------------------------

def _public_shards(root: Path, n: int, shard_size: int) -> tuple[Path, np.ndarray, np.ndarray]:
    """An image shard folder (32x32 grey, 36 classes) whose images carry their index (index_of)."""
    from dpldm.data.shards import import_arrays
    from dpldm.data.testing import indexed_images

    x, y, meta = indexed_images(n, (32, 32), num_classes=36, seed=5)
    import_arrays(x, y, meta, root / "public", shard_size=shard_size)
    return root / "public", x, y


def test_public_stream_yields_the_shards_contents_and_resumes_at_a_position(tmp_path):
    from dpldm.data.codec import images_to_tensor
    from dpldm.data.public import PublicStream
    from dpldm.data.testing import index_of

    folder, x, y = _public_shards(tmp_path, 20, 7)
    kw = dict(batch_size=6, channels=1, image_size=32, num_classes=36, seed=3, shuffle_buffer=10)
    s = PublicStream(folder, **kw)
    batches = [s.next() for _ in range(7)]  # 3 full batches per epoch (18 of 20), then the next epoch
    assert [b[0].shape for b in batches] == [(6, 1, 32, 32)] * 7 and s.position == (2, 1)
    epoch0 = np.concatenate([index_of(b[0]) for b in batches[:3]])
    assert len(set(epoch0)) == 18 and set(epoch0) <= set(range(20))  # each example at most once per epoch
    for xb, yb in batches:  # every image and label is the folder's own, bit for bit
        i = index_of(xb)
        torch.testing.assert_close(xb, images_to_tensor(x[i]), rtol=0, atol=0)
        assert yb.tolist() == y[i].tolist()
    assert not np.array_equal(epoch0, np.concatenate([index_of(b[0]) for b in batches[3:6]]))  # reshuffled
    resumed = PublicStream(folder, position=(1, 2), **kw)  # after 5 batches: epoch 1, 2 taken
    for want in batches[5:]:
        got = resumed.next()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    rgb = PublicStream(folder, **{**kw, "channels": 3}).next()[0]  # grey shards for an RGB recipe: replicated
    assert rgb.shape == (6, 3, 32, 32) and torch.equal(rgb[:, 0], rgb[:, 2])


@pytest.fixture(scope="module")
def shard_runs(tmp_path_factory):
    """pretrain-ae and pretrain-ldm on a streamed shard folder: uninterrupted, and cut + resumed
    across an epoch boundary (20 examples, batch 6: 3 batches per epoch)."""
    root = tmp_path_factory.mktemp("pretrain_shards")
    torch.set_num_threads(1)
    folder, _, _ = _public_shards(root, 20, 7)
    pub = ["--set", f"data.public={json.dumps(str(folder))}", "--no-wandb", "--device", "cpu"]
    assert cli("pretrain-ae", "--out", str(root / "ae"), *pub, steps={"ae_steps": 8}) == 0
    assert cli("pretrain-ae", "--out", str(root / "ae_cut"), *pub, steps={"ae_steps": 4}) == 0
    assert cli("pretrain-ae", "--out", str(root / "ae_cut"), *pub, "--resume", steps={"ae_steps": 8}) == 0
    ae = str(root / "ae" / "model")
    assert cli("pretrain-ldm", "--autoencoder", ae, "--out", str(root / "ldm"), *pub, steps={"steps": 5}) == 0
    assert cli("pretrain-ldm", "--autoencoder", ae, "--out", str(root / "ldm_cut"), *pub, steps={"steps": 4}) == 0
    assert cli("pretrain-ldm", "--autoencoder", ae, "--out", str(root / "ldm_cut"), *pub, "--resume",
               steps={"steps": 5}) == 0
    return root, folder


def test_pretraining_streams_shards_and_resumes_exactly(shard_runs):
    root, folder = shard_runs
    meta = load_checkpoint(root / "ae_cut" / "checkpoints" / "step_00000004")[1]
    assert meta["public_stream"] == [1, 1]  # 4 batches taken: epoch 0 (3) + 1 of epoch 1
    assert_same_tensors(tensors_of(root / "ae" / "model"), tensors_of(root / "ae_cut" / "model"))
    assert_same_tensors(tensors_of(root / "ldm" / "model"), tensors_of(root / "ldm_cut" / "model"))
    ae_meta = load_checkpoint(root / "ae" / "model")[1]
    assert ae_meta["heldout_mse"] is None and np.isfinite(ae_meta["train_first_20_mse"])
    ldm = load_ldm(root / "ldm")
    assert ldm.meta["public"] == str(folder) and 0 < ldm.scale_factor < 1e6 and (root / "ldm" / "samples.png").is_file()


def test_scale_factor_from_streamed_shards_matches_the_in_memory_computation(shard_runs):
    """scale_factor of a streamed run = the in-memory formula on the folder's images."""
    from dpldm.data.manifest import open_shard_folder
    from dpldm.data.shards import read_shard_arrays
    from dpldm.data.codec import images_to_tensor
    from dpldm.train.pretrain_ldm import encode_moments, latent_scale_factor

    root, folder = shard_runs
    f = open_shard_folder(folder)
    x = images_to_tensor(np.concatenate([read_shard_arrays(f, k)[0] for k in range(len(f.shards))]))
    ae, _, _ = load_autoencoder(root / "ae")
    want = latent_scale_factor(*encode_moments(ae, x), seed=0)
    assert load_ldm(root / "ldm").scale_factor == pytest.approx(want, rel=1e-6)


def test_autoencoder_loss_decreases_on_streamed_shards_as_in_memory(tmp_path):
    """Same kind of result as the in-memory source: glyphs imported as shards and streamed lower the
    loss about as much as the same glyphs held in memory."""
    from dpldm.utils.logging import read_metrics

    assert main(["data", "import", "--source", "glyphs", "--num", "96", "--out", str(tmp_path / "glyphs"),
                 "--shard-size", "32"]) == 0
    drops = {}
    for name, public in (("shards", str(tmp_path / "glyphs")), ("memory", "glyphs")):
        out = tmp_path / name
        assert cli("pretrain-ae", "--out", str(out), "--set", f"data.public={json.dumps(public)}", "--no-wandb",
                   "--set", "train.ae_lr=3e-3", steps={"ae_steps": 40}) == 0
        losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
        assert len(losses) == 40
        drops[name] = np.mean(losses[-5:]) / np.mean(losses[:5])
    assert drops["shards"] < 0.8 and drops["memory"] < 0.8, drops
    assert abs(drops["shards"] - drops["memory"]) < 0.15, drops


def test_pretrain_device_flag_and_bad_public_shards(tmp_path, capsys):
    from dpldm.data.testing import plant_shard

    folder, _, _ = _public_shards(tmp_path, 20, 10)
    pub = ["--set", f"data.public={json.dumps(str(folder))}", "--no-wandb"]
    assert cli("pretrain-ae", "--out", str(tmp_path / "a"), *pub, "--device", "cuda:99", steps={"ae_steps": 1}) == 2
    err = capsys.readouterr().err
    assert "--device=cuda:99" in err and not (tmp_path / "a").exists()
    assert cli("pretrain-ae", "--out", str(tmp_path / "b"), *pub, "--set", 'train.device="cuda:99"',
               steps={"ae_steps": 1}) == 2
    assert "train.device=cuda:99" in capsys.readouterr().err
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(folder, bad)
    plant_shard(bad, 1, [{"__key__": "00000010", "npy": b"garbage", "cls": b"1"}], reindex=True)
    assert cli("pretrain-ae", "--out", str(tmp_path / "c"), "--set", f"data.public={json.dumps(str(bad))}",
               "--no-wandb", steps={"ae_steps": 3}) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dpldm pretrain-ae: error: ") and "shard-000001.tar [sample '00000010']" in err[-1]
    assert not (tmp_path / "c" / "model").exists() and not list_step_checkpoints(tmp_path / "c")
