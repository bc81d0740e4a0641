"""The append-only privacy journal (issue 28 item 2; dpldm.privacy.journal): every executed step is
recorded before anything of it is released, a resume from an older checkpoint counts the re-run steps
again (a step executed r times is one subsampled Gaussian at sigma / sqrt(r)), a corrupt newest
checkpoint stops the run unless --allow-older-checkpoint, and the epsilon reported covers every step
executed. Independent reference: Opacus' accountant on the execution history written out by hand."""
from __future__ import annotations

import json
import math

import pytest
import torch

from dpldm.checkpoint import CheckpointError, list_step_checkpoints
from dpldm.privacy.accountant import PrivacyLedger, _epsilon
from dpldm.privacy.journal import JOURNAL, JournalError, PrivacyJournal, extra_executions
from dpldm.train.dp_finetune import FinetuneOptions, Trainer, train
import test_privacy_path
from test_privacy_path import cfg_for

world = test_privacy_path.world  # the fixture, shared with test_privacy_path

STEPS = ["privacy.steps=6", "train.checkpoint_every=2", "train.wandb=false", "privacy.backend=\"torch\""]


def test_journal_records_validates_and_counts(tmp_path):
    j = PrivacyJournal(tmp_path)
    for s, e in ((1, 1), (2, 1), (3, 1), (3, 2)):
        j.append(s, e, 2.0, 0.1)
    assert j.executions(2.0, 0.1) == {1: 1, 2: 1, 3: 2}
    assert extra_executions(j.executions(2.0, 0.1), 2) == {3: 2}  # beyond the checkpoint: both count
    assert extra_executions(j.executions(2.0, 0.1), 3) == {3: 1}
    with pytest.raises(JournalError, match="sigma 2.0, q 0.1, but this run has sigma 3.0"):
        j.executions(3.0, 0.1)
    with pytest.raises(JournalError, match=r"lacks step\(s\) \[4\]"):
        extra_executions(j.executions(2.0, 0.1), 4)
    with open(j.path, "a") as f:
        f.write('{"step": 4, "exec')  # a write cut short by a crash: dropped with a warning
    with pytest.warns(UserWarning, match="incomplete last line"):
        assert len(j.records()) == 4
    j.path.write_text(j.path.read_text().replace('"step": 2', '"step": -2'))
    with pytest.raises(JournalError, match=r"line 2: not a privacy journal record"):
        with pytest.warns(UserWarning):
            j.records()


def test_ledger_accounts_a_rerun_step_at_sigma_over_sqrt_r():
    led = PrivacyLedger.create(num_examples=1000, sample_rate=0.05, max_grad_norm=1.0, delta=1e-5, noise_multiplier=1.5)
    for _ in range(10):
        led.step()
    plain = led.epsilon_spent()
    led.extra_executions = {9: 1, 10: 2}
    want = _epsilon([(1.5, 0.05, 8), (1.5 / math.sqrt(2), 0.05, 1), (1.5 / math.sqrt(3), 0.05, 1)], 1e-5, "prv", None)
    assert led.epsilon_spent() == pytest.approx(want, rel=1e-9)
    assert led.epsilon_spent() > _epsilon([(1.5, 0.05, 13)], 1e-5, "prv", None) > plain  # re-runs cost more
    assert led.executed_steps() == 13
    again = PrivacyLedger.from_state_dict(json.loads(json.dumps(led.state_dict())))
    assert again.extra_executions == {9: 1, 10: 2} and again.epsilon_spent() == pytest.approx(led.epsilon_spent())


def _run(world, out, **opts):  # noqa: F811
    return train(cfg_for(world, out, *STEPS), FinetuneOptions(out=out, init=str(world["public"]), verbose=False, **opts))


def _lines(out):
    return [json.loads(x) for x in (out / JOURNAL).read_text().splitlines()]


def _sigma_q(res):
    return res["privacy"]["noise_multiplier"], res["privacy"]["sample_rate"]


def test_uninterrupted_run_journals_each_step_once(world):  # noqa: F811
    out = world["root"] / "journal_plain"
    res = _run(world, out)
    assert [(r["step"], r["execution"]) for r in _lines(out)] == [(s, 1) for s in range(1, 7)]
    sigma, q = _sigma_q(res)
    assert res["privacy"]["executed_steps"] == 6
    assert res["privacy"]["epsilon"] == pytest.approx(_epsilon([(sigma, q, 6)], 1e-3, "prv", None), rel=1e-9)


def test_crash_after_a_released_step_reruns_it_and_counts_both(world, monkeypatch):  # noqa: F811
    """Killed after step 3 was journalled (and its metrics row logged) but before its checkpoint: the
    resume from step 2 runs 3 again; the final epsilon covers steps 1, 2, 4-6 once and 3 twice."""
    out = world["root"] / "journal_crash"
    real = Trainer._checkpoint

    def crash_at_3(self):
        if self.dp.step_index == 3:
            self._release_lock()  # what the death of the process does to its flock
            raise KeyboardInterrupt("killed")
        return real(self)
    monkeypatch.setattr(Trainer, "_checkpoint", crash_at_3)
    with pytest.raises(KeyboardInterrupt):
        _run(world, out, max_steps=3)
    monkeypatch.setattr(Trainer, "_checkpoint", real)
    assert [r["step"] for r in _lines(out)] == [1, 2, 3]
    assert [p.name for p in list_step_checkpoints(out)] == ["step_00000002"]
    res = _run(world, out, resume=True)
    assert [(r["step"], r["execution"]) for r in _lines(out)] == [(1, 1), (2, 1), (3, 1), (3, 2), (4, 1), (5, 1),
                                                                   (6, 1)]
    sigma, q = _sigma_q(res)
    want = _epsilon([(sigma, q, 5), (sigma / math.sqrt(2), q, 1)], 1e-3, "prv", None)
    assert res["model"] and res["privacy"]["executed_steps"] == 7
    assert res["privacy"]["epsilon"] == pytest.approx(want, rel=1e-9)
    assert res["privacy"]["epsilon"] > _epsilon([(sigma, q, 6)], 1e-3, "prv", None)


def test_corrupt_newest_checkpoint_stops_unless_allowed_then_every_step_is_counted(world):  # noqa: F811
    out = world["root"] / "journal_corrupt"
    _run(world, out, max_steps=4)  # checkpoints at 2 and 4
    newest = list_step_checkpoints(out)[-1]
    tensors = next(p for p in newest.iterdir() if p.suffix == ".safetensors")
    tensors.write_bytes(tensors.read_bytes()[:100])  # corrupt
    with pytest.raises(CheckpointError, match=rf"newest checkpoint cannot be loaded.*{newest.name}.*allow-older"):
        _run(world, out, resume=True)
    assert len(_lines(out)) == 4  # the refusal executed nothing
    res = _run(world, out, resume=True, allow_older_checkpoint=True)
    steps = [(r["step"], r["execution"]) for r in _lines(out)]
    assert steps == [(1, 1), (2, 1), (3, 1), (4, 1), (3, 2), (4, 2), (5, 1), (6, 1)]
    sigma, q = _sigma_q(res)
    want = _epsilon([(sigma, q, 4), (sigma / math.sqrt(2), q, 2)], 1e-3, "prv", None)
    assert res["privacy"]["epsilon"] == pytest.approx(want, rel=1e-9) and res["privacy"]["executed_steps"] == 8


def test_missing_journal_of_a_journalled_run_is_refused(world):  # noqa: F811
    out = world["root"] / "journal_missing"
    _run(world, out, max_steps=2)
    (out / JOURNAL).unlink()
    with pytest.raises(JournalError, match="is missing"):
        _run(world, out, resume=True)


def test_journal_is_written_before_the_metrics_row_and_checkpoint_of_its_step(world, monkeypatch):  # noqa: F811
    out = world["root"] / "journal_order"
    seen = []
    real_ckpt = Trainer._checkpoint

    def ckpt(self):
        seen.append(("checkpoint", self.dp.step_index, len(_lines(out))))
        return real_ckpt(self)
    monkeypatch.setattr(Trainer, "_checkpoint", ckpt)
    _run(world, out, max_steps=2)
    assert seen and all(n >= s for _, s, n in seen), seen
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"epsilon"' in x]
    assert metrics and torch.tensor([m["step"] for m in metrics]).max() <= len(_lines(out))
