"""Bad input on the privacy path (docs/errors.md, section "Privacy path refusals"; issue 17).

Three kinds of rows, each must end in ONE line naming the problem and lose nothing already written:
* `dpldm` rows run `dpldm.cli.main([...])` in-process: exit code 2, the last stderr line is
  `dpldm <command>: error: ...`, no traceback; `--out` is not created, or an existing one is left
  byte-for-byte unchanged;
* `launch` rows run `launch/train.py`'s `main([...])` in-process: the same, with the prefix
  `launch/train.py: error:` (argparse's usage line may precede it);
* `api` rows build a model and call the DP engine (what a Python user of dpldm.privacy does): an
  InputError subclass whose message is one line, and every parameter and buffer of the model, and
  torch's global generator, are as they were before the call.
"""
from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from torch import nn

from dpldm.cli import main
from dpldm.errors import InputError
from dpldm.privacy.engine import BookKeepingEngine
from tiny_ldm import TINY, save_tiny
from cli_harness import run_in_process, tree_hash
from test_privacy_path import _Counter, _Head, _Noisy, _Renorm  # modules that change state or draw in forward

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Privacy path refusals"
RUN = ["privacy.expected_batch_size=8", "privacy.steps=2", "privacy.noise_multiplier=1.0", "privacy.delta=1e-3",
       "privacy.accountant=\"rdp\"", "privacy.physical_batch_size=4", "privacy.backend=\"torch\"",
       "train.threads=1"]


class Env:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._n = 0

    def fresh(self, name: str) -> Path:
        self._n += 1
        return self.root / f"{name}_{self._n}"

    @cached_property
    def public(self) -> Path:
        return save_tiny(self.root / "public")

    @cached_property
    def private(self) -> Path:
        rng = np.random.default_rng(0)
        path = self.root / "private.npz"
        np.savez(path, images=rng.integers(0, 256, size=(40, 16, 16), dtype=np.uint8), labels=np.arange(40) % 3)
        return path

    def run_args(self, out: Path, *extra: str) -> list[str]:
        argv = ["--init", str(self.public), "--private", str(self.private), "--out", str(out), "--no-wandb"]
        for s in TINY + RUN:
            argv += ["--set", s]
        return argv + list(extra)


# -- what the rows build ----------------------------------------------------------------------------------

class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn, self.lin = nn.MultiheadAttention(4, 2, dropout=0.1, batch_first=True), nn.Linear(4, 4)
        self.attn.requires_grad_(False)

    def forward(self, x):  # (B, 4) -> (B, 4)
        s = x.unsqueeze(1).repeat(1, 3, 1)  # (B, 3, 4)
        return self.lin(self.attn(s, s, s, need_weights=False)[0].mean(1))


class _Bag(nn.Module):
    def __init__(self, trainable: bool) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(6, 4, max_norm=1.0).requires_grad_(trainable)
        self.lin = nn.Linear(4, 4)

    def forward(self, idx):  # (B, 2) -> (B, 4)
        return self.lin(self.bag(idx))


def _loss(model, x):
    return model(x).pow(2).sum(1)  # (B,)


def _engine(model_fn: Callable[[], nn.Module]):
    """api row: BookKeepingEngine(model, C=1)."""
    def call():
        model = model_fn()
        return model, lambda: BookKeepingEngine(model, 1.0)
    return call


def _chunk_after_train(model_fn):
    """api row: set up in eval mode, put back in train mode, then one chunk."""
    def call():
        model = model_fn().eval()
        engine = BookKeepingEngine(model, 1.0)
        model.train()
        x = torch.randn(3, 4)
        return model, lambda: engine.clipped_sums(_loss, x)
    return call


def _probe(model_fn):
    """api row: the set-up probe on a public batch of zeros."""
    def call():
        model = model_fn()
        engine = BookKeepingEngine(model, 1.0)
        return model, lambda: engine.probe(_loss, torch.zeros(3, 4))
    return call


def _options(**kw):
    def call():
        from dpldm.train.dp_finetune import FinetuneOptions

        return nn.Linear(1, 1), lambda: FinetuneOptions(out=Path("x"), **kw)
    return call


def _leaky_unet(mp: pytest.MonkeyPatch) -> None:
    from dpldm.models.unet import UNet

    real = UNet.forward

    def forward(self, x, t, y):
        with torch.no_grad():
            self.input_blocks[0][0].bias.add_(1e-3)
        return real(self, x, t, y)
    mp.setattr(UNet, "forward", forward)


def _noisy_unet(mp: pytest.MonkeyPatch) -> None:
    from dpldm.models.unet import UNet

    real = UNet.forward
    mp.setattr(UNet, "forward", lambda self, x, t, y: real(self, x + 1e-3 * torch.randn_like(x), t, y))


# -- the table ------------------------------------------------------------------------------------------

@dataclass
class Row:
    id: str
    what: str
    kind: str  # dpldm | launch | api
    needle: str
    argv: Callable[[Env, Path], list[str]] | None = None  # dpldm / launch: (env, out) -> argv
    api: Callable[[], tuple[nn.Module, Callable[[], object]]] | None = None  # api: () -> (model, the call)
    patch: Callable[[pytest.MonkeyPatch], None] | None = None  # a user's model, put in place for the row


def _existing_with_file(e: Env, o: Path) -> Path:
    o.mkdir(parents=True)
    (o / "notes.txt").write_text("the user's notes\n")
    return o


def _a_file(e: Env, o: Path) -> Path:
    o.write_text("a user's file\n")
    return o


ROWS = [
    Row("resume-missing-run-folder", "`dpldm finetune --resume` on a run folder that does not exist (started a fresh "
        "run with a full budget)", "dpldm", "--resume: ",
        argv=lambda e, o: ["finetune", *e.run_args(o, "--resume")]),
    Row("resume-run-folder-without-checkpoints", "`dpldm finetune --resume` on a folder with no step checkpoint",
        "dpldm", "holds no step checkpoint (checkpoints/step_*), so there is no run to continue",
        argv=lambda e, o: ["finetune", *e.run_args(_existing_with_file(e, o), "--resume")]),
    Row("resume-run-folder-is-a-file", "`dpldm finetune --resume --out` an existing file", "dpldm",
        "exists and is not a folder", argv=lambda e, o: ["finetune", *e.run_args(_a_file(e, o), "--resume")]),
    Row("launch-resume-missing-run-folder", "`launch/train.py --resume` (plain: must resume) on a missing folder",
        "launch", "does not exist, so there is no run to continue", argv=lambda e, o: [*e.run_args(o, "--resume")]),
    Row("launch-resume-without-checkpoints", "`launch/train.py --resume must` on a folder with no step checkpoint",
        "launch", "holds no step checkpoint",
        argv=lambda e, o: [*e.run_args(_existing_with_file(e, o), "--resume", "must")]),
    Row("launch-resume-bad-mode", "`launch/train.py --resume sometimes`", "launch",
        "argument --resume: invalid choice: 'sometimes'", argv=lambda e, o: [*e.run_args(o, "--resume", "sometimes")]),
    Row("trainer-unet-writes-state", "a UNet whose forward changes a frozen tensor (through `dpldm finetune`)",
        "dpldm", "changed the model's tensor 'input_blocks.0.0.bias'", argv=lambda e, o: ["finetune", *e.run_args(o)],
        patch=_leaky_unet),
    Row("trainer-unet-draws-global-rng", "a UNet whose forward draws from torch's global RNG (through `dpldm "
        "finetune`)", "dpldm", "drew from torch's global random generator (CPU generator)",
        argv=lambda e, o: ["finetune", *e.run_args(o)], patch=_noisy_unet),
    Row("engine-dropout-train-mode", "`nn.Dropout(0.3)` in train mode", "api",
        "module 'extra' (Dropout, p=0.3) is in training mode (at engine set-up)",
        api=_engine(lambda: _Head(nn.Dropout(0.3)))),
    Row("engine-dropout2d-train-mode", "`nn.Dropout2d(0.3)` in train mode", "api", "(Dropout2d, p=0.3)",
        api=_engine(lambda: _Head(nn.Dropout2d(0.3)))),
    Row("engine-alpha-dropout-train-mode", "`nn.AlphaDropout(0.3)` in train mode", "api", "(AlphaDropout, p=0.3)",
        api=_engine(lambda: _Head(nn.AlphaDropout(0.3)))),
    Row("engine-feature-alpha-dropout-train-mode", "`nn.FeatureAlphaDropout(0.3)` in train mode", "api",
        "(FeatureAlphaDropout, p=0.3)", api=_engine(lambda: _Head(nn.FeatureAlphaDropout(0.3)))),
    Row("engine-rrelu-train-mode", "`nn.RReLU()` (random slopes) in train mode", "api",
        "(RReLU, random slopes in [0.125, 0.333333])", api=_engine(lambda: _Head(nn.RReLU()))),
    Row("engine-attention-dropout-train-mode", "frozen `nn.MultiheadAttention(dropout=0.1)` in train mode", "api",
        "module 'attn' (MultiheadAttention, attention dropout=0.1)", api=_engine(_Attn)),
    Row("engine-dropout-back-in-train-mode", "`nn.Dropout(0.3)` put in train mode after set-up", "api",
        "is in training mode (when computing clipped sums)",
        api=_chunk_after_train(lambda: _Head(nn.Dropout(0.3)))),
    Row("engine-embedding-bag-max-norm-frozen", "frozen `nn.EmbeddingBag(max_norm=1.0)`", "api",
        "embedding bag 'bag' (frozen) has max_norm=1.0", api=_engine(lambda: _Bag(False))),
    Row("engine-embedding-bag-max-norm-trainable", "trainable `nn.EmbeddingBag(max_norm=1.0)`", "api",
        "embedding bag 'bag' (trainable) has max_norm=1.0", api=_engine(lambda: _Bag(True))),
    Row("probe-buffer-written-in-forward", "a module that counts rows in a buffer during forward", "api",
        "changed the model's tensor 'extra.seen'", api=_probe(lambda: _Head(_Counter()))),
    Row("probe-weight-renormalised-in-forward", "a module that rescales its frozen weight from the batch", "api",
        "changed the model's tensor 'extra.weight'", api=_probe(lambda: _Head(_Renorm()))),
    Row("probe-global-rng-in-forward", "a module that adds `torch.randn_like` noise in forward (any mode)", "api",
        "drew from torch's global random generator (CPU generator)", api=_probe(lambda: _Head(_Noisy()))),
    Row("finetune-options-bad-resume", "`FinetuneOptions(resume=\"sometimes\")`", "api",
        "resume must be one of ('never', 'auto', 'must')", api=_options(resume="sometimes")),
]


# -- running a row ---------------------------------------------------------------------------------------

def _launch_main():
    spec = importlib.util.spec_from_file_location("launch_train_bad_inputs", REPO / "launch" / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return Env(tmp_path_factory.mktemp("bad_privacy"))


@pytest.mark.filterwarnings("ignore:dropout")
@pytest.mark.parametrize("row", [pytest.param(r, id=r.id) for r in ROWS])
def test_bad_input(row: Row, env: Env, monkeypatch):
    if row.patch is not None:
        row.patch(monkeypatch)
    if row.kind == "api":
        model, call = row.api()
        state = {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}
        rng = torch.get_rng_state()
        with pytest.raises(InputError) as info:
            call()
        msg = str(info.value)
        assert "\n" not in msg and row.needle in msg, msg
        now = dict([*model.named_parameters(), *model.named_buffers()])
        assert all(torch.equal(t, now[n]) for n, t in state.items()), "the refusal left the model changed"
        assert torch.equal(rng, torch.get_rng_state()), "the refusal left the global generator moved"
        return
    out = env.fresh(f"out_{row.id}")
    argv = row.argv(env, out)
    before = tree_hash(out) if out.exists() else None
    code, _, stderr = run_in_process(main if row.kind == "dpldm" else _launch_main(), argv)
    assert "Traceback" not in stderr, stderr[-2000:]
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip() and not ln.startswith(("usage:", "  "))]
    prefix = r"dpldm[\w -]*: error: .*" if row.kind == "dpldm" else r"launch/train.py: error: .*"
    found = re.search(prefix, lines[-1]) if lines else None
    assert found, stderr[-1000:]
    assert row.needle in found.group(0), found.group(0)
    assert code == 2, code
    if before is None:
        assert not out.exists(), sorted(p.name for p in out.rglob("*"))
    else:
        assert tree_hash(out) == before


def test_every_row_is_documented():
    doc = (REPO / "docs" / "errors.md").read_text()
    assert SECTION in doc
    section = doc.split(SECTION, 1)[1].split("\n## ", 1)[0]
    missing = [r.id for r in ROWS if f"`{r.id}`" not in section]
    assert not missing, f"rows missing from docs/errors.md ({SECTION}): {missing}"
    assert len({r.id for r in ROWS}) == len(ROWS)
