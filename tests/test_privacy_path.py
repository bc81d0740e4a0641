"""Nothing reaches a private run that the guarantee does not cover (issue 17, "Privacy path"):

1. DP fine-tuning runs the whole UNet in eval mode: with `unet.dropout = 0.3` the neighbouring-dataset
   property holds on the trainer's real path (adding one example moves the clipped sum by exactly its
   own clipped gradient, <= C); the negative control (the same run with the UNet put back in train
   mode and the engine's check switched off) breaks the bound; the engine refuses train-mode modules
   that draw from the global RNG, at set-up and at every chunk.
2. Modules that write state in forward are refused: EmbeddingBag(max_norm) (frozen or trainable), and
   generically the set-up probe (one forward+backward of a PUBLIC batch) refuses any changed parameter
   or buffer, or a draw from the global RNG -- also through the trainer.
3. `--random-init` seeds torch from a secret OS seed in a private run, from train.seed only when seeded.
4. A private run logs no timing (metrics.jsonl, stdout, progress bar, released meta); wandb runs
   without system metrics and console capture; a --not-private run keeps its timings.
5. A sample grid is written only at a step already checkpointed (checkpoint, then grid).
6. An explicit --resume refuses a missing or checkpoint-less run folder; launch/train.py takes a plain
   --resume as well as --resume auto|never, and the stop message says how to resume what was run.
7. The kernel selector reads free memory before any private data, measures on the public probe batch
   only, and is frozen before the first private chunk is loaded.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dpldm.checkpoint import list_step_checkpoints
from dpldm.config import load_config
from dpldm.errors import InputError, RunFolderError
from dpldm.privacy.engine import BookKeepingEngine, UnsupportedLayerError
from dpldm.train.dp_finetune import FinetuneOptions, Trainer, load_init, resume_hint, train
from dpldm.utils.logging import TIMING_KEYS, RunLogger, read_metrics
from tiny_ldm import TINY, save_tiny

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "dist_scripts"))
import neighbours  # noqa: E402

RUN = ["privacy.expected_batch_size=8", "privacy.steps=4", "privacy.epsilon=5.0", "privacy.delta=1e-3",
       "privacy.physical_batch_size=3", "privacy.max_grad_norm=0.5", "train.finetune=\"attention:all\"",
       "train.lr=1e-3", "train.threads=1", "train.log_every=1", "train.ema_decay=0.5",
       "diffusion.timesteps_per_example=2"]
SEEDED = ["train.deterministic=true", "train.not_private=true"]
REL = 1e-5


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("privacy_path")
    rng = np.random.default_rng(0)
    np.savez(root / "private.npz", images=rng.integers(0, 256, size=(40, 16, 16), dtype=np.uint8),
             labels=np.arange(40) % 3)
    return {"root": root, "public": save_tiny(root / "public"), "npz": root / "private.npz"}


def cfg_for(w, out: Path, *extra: str):
    return load_config(None, TINY + RUN + [f"data.private={json.dumps(str(w['npz']))}",
                                           f"train.out_dir={json.dumps(str(out))}", *extra])


# -- 1. dropout: eval mode on the real path; refusals in the engine --------------------------------------

def _dropout_public_model(root: Path) -> Path:
    """The shipped public model, saved with unet.dropout = 0.3 (same weights): a recipe with dropout."""
    from dpldm.models.ldm import load_public_model, save_ldm

    ldm = load_public_model()
    ldm.cfg.unet.dropout = 0.3
    return save_ldm(root / "public_dropout", ldm)


def _neighbour_rows(root: Path, cases, extra, hook=None) -> list[dict]:
    from dpldm.parallel.dist import single_process_context

    ctx = single_process_context()
    rows = []
    for N, P, q in cases:
        small, big = neighbours.write_private(root, N), neighbours.write_private(root, N + 1)
        tag = f"{N}_{P}_{q}_{'ctl' if hook else 'real'}"
        s0, sample0, t0 = neighbours.step_sum(neighbours.demo_cfg(small, P, q, root / f"a_{tag}", extra), ctx, hook)
        s1, sample1, t1 = neighbours.step_sum(neighbours.demo_cfg(big, P, q, root / f"b_{tag}", extra), ctx, hook)
        diff = neighbours.flat(s1) - neighbours.flat(s0)
        row = {"N": N, "C": t1.cfg.privacy.max_grad_norm, "diff_norm": float(diff.norm()),
               "sampled": bool((sample1 == N).any()), "samples_agree": sample1[sample1 < N].tolist() == sample0.tolist(),
               "dropout_modules": sum(isinstance(m, nn.Dropout) and m.p == 0.3 for m in t1.model.module.modules()),
               "training": [n for n, m in t1.model.module.named_modules() if m.training]}
        if row["sampled"] and hook is None:
            ref = neighbours.own_clipped_gradient(t1, N)  # plain UNet without dropout, one autograd gradient, clip
            row["own_norm"], row["diff_minus_own"] = float(ref.norm()), float((diff - ref).norm())
        rows.append(row)
    return rows


def test_neighbouring_bound_holds_with_unet_dropout(tmp_path):
    """unet.dropout = 0.3 through the trainer's real path: the UNet runs in eval mode (every module),
    and adding one example moves the step's clipped sum by exactly its own clipped gradient."""
    extra = ["unet.dropout=0.3", f"train.init_checkpoint={json.dumps(str(_dropout_public_model(tmp_path)))}"]
    rows = _neighbour_rows(tmp_path, [(12, 5, 1.0), (61, 16, 0.5)], extra)
    assert any(r["sampled"] for r in rows)
    for r in rows:
        assert r["dropout_modules"] > 0, r  # the model really has p = 0.3 dropout layers
        assert r["training"] == [], r  # ... and the trainer runs all of it in eval mode
        assert r["samples_agree"], r
        assert r["diff_norm"] <= r["C"] * (1 + REL), r
        if r["sampled"]:
            assert r["diff_norm"] > 0.1 * r["C"], r
            assert r["diff_minus_own"] <= REL * r["C"], r
        else:
            assert r["diff_norm"] <= REL * r["C"], r


def test_negative_control_train_mode_dropout_breaks_the_bound(tmp_path, monkeypatch):
    """The measurement has power: the same dropout run with the UNet in train mode (global-RNG masks
    by row position; the engine's refusal switched off, the global RNG seeded alike for D and D')
    moves the clipped sum by several C when one example is added."""
    monkeypatch.setattr(BookKeepingEngine, "_check_randomness", lambda self, when: None)

    def train_mode(trainer):
        trainer.model.module.train()
        torch.manual_seed(0)
        return trainer.dp.loss_fn

    extra = ["unet.dropout=0.3", f"train.init_checkpoint={json.dumps(str(_dropout_public_model(tmp_path)))}"]
    rows = _neighbour_rows(tmp_path, [(12, 5, 1.0)], extra, hook=train_mode)
    assert rows[0]["sampled"] and rows[0]["diff_norm"] > 1.5 * rows[0]["C"], rows


class _Head(nn.Module):
    """A trainable Linear followed by `extra` (frozen): (B, 4) -> (B, 4)."""

    def __init__(self, extra: nn.Module) -> None:
        super().__init__()
        self.lin, self.extra = nn.Linear(4, 4), extra

    def forward(self, x):
        return self.extra(self.lin(x))


def _sq_loss(model, x):
    return model(x).pow(2).sum(1)  # (B,)


class _Seq(nn.Module):
    """For modules that need (B, T, d) input (MultiheadAttention): self-attention, then a trainable Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.attn, self.lin = nn.MultiheadAttention(4, 2, dropout=0.2, batch_first=True), nn.Linear(4, 4)
        self.attn.requires_grad_(False)

    def forward(self, x):  # (B, 4) -> (B, 4)
        s = x.unsqueeze(1).repeat(1, 3, 1)  # (B, 3, 4)
        return self.lin(self.attn(s, s, s, need_weights=False)[0].mean(1))


RANDOM = {
    "Dropout": lambda: _Head(nn.Dropout(0.3)), "Dropout1d": lambda: _Head(nn.Dropout1d(0.3)),
    "Dropout2d": lambda: _Head(nn.Dropout2d(0.3)), "Dropout3d": lambda: _Head(nn.Dropout3d(0.3)),
    "AlphaDropout": lambda: _Head(nn.AlphaDropout(0.3)), "FeatureAlphaDropout": lambda: _Head(nn.FeatureAlphaDropout(0.3)),
    "RReLU": lambda: _Head(nn.RReLU()), "MultiheadAttention": _Seq,
}


@pytest.mark.filterwarnings("ignore:dropout")  # Dropout2d/3d on (B, 4): torch's deprecation note, same masks
@pytest.mark.parametrize("kind", sorted(RANDOM))
def test_engine_refuses_train_mode_global_rng_modules_at_set_up_and_per_chunk(kind):
    model = RANDOM[kind]()
    with pytest.raises(UnsupportedLayerError, match=r"is in training mode \(at engine set-up\).*global random "
                                                    r"generator.*eval mode"):
        BookKeepingEngine(model, 1.0)
    engine = BookKeepingEngine(model.eval(), 1.0)  # eval mode: accepted, and the probe finds nothing
    engine.probe(_sq_loss, torch.randn(3, 4))
    model.train()  # switched back after set-up: refused at the next chunk, before any forward
    with pytest.raises(UnsupportedLayerError, match=r"in training mode \(when computing clipped sums"):
        engine.clipped_sums(_sq_loss, torch.randn(3, 4))
    assert all(p.grad is None for p in model.parameters())


def test_engine_accepts_zero_probability_dropout_in_train_mode():
    """p = 0 draws nothing (the UNet's default dropout = 0.0 layers)."""
    model = _Head(nn.Dropout(0.0)).train()
    BookKeepingEngine(model, 1.0).probe(_sq_loss, torch.randn(3, 4))


# -- 2. modules that write state in forward ----------------------------------------------------------------

class _Bag(nn.Module):
    def __init__(self, trainable: bool) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(6, 4, max_norm=0.5, mode="mean").requires_grad_(trainable)
        self.lin = nn.Linear(4, 1)

    def forward(self, idx):  # (B, 2) -> (B, 1)
        return self.lin(self.bag(idx))


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_embedding_bag_max_norm_refused(trainable):
    model = _Bag(trainable)
    with torch.no_grad():
        model.bag.weight.mul_(10)
    before = model.bag.weight.detach().clone()
    model(torch.tensor([[1, 3]]))
    changed = (model.bag.weight.detach() != before).any(dim=1)
    assert changed.tolist() == [False, True, False, True, False, False]  # the leak: the rows the batch used
    state = "trainable" if trainable else "frozen"
    with pytest.raises(UnsupportedLayerError, match=rf"embedding bag 'bag' \({state}\) has max_norm=0.5"):
        BookKeepingEngine(model, 1.0)
    model.bag.max_norm = None
    if trainable:  # without max_norm a trainable bag still has no per-example rule: refused for that reason
        with pytest.raises(UnsupportedLayerError, match="no per-example clipping rule"):
            BookKeepingEngine(model, 1.0)
    else:
        BookKeepingEngine(model, 1.0)


class _Counter(nn.Module):
    """Writes a buffer in forward (a running count of rows: private data leaves without noise)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        self.seen += x.shape[0]
        return x


class _Renorm(nn.Module):
    """Renormalises its frozen weight in place from the batch (what max_norm does, by hand)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4), requires_grad=False)

    def forward(self, x):
        with torch.no_grad():
            self.weight.mul_(1.0 / (1.0 + x.abs().mean()))
        return x * self.weight


class _Noisy(nn.Module):
    """Draws from the global RNG in forward, whatever its mode."""

    def forward(self, x):
        return x + 0.01 * torch.randn_like(x)


@pytest.mark.parametrize("extra, needle", [
    (_Counter, r"changed the model's tensor 'extra.seen'"),
    (_Renorm, r"changed the model's tensor 'extra.weight'"),
    (_Noisy, r"drew from torch's global random generator \(CPU generator\)"),
], ids=["buffer", "parameter", "global-rng"])
def test_probe_refuses_forward_that_writes_state_or_draws_globally(extra, needle):
    model = _Head(extra())
    engine = BookKeepingEngine(model, 1.0)  # nothing to see by type: only running it shows it
    with pytest.raises(UnsupportedLayerError, match=needle):
        engine.probe(_sq_loss, torch.zeros(2, 4))
    BookKeepingEngine(_Head(nn.Identity()), 1.0).probe(_sq_loss, torch.zeros(2, 4))  # a clean model passes


def test_trainer_probe_refuses_a_unet_that_writes_state(world, monkeypatch):
    """Through the trainer: a UNet whose forward changes a frozen tensor is refused at set-up, naming
    it, before any private chunk; the run folder is left as it was (removed: this run made it)."""
    from dpldm.models.unet import UNet

    real = UNet.forward

    def leaky(self, x, t, y):
        with torch.no_grad():
            self.input_blocks[0][0].weight.add_(1e-3)  # a frozen conv, moved by every forward
        return real(self, x, t, y)

    monkeypatch.setattr(UNet, "forward", leaky)
    loads = []
    monkeypatch.setattr(Trainer, "load", lambda self, idx: loads.append(idx) or pytest.fail("private chunk loaded"))
    out = world["root"] / "leaky"
    cfg = cfg_for(world, out, "privacy.backend=\"torch\"", "train.wandb=false")
    with pytest.raises(UnsupportedLayerError, match=r"changed the model's tensor 'input_blocks.0.0.weight'"):
        train(cfg, FinetuneOptions(out=out, init=str(world["public"])))
    assert not loads and not out.exists()


# -- 3. --random-init ----------------------------------------------------------------------------------------

def test_random_init_is_seeded_secretly_in_a_private_run(world):
    """A private run's random init comes from the OS (two runs differ, neither is torch.manual_seed(
    train.seed)); a seeded (not private) run is reproducible from train.seed."""
    from dpldm.models.ldm import LatentDiffusion
    from dpldm.train.dp_finetune import state_sha256

    root = world["root"] / "random_init"

    def init_hash(name, *extra):
        cfg = cfg_for(world, root / name, "train.seed=7", *extra)
        (root / name).mkdir(parents=True)
        info, _ = load_init(cfg, FinetuneOptions(out=root / name, random_init=True), root / name)
        return info.ae_sha256, cfg

    a, cfg = init_hash("private_a")
    b, _ = init_hash("private_b")
    torch.manual_seed(7)
    public_seed = state_sha256(LatentDiffusion(cfg).ae.state_dict())
    assert a != b and public_seed not in (a, b)
    s1, _ = init_hash("seeded_a", *SEEDED)
    s2, _ = init_hash("seeded_b", *SEEDED)
    assert s1 == s2 == public_seed


# -- 4, 5, 7: one tiny private run, watched ----------------------------------------------------------------

@pytest.fixture(scope="module")
def private_run(world):
    """A private run (secret seeds, wandb offline, kernels chosen by measurement) with sample grids every
    2 steps and checkpoints every 3; records the order of set-up, measurement, checkpoints, grids and
    private loads, and everything printed."""
    import wandb

    import dpldm.train.private_data as private_data
    from dpldm.kernels.selection import KernelSelector

    out = world["root"] / "private_run"
    events: list[tuple] = []
    wandb_kwargs: dict = {}
    with pytest.MonkeyPatch.context() as mp:
        for var in ("WANDB_X_DISABLE_STATS", "WANDB_CONSOLE", "WANDB_DIR"):
            mp.delenv(var, raising=False)

        def spy(obj, name, tag, arg=lambda *a: ()):
            real = getattr(obj, name)

            def wrapper(*a, **k):
                events.append((tag, *arg(*a)))
                return real(*a, **k)
            mp.setattr(obj, name, wrapper)

        spy(KernelSelector, "pin_budget", "pin_budget")
        spy(private_data, "open_private_data", "open_private_data")
        spy(KernelSelector, "_measure", "measure", lambda self, key, *a: (key,))
        spy(KernelSelector, "freeze", "freeze")
        spy(Trainer, "load", "load")
        spy(Trainer, "_checkpoint", "checkpoint", lambda self: (self.dp.step_index,))
        spy(Trainer, "_sample_grid", "grid", lambda self, step: (step,))
        real_init = wandb.init
        mp.setattr(wandb, "init", lambda **k: wandb_kwargs.update(k) or real_init(**k))
        cfg = cfg_for(world, out, "privacy.backend=\"auto\"", "train.wandb=true", "train.sample_every=2",
                      "train.checkpoint_every=3", "train.keep_checkpoints=10")
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            result = train(cfg, FinetuneOptions(out=out, init=str(world["public"])))
    return {"out": out, "events": events, "result": result, "stdout": stdout.getvalue(), "stderr": stderr.getvalue(),
            "wandb": wandb_kwargs}


TIMING_WORDS = ("steps_per_s", "examples_per_s", "wall_s", "it/s", "s/it")


def test_private_run_logs_no_timing(private_run):
    r = private_run
    assert r["result"]["finished"] and r["result"]["privacy"]["private"] is True
    rows = read_metrics(r["out"])
    assert [x["step"] for x in rows if "epsilon" in x] == [1, 2, 3, 4]
    for row in rows:
        assert set(row) in ({"step", "epsilon", "lr"}, {"step", "samples"}), row  # no "time", no rate
    for text in (r["stdout"], r["stderr"]):
        assert not any(w in text for w in TIMING_WORDS), [w for w in TIMING_WORDS if w in text]
    assert "epsilon=" in r["stderr"] and "4/4" in r["stderr"]  # the bar ran: counts and epsilon, no rate/ETA
    assert "<" not in "".join(ln for ln in r["stderr"].split("\r") if "finetune:" in ln)  # tqdm's "[00:01<00:02"
    meta = json.loads((r["out"] / "model" / "meta.json").read_text())
    assert "wall_s_last_invocation" not in json.dumps(meta) and set(meta["trained"]) == {
        "device", "precision", "world_size", "zero_stage"}


def test_private_run_wandb_has_stats_and_console_off(private_run):
    settings = private_run["wandb"]["settings"]
    assert settings.x_disable_stats is True and settings.console == "off"
    runs = list((private_run["out"] / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and not list(runs[0].rglob("output.log"))  # no captured (time-stamped) console


def test_private_logger_refuses_timing_and_holds_wandb_rows_until_close(tmp_path, monkeypatch):
    cfg = load_config(None, TINY)
    log = RunLogger(tmp_path, cfg, use_wandb=False, total_steps=2, job="t", private=True)
    for key in TIMING_KEYS:
        with pytest.raises(ValueError, match="timing"):
            log.log(1, {"epsilon": 0.1, key: 1.0})
    sent = []

    class FakeRun:
        def log(self, row, step):
            sent.append(step)

        def finish(self):
            sent.append("finish")

    log._wandb = FakeRun()
    log.log(1, {"epsilon": 0.1})
    log.log(2, {"epsilon": 0.2})
    assert sent == []  # nothing reaches wandb (which stamps rows with its clock) during the run
    log.close()
    assert sent == [1, 2, "finish"]
    assert [set(x) for x in read_metrics(tmp_path)] == [{"step", "epsilon"}] * 2
    # a non-private logger keeps its clock
    RunLogger(tmp_path / "np", cfg, use_wandb=False, total_steps=1, job="t").log(1, {"steps_per_s": 2.0})
    assert set(read_metrics(tmp_path / "np")[0]) == {"step", "time", "steps_per_s"}


def test_not_private_run_keeps_its_timings(world):
    out = world["root"] / "seeded_timed"
    res = train(cfg_for(world, out, *SEEDED, "privacy.steps=2", "privacy.backend=\"torch\"", "train.wandb=false"),
                FinetuneOptions(out=out, init=str(world["public"])))
    rows = [x for x in read_metrics(out) if "epsilon" in x]
    assert {"time", "steps_per_s", "expected_examples_per_s", "wall_s"} <= set(rows[-1])
    assert "wall_s_last_invocation" in json.loads((Path(res["model"]) / "meta.json").read_text())["trained"]


def test_sample_grid_only_after_its_step_is_checkpointed(private_run):
    ev = [e for e in private_run["events"] if e[0] in ("checkpoint", "grid")]
    # checkpoint_every = 3, sample_every = 2, 4 steps: grids at 2 and 4, each right after a checkpoint of its step
    assert ev == [("checkpoint", 2), ("grid", 2), ("checkpoint", 3), ("checkpoint", 4), ("grid", 4)], ev
    steps = [int(p.name.split("_")[1]) for p in list_step_checkpoints(private_run["out"])]
    grids = sorted(int(p.stem.split("_")[1]) for p in (private_run["out"] / "samples").glob("step_*.png"))
    assert grids == [2, 4] and set(grids) <= set(steps)


def test_kernel_selection_is_decided_before_any_private_data(private_run):
    names = [e[0] for e in private_run["events"]]
    first_load = names.index("load")
    measured = [i for i, n in enumerate(names) if n == "measure"]
    assert names.index("pin_budget") < names.index("open_private_data")  # free memory read before private data
    assert measured and max(measured) < names.index("freeze") < first_load  # all on the public probe batch
    assert private_run["result"]["finished"]


def test_frozen_selector_refuses_new_keys_and_pinned_budget_is_reused(monkeypatch):
    from dpldm.kernels.registry import LinearShape, impls
    from dpldm.kernels.selection import KernelSelector, SelectionFrozenError

    free = {"bytes": 6 << 30}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 8 << 30))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    sel = KernelSelector(4, repeats=1, warmup=0)
    assert sel.pin_budget(torch.device("cuda")) == 3 << 30
    free["bytes"] = 1 << 30  # a private chunk now resident: not read again
    assert sel._budget(torch.device("cuda:0")) == 3 << 30
    cpu, shape = torch.device("cpu"), LinearShape(3, 5, 5, True)
    cands = [i for i in impls("linear_sqnorm", "torch")]
    sel.choose("linear_sqnorm", cpu, torch.float32, shape, cands)
    sel.freeze("test")
    sel.choose("linear_sqnorm", cpu, torch.float32, shape, cands)  # known keys keep working
    with pytest.raises(SelectionFrozenError, match="after the selector was frozen"):
        sel.choose("linear_sqnorm", cpu, torch.float32, LinearShape(3, 5, 6, True), cands)


# -- 6. resume refusals, launch/train.py --resume, the stop message ----------------------------------------

def test_explicit_resume_refuses_missing_or_empty_run_folder(world):
    missing = world["root"] / "no_such_run"
    cfg = cfg_for(world, missing, "train.wandb=false")
    with pytest.raises(RunFolderError, match=r"--resume: .*no_such_run does not exist, so there is no run to continue"):
        train(cfg, FinetuneOptions(out=missing, init=str(world["public"]), resume=True))
    assert not missing.exists()
    empty = world["root"] / "empty_run"
    empty.mkdir()
    (empty / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match=r"holds no step checkpoint"):
        train(cfg_for(world, empty, "train.wandb=false"),
              FinetuneOptions(out=empty, init=str(world["public"]), resume="must"))
    assert sorted(p.name for p in empty.iterdir()) == ["notes.txt"]
    with pytest.raises(InputError, match="resume must be one of"):
        FinetuneOptions(out=empty, resume="sometimes")


def _launch():
    spec = importlib.util.spec_from_file_location("launch_train", ROOT / "launch" / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_launch_resume_flag_forms_and_stop_messages(world):
    launch = _launch()
    parse = launch.build_parser().parse_args
    assert parse([]).resume == "auto" and parse(["--resume"]).resume == "must"
    assert parse(["--resume", "never"]).resume == "never" and parse(["--resume", "--max-steps", "1"]).resume == "must"
    out = world["root"] / "launched"
    argv = ["--init", str(world["public"]), "--private", str(world["npz"]), "--out", str(out), "--no-wandb"]
    for s in TINY + RUN + ["privacy.steps=2", "privacy.backend=\"torch\""] + SEEDED:
        argv += ["--set", s]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert launch.main(argv + ["--resume"]) == 2  # plain --resume on a folder that does not exist: refused
    assert "launch/train.py: error: --resume:" in err.getvalue() and not out.exists()
    text = io.StringIO()
    with contextlib.redirect_stdout(text), contextlib.redirect_stderr(io.StringIO()):
        assert launch.main(argv + ["--max-steps", "1"]) == 0  # the default (auto) starts a new run
    assert "checkpoint written. Resume with the same command: launch/train.py continues from the newest" in \
        text.getvalue()
    text = io.StringIO()
    with contextlib.redirect_stdout(text), contextlib.redirect_stderr(io.StringIO()):
        assert launch.main(argv + ["--resume"]) == 0  # plain --resume continues it to the end
    assert '"finished": true' in text.getvalue() and (out / "model" / "meta.json").is_file()


def test_stop_message_names_the_way_to_resume():
    cases = {("dpldm finetune", "never"): "Resume with the same command plus --resume",
             ("dpldm finetune", "must"): "it already has --resume",
             ("launch/train.py", "auto"): "launch/train.py continues from the newest checkpoint",
             ("launch/train.py", "must"): "launch/train.py continues from the newest checkpoint",
             ("launch/train.py", "never"): "--resume in place of --resume never"}
    for (command, mode), needle in cases.items():
        assert needle in resume_hint(FinetuneOptions(out=Path("x"), resume=mode, command=command))
