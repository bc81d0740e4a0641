"""Multi-rank checks on CPU over gloo, against single-process references.

`tests/dist_scripts/dp_checks.py` runs once with 1 rank and once with 2 ranks (torchrun), each
~10-20 s on two cores; the tests below read what it saved:
  * one noise-free DP step on W ranks == one process on the same logical batch (1e-5), ZeRO 0
    and 3 (the reference: a plain UNet, one autograd gradient per example, clip, sum, / q*N);
  * the aggregated noise has per-coordinate std sigma*C/(q*N) within 5% for W = 1 and 2, and
    the same measurement with noise added on every rank is off by sqrt(W) (the test has power);
  * under ZeRO-3 each rank stores ~1/W of every frozen parameter (ds_tensor vs ds_numel), the
    frozen tensors are released after the step, the trainable ones are whole plain tensors, and
    the state dict gathered from the partitions equals the single-process model;
  * the autoencoder built under ZeRO-3 encodes like the single-process one.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "dist_scripts"))
import tiny  # noqa: E402

TIMEOUT = 420


def spawn(cmd: list[str], timeout: float = TIMEOUT, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a multi-process command in its own process group; on timeout kill that group (and only
    it) so a deadlocked collective cannot hang the suite."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env=env or rank_env(), start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:6])}... timed out after {timeout}s (deadlock?)\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def rank_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                    "MASTER_", "TORCHELASTIC", "CROSS_", "LOCAL_SIZE"))}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", **extra})
    return env


def torchrun(nproc: int, script: list[str]) -> list[str]:
    from dpldm.parallel.env import free_port

    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port())] + script


@pytest.fixture(scope="module", params=[1, 2], ids=["W1", "W2"])
def checks(request, tmp_path_factory):
    W = request.param
    out = tmp_path_factory.mktemp(f"dp_checks_w{W}")
    r = spawn(torchrun(W, [str(ROOT / "tests" / "dist_scripts" / "dp_checks.py"), str(out)]))
    assert r.returncode == 0, r.stdout[-6000:]
    res = json.loads((out / f"results_w{W}.json").read_text())
    return W, out, res


@pytest.fixture(scope="module")
def reference():
    c = tiny.cfg()
    state = tiny.init_state(c)
    update, norms = tiny.reference_update(c, state)
    return c, state, update, norms


@pytest.mark.parametrize("stage", [0, 3])
def test_noise_free_step_matches_single_process(checks, reference, stage):
    W, out, res = checks
    c, state, update, norms = reference
    assert any(n > tiny.CLIP for n in norms) and any(n < tiny.CLIP for n in norms), norms  # clipping matters
    got = torch.load(out / f"params_zero{stage}_w{W}.pt")
    assert set(got) == set(update)
    biggest = max(u.abs().max().item() for u in update.values())
    assert biggest > 1e-3  # the update is far above the tolerance: a wrong one cannot pass
    for n, u in update.items():
        torch.testing.assert_close(got[n], state[n] - u, rtol=0, atol=1e-5, msg=lambda m: f"{n}: {m}")
    info = res["stages"][str(stage)]
    assert info["ledger_steps"] == 1
    counts = info["counts"]
    assert len(counts) == W and len({c["passes"] for c in counts}) == 1  # equal passes on every rank
    assert sum(c["share"] for c in counts) == counts[0]["global"] == len(tiny_indices())  # shares partition it


def tiny_indices():
    from dpldm.privacy.sampler import PoissonPlan

    return PoissonPlan(tiny.N, tiny.EXPECTED / tiny.N, tiny.SAMPLING_SEED).indices(0).tolist()


@pytest.mark.parametrize("stage", [0, 3])
def test_noise_drawn_once_per_step_on_rank_zero_only(checks, stage):
    W, _, res = checks
    assert res["stages"][str(stage)]["noise_draws"] == [1] + [0] * (W - 1)


def test_aggregated_noise_std_is_sigma_c_over_qn(checks):
    W, _, res = checks
    nz = res["stages"]["3"]["noise"]
    expected = 1.0 * tiny.CLIP / tiny.EXPECTED
    assert nz["expected_std"] == pytest.approx(expected)
    assert nz["coords"] > 50_000  # enough coordinates for a 5% check (std error ~0.3%)
    assert abs(nz["std"] / expected - 1) < 0.05, nz
    assert abs(nz["mean"]) < 5 * expected / nz["coords"] ** 0.5
    # noise on every rank: std * sqrt(W) -- a per-rank implementation fails the 5% check for W = 2
    ratio = nz["std_every_rank"] / expected
    assert abs(ratio - W ** 0.5) < 0.05 * W ** 0.5, nz
    if W == 2:
        assert abs(ratio - 1) > 0.3


def test_zero3_partitions_frozen_parameters(checks, reference):
    W, out, res = checks
    c, state, update, _ = reference
    info = res["stages"]["3"]
    parts = info["partitions"]
    frozen = [p for p in parts if not p["trainable"]]
    trainable = [p for p in parts if p["trainable"]]
    assert frozen and trainable
    for p in frozen:
        assert p["partitioned"], p
        assert p["local_numel"] == -(-p["numel"] // W), p  # ceil(numel / W): about 1/W of every tensor
    for p in trainable:
        assert not p["partitioned"] and p["local_numel"] == p["numel"], p  # whole and replicated
    assert not info["trainable_are_zero_params"]
    assert info["frozen_released_after_step"] and info["frozen_released_after_gather"]
    fb = info["frozen_bytes"]
    assert fb["full"] == 4 * sum(p["numel"] for p in frozen)
    assert abs(fb["local"] - fb["full"] / W) <= 4 * len(frozen)
    # the whole model gathered from the partitions == init frozen weights + trained attention weights
    full = torch.load(out / f"full_state_zero3_w{W}.pt")
    assert set(full) == set(state)
    for k, v in state.items():
        want = v - update[k] if k in update else v
        torch.testing.assert_close(full[k], want, rtol=0, atol=1e-5, msg=lambda m: f"{k}: {m}")


def test_zero3_autoencoder_matches_single_process(checks, reference):
    W, out, res = checks
    c = reference[0]
    from dpldm.models.autoencoder import Autoencoder

    ae = Autoencoder(c.autoencoder)
    ae.load_state_dict(tiny.ae_state(c))
    saved = torch.load(out / f"ae_w{W}.pt")
    with torch.no_grad():
        z = ae.encode(saved["x"]).mode()
    torch.testing.assert_close(saved["z"], z, rtol=1e-5, atol=1e-5)
    for p in res["autoencoder"]["partitions"]:
        assert p["partitioned"] and p["local_numel"] == -(-p["numel"] // W)
    assert res["autoencoder"]["released"]


def test_zero3_lockstep_with_an_empty_share(checks, reference):
    """A global sample of one example: under ZeRO-3 the rank with nothing to do runs one discarded
    dummy pass (without it the other rank's parameter all-gathers would deadlock), and the update
    is still exactly the single-process one."""
    W, out, res = checks
    c, state, _, _ = reference
    info = res["lockstep"]
    counts = info["counts"]
    assert all(k["global"] == 1 and k["passes"] == 1 for k in counts)
    assert [k["chunks"] for k in counts] == [1] + [0] * (W - 1)
    assert [k["share"] for k in counts] == [1] + [0] * (W - 1)
    assert [k["dummies"] for k in counts] == [0] + [1] * (W - 1)
    update, _ = tiny.reference_update(tiny.cfg(["privacy.expected_batch_size=1"]), state, step=info["step"], expected=1)
    got = torch.load(out / f"params_lockstep_w{W}.pt")
    assert max(u.abs().max().item() for u in update.values()) > 1e-3
    for n, u in update.items():
        torch.testing.assert_close(got[n], state[n] - u, rtol=0, atol=1e-5, msg=lambda m: f"{n}: {m}")
