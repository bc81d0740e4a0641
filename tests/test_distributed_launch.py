"""End-to-end launches of launch/train.py (SLOW: ~1-2 minutes on two shared cores; never skipped).

1. `deepspeed --hostfile launch/hosts.example --no_ssh --node_rank 0 --master_addr 127.0.0.1
   launch/train.py --zero 3 ...`: two CPU ranks finish a tiny run (4 logical steps), write the
   final checkpoint and a consolidated single-process model that `load_ldm` reads.
2. The same run through the SLURM script (fake `srun`/`scontrol` on PATH, one machine): with 2
   ranks started by srun (SLURM_PROCID -> rank) and ZeRO-0 it gets USR1, checkpoints and asks to
   be requeued; the "requeued" job then runs with ONE rank (bare python: no DeepSpeed, ZeRO-3 asked
   for but nothing to partition), resumes from the checkpoint and finishes. Its privacy ledger
   equals the uninterrupted run's and its trained parameters match (the same Poisson samples were
   used: a different sample would move them by ~lr). The runs are seeded (train.deterministic with
   --not-private: tests only) so the two can be compared.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "dist_scripts"))
import tiny  # noqa: E402
from test_distributed_ranks import rank_env, spawn  # noqa: E402

STEPS = 4
RUN_ARGS = ["--random-init", "--synthetic-latents", "24", "--not-private"] + [
    a for s in tiny.TINY + ["train.deterministic=true", "train.seed=5", "privacy.epsilon=1e6",
                            "privacy.expected_batch_size=6", f"privacy.steps={STEPS}", "privacy.noise_multiplier=0.8",
                            "privacy.delta=1e-3", "privacy.physical_batch_size=2", "train.log_every=1",
                            "train.checkpoint_every=100", "train.lr=1e-2"]
    for a in ("--set", s)]

pytestmark = pytest.mark.slow


def _result(stdout: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT_JSON ")]
    assert lines, stdout[-6000:]
    return json.loads(lines[-1][len("RESULT_JSON "):])


def _final(run: Path, prefix: str = "train."):
    from dpldm.checkpoint import load_latest_checkpoint

    tensors, meta, folder = load_latest_checkpoint(run)
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, meta


@pytest.fixture(scope="module")
def deepspeed_run(tmp_path_factory):
    """SLOW: the `deepspeed --hostfile` launch of a tiny run, 2 CPU ranks, ZeRO-3."""
    out = tmp_path_factory.mktemp("ds_run")
    from dpldm.parallel.env import free_port

    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--hostfile", str(ROOT / "launch" / "hosts.example"),
           "--no_ssh", "--node_rank", "0", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(ROOT / "launch" / "train.py"), "--zero", "3", "--out", str(out)] + RUN_ARGS
    r = spawn(cmd)
    assert r.returncode == 0, r.stdout[-6000:]
    return out, r.stdout


def test_deepspeed_hostfile_launch_finishes_a_tiny_run(deepspeed_run):
    out, stdout = deepspeed_run
    res = _result(stdout)
    assert res["finished"] and res["steps_done"] == STEPS and res["world_size"] == 2
    assert "2 rank(s) via deepspeed, gloo, ZeRO stage 3" in stdout
    for s in range(1, STEPS + 1):
        assert f"step {s}: epsilon=" in stdout
    trained, meta = _final(out)
    assert meta["step"] == STEPS and meta["world_size"] == 2 and meta["zero_stage"] == 3
    assert meta["privacy"]["ledger"]["steps_done"] == STEPS
    from dpldm.models.ldm import load_ldm

    ema, _ = _final(out, "ema.")
    assert set(ema) == set(trained)
    model = load_ldm(out / "model")  # consolidated: one process, no DeepSpeed; releases the EMA weights
    state = model.unet.state_dict()
    init = _init_unet(out)
    for k, v in state.items():
        if k in trained:
            torch.testing.assert_close(v, ema[k], rtol=0, atol=0)
            assert not torch.equal(v, init[k])
        else:
            torch.testing.assert_close(v, init[k], rtol=0, atol=0)  # frozen: untouched
    released = (out / "model" / "meta.json").read_text()
    assert json.loads(released)["privacy"]["steps"] == STEPS
    assert not any("seed" in k for k in json.loads(released)["privacy"])  # no seed is published
    assert not (out / "STOP").exists()


def _fake_slurm_env(tmp: Path, job_id: int, procs: int, launcher: str, zero: int, out: Path) -> dict:
    env = rank_env(PATH=f"{ROOT / 'tests' / 'dist_scripts' / 'fake_slurm'}{os.pathsep}{os.environ['PATH']}",
                   SLURM_JOB_ID=str(job_id), SLURM_JOB_NAME="dpldm-test", SLURM_JOB_NODELIST="fake[0]",
                   SLURM_JOB_NUM_NODES="1", PROCS_PER_NODE=str(procs), LAUNCHER=launcher, ZERO=str(zero),
                   CONFIG="", OUT=str(out), PYTHON=sys.executable, FAKE_SLURM_LOG=str(tmp / "scontrol.log"))
    return env


def test_sbatch_requeue_resumes_with_another_world_size(deepspeed_run, tmp_path):
    ref_out, _ = deepspeed_run
    out = tmp_path / "run"
    job = random.randint(1000, 19000)
    script = str(ROOT / "launch" / "slurm" / "finetune.sbatch")

    # leg 1: 2 ranks started by srun, ZeRO-0; USR1 to the batch script once training is under way
    env = _fake_slurm_env(tmp_path, job, 2, "srun", 0, out)
    proc = subprocess.Popen(["bash", script] + RUN_ARGS, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT, env=env, start_new_session=True)
    lines, signalled = [], False
    deadline = time.time() + 420
    try:
        for line in proc.stdout:  # the trap is installed before srun starts; the plan prints after init
            lines.append(line)
            if not signalled and line.startswith("[finetune] DP:"):
                os.kill(proc.pid, signal.SIGUSR1)
                signalled = True
            if time.time() > deadline:
                raise TimeoutError
        proc.wait(timeout=60)
    except (TimeoutError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("sbatch leg 1 timed out\n" + "".join(lines)[-6000:])
    log1 = "".join(lines)
    assert proc.returncode == 0, log1[-6000:]
    assert signalled and "USR1 received" in log1
    res1 = _result(log1)
    assert not res1["finished"] and 1 <= res1["steps_done"] < STEPS and res1["stop_reason"] == "STOP", log1[-3000:]
    assert "2 rank(s) via slurm" in log1
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", str(job)]
    assert not (out / "STOP").exists()
    _, meta1 = _final(out)
    assert meta1["world_size"] == 2 and meta1["step"] == res1["steps_done"]

    # leg 2: the requeued job (same id, same run folder) on ONE rank with ZeRO-3
    env = _fake_slurm_env(tmp_path, job, 1, "srun", 3, out)
    r = spawn(["bash", script] + RUN_ARGS, env=env)
    assert r.returncode == 0, r.stdout[-6000:]
    step_dir = out / "checkpoints" / f"step_{res1['steps_done']:08d}"
    assert f"resumed from {step_dir}" in r.stdout
    assert "saved by 2 rank(s), now 1" in r.stdout
    res2 = _result(r.stdout)
    assert res2["finished"] and res2["steps_done"] == STEPS
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", str(job)]  # no second requeue

    trained, meta = _final(out)
    ref_trained, ref_meta = _final(ref_out)
    assert meta["privacy"]["ledger"] == ref_meta["privacy"]["ledger"]  # same history, steps, seed
    assert meta["privacy"]["ledger"]["plan"]["seed"] == 5 and meta["privacy"]["ledger"]["steps_done"] == STEPS
    assert meta["world_size"] == 1 and meta["zero_stage"] == 0  # one rank: no DeepSpeed, nothing to partition
    moved = max((ref_trained[k] - meta_init).abs().max().item()
                for k, meta_init in _init_unet(ref_out).items() if k in ref_trained)
    assert moved > 1e-3
    for k, v in ref_trained.items():
        torch.testing.assert_close(trained[k], v, rtol=0, atol=1e-5, msg=lambda m: f"{k}: {m}")
    ema, _ = _final(out, "ema.")
    ref_ema, _ = _final(ref_out, "ema.")
    for k, v in ref_ema.items():
        torch.testing.assert_close(ema[k], v, rtol=0, atol=1e-5, msg=lambda m: f"ema {k}: {m}")
    assert meta["scheduler"] == ref_meta["scheduler"]

    # leg 3: the time-limit warning arrives after the last step (the model is released): not requeued
    proc = subprocess.Popen(["bash", script] + RUN_ARGS, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT, env=env, start_new_session=True)
    lines, signalled = [], False
    for line in proc.stdout:
        lines.append(line)
        if not signalled and not line.startswith("finetune.sbatch:"):  # srun runs: the trap is installed
            os.kill(proc.pid, signal.SIGUSR1)
            signalled = True
    log3 = "".join(lines)
    assert proc.wait(timeout=300) == 0, log3[-4000:]
    assert "USR1 came after training finished" in log3 and "requeueing" not in log3, log3[-4000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", str(job)]  # still the one requeue
    shutil.rmtree(out / "init_model", ignore_errors=True)


def _init_unet(run: Path) -> dict[str, torch.Tensor]:
    """The UNet weights the run started from: the init model's EMA (what the runner loads)."""
    from dpldm.models.ldm import load_ldm

    return load_ldm(run / "init_model").ema.module.state_dict()
