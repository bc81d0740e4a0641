"""Fault tolerance of `dpldm finetune`, through real subprocesses (`python -m dpldm finetune`):

* SIGTERM (SLURM preemption) or SIGINT (Ctrl-C) mid-run: the logical step finishes, a checkpoint is
  written, exit 0 with a line saying how to resume; `--resume` finishes, and the final weights and
  the accounted epsilon equal an uninterrupted run; a second trainer started on the same run
  folder meanwhile exits 2 at once (the folder is locked) and changes nothing;
* SIGKILL mid-step: `--resume` continues from the last checkpoint (ledger included), same result;
* a corrupt newest checkpoint (truncated safetensors): resume is refused, naming it; with
  --allow-older-checkpoint it falls back to the one before it (tests/test_journal.py: the accounting)
  with a warning naming it, same result;
* checkpoints are written atomically (temporary file, fsync, rename; meta.json last; folder
  renamed into place) and only the newest `train.keep_checkpoints` are kept.

The reference is an uninterrupted subprocess run of the same deterministic recipe
(`train.deterministic=true` + `train.not_private=true`: Poisson plan, diffusion draws and noise
seeded from the config, one thread; such runs report epsilon = inf and keep the accountant's
number as `epsilon_if_noise_were_secret`)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dpldm.checkpoint import (CheckpointError, list_step_checkpoints, load_checkpoint, load_latest_checkpoint,
                              save_step_checkpoint)
from dpldm.config import load_config
from dpldm.models.ldm import LatentDiffusion, save_ldm
from dpldm.privacy.accountant import PrivacyLedger, compute_epsilon
from dpldm.train.run_folder import StopRequest

REPO = Path(__file__).resolve().parents[1]
STEPS, SIGMA, Q, DELTA = 8, 1.0, 8 / 40, 1e-3
MODEL = [
    "autoencoder.base_channels=8", "autoencoder.channel_mult=[1, 2]", "autoencoder.latent_channels=2",
    "unet.in_channels=2", "unet.model_channels=16", "unet.channel_mult=[1, 2]", "unet.attention_levels=[1]",
    "unet.num_heads=2", "unet.context_dim=16", "unet.num_classes=5", "data.image_size=16", "data.num_classes=3",
]
RUN = [
    "privacy.expected_batch_size=8", f"privacy.steps={STEPS}", f"privacy.noise_multiplier={SIGMA}",
    f"privacy.delta={DELTA}", "privacy.accountant=\"rdp\"", "privacy.physical_batch_size=4",
    "privacy.max_grad_norm=0.5", "train.lr=1e-3", "train.threads=1", "train.log_every=100",
    "train.checkpoint_every=1", "train.keep_checkpoints=3", "train.deterministic=true", "train.not_private=true",
    "train.ema_decay=0.5",
]
TIMEOUT = 600


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny public model + private .npz; starts the uninterrupted reference run in the background."""
    root = tmp_path_factory.mktemp("ft_faults")
    rng = np.random.default_rng(0)
    npz = root / "private.npz"
    np.savez(npz, images=rng.integers(0, 256, size=(40, 16, 16), dtype=np.uint8), labels=np.arange(40) % 3)
    torch.manual_seed(0)
    save_ldm(root / "public", LatentDiffusion(load_config(None, MODEL), scale_factor=0.7))
    w = {"root": root, "npz": npz, "public": root / "public"}
    w["reference"] = _start(w, root / "reference")
    yield w
    if w["reference"].poll() is None:
        w["reference"].kill()
        w["reference"].wait()


def _argv(w, out, *extra):
    sets = [a for s in MODEL + RUN for a in ("--set", s)]
    return [sys.executable, "-m", "dpldm", "finetune", "--init", str(w["public"]), "--private", str(w["npz"]),
            "--out", str(out), "--no-wandb", *sets, *extra]


def _start(w, out, *extra):
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    out.mkdir(parents=True, exist_ok=True)
    log = open(out.parent / f"{out.name}.{len(list(out.parent.glob(out.name + '.*.log')))}.log", "w")
    p = subprocess.Popen(_argv(w, out, *extra), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    p.log_path = Path(log.name)
    log.close()
    return p


def _finish(p):
    rc = p.wait(timeout=TIMEOUT)
    return rc, p.log_path.read_text()


def _run(w, out, *extra):
    return _finish(_start(w, out, *extra))


@pytest.fixture(scope="module")
def reference(world):
    rc, log = _finish(world["reference"])
    assert rc == 0, log[-3000:]
    return _final(world["root"] / "reference")


def _final(run_dir):
    tensors, meta = load_checkpoint(run_dir / "model")
    return tensors, meta["privacy"]


def _assert_same_as_reference(run_dir, reference, rerun_steps=0):
    """Same weights as the uninterrupted run; the same epsilon, or (steps run again after a fall-back
    past a corrupt checkpoint) the epsilon with each re-run step at sigma / sqrt(2) (the journal)."""
    ref_t, ref_p = reference
    t, p = _final(run_dir)
    assert sorted(t) == sorted(ref_t)
    diff = [k for k in ref_t if not torch.equal(ref_t[k], t[k])]
    assert not diff, f"{len(diff)} tensors differ from the uninterrupted run, e.g. {diff[:3]}"
    assert p["steps"] == ref_p["steps"] == STEPS
    if rerun_steps:
        from dpldm.privacy.accountant import _epsilon

        want = _epsilon([(SIGMA, Q, STEPS - rerun_steps), (SIGMA / 2 ** 0.5, Q, rerun_steps)], DELTA, "rdp", None)
        assert p["epsilon_if_noise_were_secret"] == pytest.approx(want, rel=1e-12)
        assert p["executed_steps"] == STEPS + rerun_steps and p["epsilon"] == float("inf")
        return
    assert p["epsilon_if_noise_were_secret"] == ref_p["epsilon_if_noise_were_secret"]
    assert p["epsilon_if_noise_were_secret"] == pytest.approx(compute_epsilon(SIGMA, Q, STEPS, DELTA, "rdp"), rel=1e-12)
    assert p["epsilon"] == float("inf")  # seeded: not private


def _wait_for_checkpoint(p, run_dir, step):
    meta = run_dir / "checkpoints" / f"step_{step:08d}" / "meta.json"
    t0 = time.time()
    while not meta.is_file():
        if p.poll() is not None:
            pytest.fail(f"the run ended (rc {p.returncode}) before checkpoint {step}:\n{p.log_path.read_text()[-3000:]}")
        if time.time() - t0 > TIMEOUT:
            p.kill()
            pytest.fail(f"no checkpoint {step} after {TIMEOUT}s")
        time.sleep(0.005)


def _steps(run_dir):
    return [int(f.name[len("step_"):]) for f in list_step_checkpoints(run_dir)]


def test_uninterrupted_run_keeps_only_the_last_checkpoints(world, reference):
    run_dir = world["root"] / "reference"
    assert _steps(run_dir) == [STEPS - 2, STEPS - 1, STEPS]  # keep_checkpoints = 3, one per step
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.endswith((".partial", ".deleting"))]
    assert not list(run_dir.rglob("*.tmp"))  # no temporary file left behind


def _result(log):
    line = [ln for ln in log.splitlines() if ln.startswith("RESULT_JSON ")][-1]
    return json.loads(line[len("RESULT_JSON "):])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_checkpoints_exits_zero_and_resume_matches(world, reference, sig):
    run_dir = world["root"] / sig.name
    p = _start(world, run_dir)
    _wait_for_checkpoint(p, run_dir, 1)
    p.send_signal(sig)
    rc, log = _finish(p)
    assert rc == 0, log[-3000:]
    assert f"({sig.name}); checkpoint written. Resume with the same command plus --resume" in log
    done = _steps(run_dir)
    assert done and max(done) < STEPS, f"the run was not interrupted: {done}"
    assert not (run_dir / "model").exists()  # no final model from an unfinished run
    _, meta = load_checkpoint(list_step_checkpoints(run_dir)[-1])
    k = meta["privacy"]["ledger"]["steps_done"]
    assert k == max(done) == meta["step"]
    spent = PrivacyLedger.from_state_dict(meta["privacy"]["ledger"]).epsilon_spent()
    assert spent == pytest.approx(compute_epsilon(SIGMA, Q, k, DELTA, "rdp"), rel=1e-12)
    result = _result(log)
    assert result["steps_done"] == k and result["stop_reason"] == sig.name and not result["finished"]
    assert result["privacy"]["epsilon_if_noise_were_secret"] == pytest.approx(spent, rel=1e-12)

    rc, log = _run(world, run_dir, "--resume")
    assert rc == 0, log[-3000:]
    _assert_same_as_reference(run_dir, reference)


def test_second_trainer_on_a_busy_run_folder_exits_2_and_changes_nothing(world):
    run_dir = world["root"] / "busy"
    p = _start(world, run_dir, "--set", "privacy.steps=100000", "--set", "privacy.epsilon=1e9")  # runs until stopped
    try:
        _wait_for_checkpoint(p, run_dir, 1)
        rc2, log2 = _run(world, run_dir, "--resume", "--set", "privacy.steps=100000", "--set", "privacy.epsilon=1e9")
        assert rc2 == 2 and "in use by another dpldm run (pid" in log2 and "Traceback" not in log2, log2[-2000:]
        assert p.poll() is None  # the first run goes on
    finally:
        p.send_signal(signal.SIGTERM)
    rc, log = _finish(p)
    assert rc == 0 and "(SIGTERM); checkpoint written" in log, log[-3000:]


def test_sigkill_mid_step_then_resume_matches(world, reference):
    run_dir = world["root"] / "sigkill"
    p = _start(world, run_dir)
    _wait_for_checkpoint(p, run_dir, 2)
    p.send_signal(signal.SIGKILL)  # lands in step 3 (or while its checkpoint is being written)
    rc, _ = _finish(p)
    assert rc == -signal.SIGKILL
    done = _steps(run_dir)
    assert 2 <= max(done) < STEPS
    found = load_latest_checkpoint(run_dir)
    assert found is not None and found[1]["privacy"]["ledger"]["steps_done"] == max(done)

    rc, log = _run(world, run_dir, "--resume")
    assert rc == 0, log[-3000:]
    _assert_same_as_reference(run_dir, reference)


def test_corrupt_newest_checkpoint_stops_unless_allowed_then_falls_back(world, reference):
    run_dir = world["root"] / "corrupt"
    rc, log = _run(world, run_dir, "--max-steps", "4")
    assert rc == 0, log[-3000:]
    assert _steps(run_dir) == [2, 3, 4]
    newest = run_dir / "checkpoints" / "step_00000004" / "tensors.safetensors"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # truncated (e.g. a disk filled up during a copy)
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(newest.parent)

    rc, log = _run(world, run_dir, "--resume")  # refused: an older checkpoint would re-run released steps
    assert rc != 0 and "newest checkpoint cannot be loaded" in log and "--allow-older-checkpoint" in log, log[-3000:]
    rc, log = _run(world, run_dir, "--resume", "--allow-older-checkpoint")
    assert rc == 0, log[-3000:]
    assert "skipping unusable checkpoint" in log and "step_00000004" in log
    _assert_same_as_reference(run_dir, reference, rerun_steps=1)  # step 4 ran twice: both accounted
    assert _steps(run_dir) == [STEPS - 2, STEPS - 1, STEPS]  # the corrupt one was rewritten, then rotated out


# -- atomic writes, in-process --------------------------------------------------------------------------

def _ckpt(x):
    return {"model.w": torch.full((64,), float(x))}


def test_checkpoint_write_order_is_tmp_fsync_rename_meta_last(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, Path.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)

    def rename(self, target):
        events.append(("rename", str(self), str(target)))
        return real_rename(self, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(Path, "rename", rename)
    folder = save_step_checkpoint(tmp_path, 7, _ckpt(1), {"kind": "t"}, keep=2)
    final = str(folder)
    partial = final + ".partial"
    i_t = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == f"{partial}/tensors.safetensors")
    i_m = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == f"{partial}/meta.json")
    i_f = next(i for i, e in enumerate(events) if e[0] == "rename" and e[1] == partial and e[2] == final)
    # each file: fsync of its temporary name before the rename onto the real name
    assert events[i_t - 1][0] == "fsync" and events[i_t - 1][1] == events[i_t][1]
    assert events[i_m - 1][0] == "fsync" and events[i_m - 1][1] == events[i_m][1]
    assert i_t < i_m < i_f  # tensors, then meta.json, then the folder into place
    assert ("fsync", str(tmp_path / "checkpoints")) in events[i_f + 1:]  # the rename is made durable
    assert load_checkpoint(folder)[0]["model.w"][0] == 1


def test_kill_while_writing_leaves_previous_checkpoints_usable(tmp_path, monkeypatch):
    for s in (1, 2):
        save_step_checkpoint(tmp_path, s, _ckpt(s), {"kind": "t"}, keep=3)

    import dpldm.checkpoint as ck

    def dying_save_file(tensors, path):  # writes half a file, then the process "dies"
        Path(path).write_bytes(b"\0" * 100)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(ck, "save_file", dying_save_file)
    with pytest.raises(KeyboardInterrupt):
        save_step_checkpoint(tmp_path, 3, _ckpt(3), {"kind": "t"}, keep=3)
    monkeypatch.undo()
    assert _steps(tmp_path) == [1, 2]  # the half-written step 3 is invisible
    tensors, meta, folder = load_latest_checkpoint(tmp_path)
    assert meta["step"] == 2 and tensors["model.w"][0] == 2
    (tmp_path / "checkpoints" / "step_00000000.deleting").mkdir()  # a clean-up interrupted by a kill
    save_step_checkpoint(tmp_path, 3, _ckpt(3), {"kind": "t"}, keep=3)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step_00000001", "step_00000002", "step_00000003"]


def test_keep_last_n_and_fallback_order(tmp_path):
    for s in range(1, 6):
        save_step_checkpoint(tmp_path, s, _ckpt(s), {"kind": "t"}, keep=2)
    assert _steps(tmp_path) == [4, 5]
    (tmp_path / "checkpoints" / "step_00000005" / "meta.json").write_text("{ not json")
    with pytest.warns(UserWarning, match="step_00000005"):
        tensors, meta, _ = load_latest_checkpoint(tmp_path)
    assert meta["step"] == 4 and tensors["model.w"][0] == 4
    with pytest.raises(ValueError, match="keep"):
        save_step_checkpoint(tmp_path, 6, _ckpt(6), {"kind": "t"}, keep=0)


def test_steps_past_eight_digits_stay_in_order(tmp_path):
    for s in (100_000_000, 99_999_999, 7):
        save_step_checkpoint(tmp_path, s, _ckpt(s % 1000), {"kind": "t"}, keep=2)
    assert _steps(tmp_path) == [99_999_999, 100_000_000]  # rotation keeps the two highest steps
    assert load_latest_checkpoint(tmp_path)[1]["step"] == 100_000_000


_SIGNAL_TWICE = """
import os, signal, sys, time
from dpldm.train.run_folder import StopRequest
stop = StopRequest()
os.kill(os.getpid(), signal.SIGTERM)   # slurmstepd's SIGTERM
time.sleep(float(sys.argv[1]))
os.kill(os.getpid(), signal.SIGTERM)   # the launcher's forwarded SIGTERM, or the user's second one
time.sleep(0.5)
print("still running", stop.signal_name, flush=True)
"""


@pytest.mark.parametrize("gap, survives", [(0.05, True), (StopRequest.COALESCE_S + 0.5, False)])
def test_a_repeated_sigterm_within_the_window_is_one_request(gap, survives):
    """scancel reaches a rank twice (slurmstepd and torchrun), milliseconds apart: one graceful stop.
    A second SIGTERM after the window still stops the process at once."""
    r = subprocess.run([sys.executable, "-c", _SIGNAL_TWICE, str(gap)], capture_output=True, text=True, timeout=60)
    if survives:
        assert r.returncode == 0 and "still running SIGTERM" in r.stdout, (r.returncode, r.stderr[-2000:])
    else:
        assert r.returncode == -signal.SIGTERM and "still running" not in r.stdout
