"""The one run logger (dpldm.utils.logging.RunLogger): metrics.jsonl rows (appended on resume,
non-finite values kept as text), the user's WANDB_* variables respected, one wandb run id across
a resume, and only scalars accepted."""
from __future__ import annotations

import json

import pytest

from dpldm.config import load_config
from dpldm.utils.logging import WANDB_ID, RunLogger, read_metrics


def test_metrics_jsonl_appends_on_resume_and_refuses_non_scalars(tmp_path):
    cfg = load_config(None)
    log = RunLogger(tmp_path, cfg, use_wandb=False, total_steps=4, job="t")
    log.log(1, {"epsilon": 0.5, "lr": 1e-3}, echo=False)
    log.log(2, {"epsilon": float("inf")}, echo=False)
    with pytest.raises(ValueError, match="must be a number"):
        log.log(3, {"loss": "low"})
    log.close()
    again = RunLogger(tmp_path, cfg, use_wandb=False, total_steps=4, initial_step=2, job="t", resume=True)
    again.log(3, {"epsilon": 0.7}, echo=False)
    again.close()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["lr"] == 1e-3 and rows[1]["epsilon"] == "inf" and rows[2]["epsilon"] == 0.7
    assert json.loads((tmp_path / "config.json").read_text())["privacy"]["epsilon"] == cfg.privacy.epsilon
    fresh = RunLogger(tmp_path, cfg, use_wandb=False, total_steps=4, job="t")  # a new run starts a new file
    fresh.close()
    assert read_metrics(tmp_path) == []


def test_wandb_respects_user_variables_and_keeps_one_run_id_across_resume(tmp_path, monkeypatch):
    user_dir = tmp_path / "my_wandb"
    user_dir.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(user_dir))
    monkeypatch.setenv("WANDB_PROJECT", "my-project")
    run_dir = tmp_path / "run"
    cfg = load_config(None)
    log = RunLogger(run_dir, cfg, use_wandb=True, total_steps=2, job="t")
    assert log._wandb.project == "my-project"
    first = log._wandb.id
    log.log(1, {"epsilon": 0.1}, echo=False)
    log.close()
    assert (run_dir / WANDB_ID).read_text().strip() == first
    assert list(user_dir.glob("wandb/offline-run-*")), "wandb did not write where WANDB_DIR says"
    assert not (run_dir / "wandb").exists()
    again = RunLogger(run_dir, cfg, use_wandb=True, total_steps=2, initial_step=1, job="t", resume=True)
    assert again._wandb.id == first  # the same wandb run continues
    again.close()
    new = RunLogger(tmp_path / "other", cfg, use_wandb=True, total_steps=2, job="t")
    assert new._wandb.id != first
    new.close()
