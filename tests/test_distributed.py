"""dpldm.parallel without spawning ranks: launcher environments, hostfiles, plans, chunking,
DeepSpeed configs, optimizer-state round trips, consolidation, the SLURM script (bash -n and
its dry run). The multi-rank checks are in test_distributed_ranks.py and _launch.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpldm.checkpoint import list_step_checkpoints, load_checkpoint
from dpldm.parallel.env import LaunchError, resolve_launch_env, slurm_port
from dpldm.parallel.plan import PlanError, read_hostfile, resolve_plan
from dpldm.parallel.step import expected_passes
from dpldm.parallel.zero import ZERO_STAGES, ZeroConfigError, load_ds_config, zero_stage
from dpldm.privacy.dp_step import DPStep, World, global_chunks

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "dist_scripts"))
import tiny  # noqa: E402


# -- launcher environments ---------------------------------------------------------------------

def test_env_deepspeed_torchrun_slurm_and_bare():
    base = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    ds = resolve_launch_env({**base, "RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "CROSS_RANK": "1",
                             "LOCAL_SIZE": "2"})
    assert (ds.rank, ds.world_size, ds.local_rank, ds.launcher) == (3, 8, 1, "deepspeed")
    tr = resolve_launch_env({**base, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "TORCHELASTIC_RUN_ID": "x"})
    assert tr.launcher == "torchrun" and tr.master_addr == "10.0.0.1" and tr.master_port == 29500
    sl = resolve_launch_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123",
                             "MASTER_ADDR": "node07"})
    assert (sl.rank, sl.world_size, sl.local_rank, sl.launcher, sl.master_addr) == (5, 16, 1, "slurm", "node07")
    assert sl.master_port == slurm_port("123") == 20123
    # srun + torchrun (one launcher per node): the launcher's RANK wins over SLURM_PROCID (= the node)
    both = resolve_launch_env({**base, "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "RANK": "9", "WORLD_SIZE": "16",
                               "LOCAL_RANK": "1", "TORCHELASTIC_RUN_ID": "x"})
    assert (both.rank, both.world_size) == (9, 16)
    bare = resolve_launch_env({})
    assert (bare.rank, bare.world_size, bare.local_rank, bare.launcher) == (0, 1, 0, "none")
    assert 0 < bare.master_port < 65536
    env = bare.as_environ()
    assert env["RANK"] == "0" and env["WORLD_SIZE"] == "1" and env["MASTER_ADDR"] == "127.0.0.1"


def test_env_errors_are_clear():
    with pytest.raises(LaunchError, match="outside world"):
        resolve_launch_env({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"})
    with pytest.raises(LaunchError, match="MASTER_ADDR"):
        resolve_launch_env({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(LaunchError, match="not an integer"):
        resolve_launch_env({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"})


# -- hostfiles and plans ---------------------------------------------------------------------------

def test_hostfile_example_and_errors(tmp_path):
    assert read_hostfile(ROOT / "launch" / "hosts.example") == [("localhost", 2)]
    good = tmp_path / "hosts"
    good.write_text("# two nodes\nnode01 slots=8\nnode02 slots=4  # smaller\n\n")
    assert read_hostfile(good) == [("node01", 8), ("node02", 4)]
    with pytest.raises(PlanError, match="not found"):
        read_hostfile(tmp_path / "missing")
    for text, msg in (("node01\n", "slots="), ("a slots=x\n", "integer"), ("a slots=1\na slots=2\n", "twice"),
                      ("# nothing\n", "no host"), ("a slots=0\n", ">= 1")):
        good.write_text(text)
        with pytest.raises(PlanError, match=msg):
            read_hostfile(good)


def test_plan_numbers_and_world_size_error():
    c = tiny.cfg(["privacy.physical_batch_size=2"])
    plan = resolve_plan(c, tiny.N, 2, 3, {"total": 100, "trainable": 20, "frozen": 80})
    assert plan["world_size"] == 2 and plan["zero_stage"] == 3
    assert plan["expected_logical_batch"] == pytest.approx(tiny.EXPECTED)
    assert plan["sample_rate"] == pytest.approx(tiny.EXPECTED / tiny.N)
    assert plan["expected_share_per_rank"] == pytest.approx(tiny.EXPECTED / 2)
    assert plan["passes_per_rank_per_step"] == 2  # 6 expected -> 3 chunks of <= 2, dealt to 2 ranks
    assert plan["noise_multiplier"] == 1.0 and plan["epsilon"] > 0
    assert plan["noise_std_on_update"] == pytest.approx(1.0 * tiny.CLIP / tiny.EXPECTED)
    assert plan["frozen_bytes_per_rank_zero3"] == 160 and plan["frozen_bytes_per_rank_zero0"] == 320
    assert plan["warnings"] == []
    idle = resolve_plan(c, tiny.N, 4, 0)
    assert len(idle["warnings"]) == 1 and "physical_batch_size <= 1" in idle["warnings"][0]
    explicit = resolve_plan(tiny.cfg(["privacy.epsilon=5.0"]), 1000, 1, 0)
    assert explicit["noise_multiplier"] == 1.0 and not explicit["sigma_calibrated"]  # sigma wins over the target


# -- chunking: global chunks of the sample, dealt whole to the ranks --------------------------------

class _Loss:
    def __call__(self, model, batch):
        return model(batch).sum(dim=1)


@pytest.mark.parametrize("W", [1, 2, 3, 4])
@pytest.mark.parametrize("phys", [1, 2, 5, 64])
def test_chunks_partition_the_global_sample_independently_of_the_world(W, phys):
    """Every rank's DPStep deals itself chunks r, r+W, ... of the SAME global chunking: the chunks
    are bounded by P, partition the sample, do not depend on W, and every rank runs the same
    number of passes (ZeRO-3 lock-step)."""
    from dpldm.privacy.accountant import PrivacyLedger

    for step in range(4):
        ledgers = [PrivacyLedger.create(num_examples=200, sample_rate=0.13, max_grad_norm=1.0, delta=1e-3,
                                        noise_multiplier=1.0, seed=11) for _ in range(W)]
        steps = [DPStep(torch.nn.Linear(3, 2), _Loss(), led, world=World(r, W, all_reduce_sum=lambda ts: None),
                        physical_batch_size=phys) for r, led in enumerate(ledgers)]
        for led in ledgers:
            for _ in range(step):
                led.step()
        idx = ledgers[0].plan.indices(step)
        reference = global_chunks(idx, phys)  # the chunking of one process
        assert all(c.numel() <= phys for c in reference) and len(reference) == -(-idx.numel() // phys)
        seen, passes = [], set()
        for r, dp in enumerate(steps):
            share = dp.begin_step()
            assert [c.tolist() for c in dp.my_chunks] == [c.tolist() for c in reference[r::W]]
            assert share.tolist() == [i for c in dp.my_chunks for i in c.tolist()]
            passes.add(dp.passes_per_rank)
            seen += share.tolist()
        assert sorted(seen) == idx.tolist() and passes == {-(-len(reference) // W)}


def test_chunks_edge_cases():
    assert global_chunks(torch.zeros(0, dtype=torch.long), 64) == []
    assert [c.tolist() for c in global_chunks(torch.arange(7), 3)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert expected_passes(1, 2, 64) == 1  # rank 1 has nothing: one dummy pass under ZeRO-3
    assert expected_passes(1000, 4, 125) == 2  # 8 chunks over 4 ranks


# -- DeepSpeed configs -------------------------------------------------------------------------------

def test_ds_configs_load_and_validate(tmp_path):
    for s in ZERO_STAGES:
        raw = json.loads((ROOT / "launch" / "ds_configs" / f"zero{s}.json").read_text())
        assert raw["zero_optimization"]["stage"] == s
        cfg = load_ds_config(s, physical_batch_size=16)
        assert zero_stage(cfg) == s and cfg["train_micro_batch_size_per_gpu"] == 16
        assert cfg["gradient_accumulation_steps"] == 1 and "train_batch_size" not in cfg
        assert not any(k.startswith("_") for k in cfg)
    assert load_ds_config(3)["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert zero_stage(load_ds_config(str(ROOT / "launch" / "ds_configs" / "zero2.json"))) == 2
    with pytest.raises(ZeroConfigError, match="stage"):
        load_ds_config(5)
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3}, "optimizer": {"type": "Adam"}}))
    with pytest.raises(ZeroConfigError, match="optimizer"):
        load_ds_config(bad)
    bad.write_text(json.dumps({"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}}))
    with pytest.raises(ZeroConfigError, match="bf16"):
        load_ds_config(bad)
    with pytest.raises(ZeroConfigError, match="not found"):
        load_ds_config(tmp_path / "nope.json")


# -- checkpoint pieces -------------------------------------------------------------------------------

def test_optimizer_state_round_trip_by_name():
    from dpldm.train.dp_state import load_optimizer_tensors, optimizer_tensors

    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.AdamW([a, b], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        (a.sum() ** 2 + (b ** 3).sum()).backward()
        opt.step()
        opt.zero_grad()
    tensors, meta = optimizer_tensors(opt, ["blk.a", "blk.b"])
    assert set(tensors) == {f"opt.blk.{n}.{k}" for n in "ab" for k in ("step", "exp_avg", "exp_avg_sq")}
    json.dumps(meta)  # goes into meta.json
    a2, b2 = torch.nn.Parameter(a.detach().clone()), torch.nn.Parameter(b.detach().clone())
    opt2 = torch.optim.AdamW([a2, b2], lr=1.0)
    load_optimizer_tensors(opt2, ["blk.a", "blk.b"], tensors, meta)
    assert opt2.param_groups[0]["lr"] == 1e-2 and opt2.param_groups[0]["weight_decay"] == 0.1
    for p, q in ((a, a2), (b, b2)):
        (p.sum() * 0 + (p ** 2).sum()).backward()
        (q.sum() * 0 + (q ** 2).sum()).backward()
    opt.step()
    opt2.step()
    torch.testing.assert_close(a2, a, rtol=0, atol=0)
    torch.testing.assert_close(b2, b, rtol=0, atol=0)


def test_consolidate_releases_what_the_run_releases(tmp_path):
    """`launch/train.py --consolidate RUN` rebuilds, from the newest step checkpoint and the init
    model, exactly the model the run released at its end (EMA weights), without the secrets."""
    from dpldm.models.ldm import LatentDiffusion, load_ldm, save_ldm
    from dpldm.train.dp_finetune import FinetuneOptions, release_from_checkpoint, train

    c = tiny.cfg(["privacy.steps=2", "train.checkpoint_every=1", "train.ema_decay=0.5",
                  "privacy.epsilon=1e9", "privacy.accountant=\"rdp\""])
    torch.manual_seed(0)
    save_ldm(tmp_path / "init", LatentDiffusion(c))
    res = train(c, FinetuneOptions(out=tmp_path / "run", init=str(tmp_path / "init"), synthetic_latents=tiny.N))
    released = load_ldm(res["model"]).unet.state_dict()
    out = release_from_checkpoint(tmp_path / "run", tmp_path / "model")
    model = load_ldm(out)  # one process, no DeepSpeed
    for n, t in released.items():
        torch.testing.assert_close(model.unet.state_dict()[n], t, rtol=0, atol=0)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["privacy"]["steps"] == 2 and meta["privacy"]["epsilon"] > 0
    _, ck = load_checkpoint(list_step_checkpoints(tmp_path / "run")[-1])
    for secret in (ck["privacy"]["ledger"]["plan"]["seed"], ck["secrets"]["diffusion_seed"]):
        assert str(secret) not in (out / "meta.json").read_text()  # the seeds stay private
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--consolidate", str(tmp_path / "run"),
                        "--out", str(tmp_path / "model2")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    torch.testing.assert_close(load_ldm(tmp_path / "model2").unet.state_dict(), model.unet.state_dict(), rtol=0, atol=0)


# -- launch scripts --------------------------------------------------------------------------------

def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                    "MASTER_", "TORCHELASTIC"))}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    return env


def test_train_py_dry_run_prints_the_plan():
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--dry-run", "--hostfile",
                        str(ROOT / "launch" / "hosts.example"), "--zero", "3", "--synthetic-latents", str(tiny.N)]
                       + [a for s in tiny.TINY + [f"privacy.expected_batch_size={tiny.EXPECTED}",
                                                  "privacy.physical_batch_size=2", "privacy.noise_multiplier=1.0",
                                                  "privacy.delta=1e-3"] for a in ("--set", s)],
                       capture_output=True, text=True, timeout=300, env=_clean_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    plan = json.loads(r.stdout.split("PLAN_JSON ", 1)[1])
    assert plan["world_size"] == 2 and plan["zero_stage"] == 3 and plan["physical_batch_per_rank"] == 2
    assert plan["expected_logical_batch"] == pytest.approx(tiny.EXPECTED) and plan["steps"] == 100
    for key in ("world_size", "physical_batch_per_rank", "expected_logical_batch", "noise_multiplier", "steps", "epsilon"):
        assert key in r.stdout.split("PLAN_JSON", 1)[0]
    bad = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--dry-run", "--hostfile", "/no/such/hosts",
                          "--synthetic-latents", "100"], capture_output=True, text=True, timeout=300,
                         env=_clean_env(), cwd=ROOT)
    assert bad.returncode == 2 and "hostfile /no/such/hosts not found" in bad.stderr


def test_sbatch_passes_bash_n_and_dry_run_prints_the_plan():
    script = ROOT / "launch" / "slurm" / "finetune.sbatch"
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = script.read_text()
    for needle in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@120", "scontrol show hostnames", "MASTER_ADDR",
                   "MASTER_PORT", "scontrol requeue", "--ntasks-per-node=1"):
        assert needle in text
    env = {**_clean_env(), "DRY_RUN": "1", "NNODES": "3", "PROCS_PER_NODE": "2", "CONFIG": "",
           "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(script), "--synthetic-latents", "600"], capture_output=True, text=True,
                       timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "DRY RUN" in r.stdout and "srun --ntasks-per-node=1" in r.stdout and "torch.distributed.run" in r.stdout
    plan = json.loads(r.stdout.split("PLAN_JSON ", 1)[1])
    assert plan["world_size"] == 6 and plan["zero_stage"] == 3 and plan["num_examples"] == 600
    assert not (ROOT / "runs" / "dpldm-finetune-local").exists()  # a dry run writes nothing
