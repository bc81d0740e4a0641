"""Real clusters (marked `cluster`, run by `.ci/run` and required there): a two-node Slurm cluster
(tests/cluster/slurm.sh) and two ssh nodes in network namespaces (tests/cluster/nodes.sh), both
brought up here and taken down at the end, also when a test fails half-way.

1. The README's multi-node command, `deepspeed --hostfile hosts launch/train.py --config
   configs/X.toml --zero 3 --out RUN` (read from README.md; only the three paths are filled in and
   the smoke-run flags appended), launched on node1 with DeepSpeed's default pdsh/ssh runner (no
   --no_ssh): one rank on each node, ZeRO-3 over gloo across the veth link. Its final weights,
   EMA, scheduler and privacy ledger equal a one-process run of the same recipe (the tolerance of
   tests/test_trainer_equivalence.py: the runs are seeded, train.deterministic + --not-private).
2. `sbatch -N 2 launch/slurm/finetune.sbatch` (torchrun on each node, ZeRO-3): Slurm's own
   `--signal=B:USR1@59` (with --time=1) stops it with a checkpoint, the script requeues the job
   (SLURM_RESTART_COUNT=1), the requeued job resumes and finishes: final state equal to the
   one-process run. `scancel` of a running job: the ranks checkpoint, the job is not requeued
   (CANCELLED, Restarts=0), nothing is left running and nothing is released.
3. Faults on the ssh nodes: the link between the nodes cut (veth down) after step 5, then (resumed
   from step 4) the rank on node2 killed after step 9: each time the job ends with ONE clear line (launch/train.py: error: rank 0
   of 2 lost the process group in logical step k ...) within the collective timeout, no model is
   published, the privacy journal holds every executed step, and the same command resumes; the
   last resume finishes and accounts the re-executed steps.
Needs root with CAP_NET_ADMIN and CAP_SYS_ADMIN (and apt-get, or the packages installed); skipped
with the reason elsewhere, unless DPLDM_REQUIRE_CLUSTER=1 (CI), where they must run.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "tests" / "cluster"
sys.path.insert(0, str(ROOT / "tests" / "dist_scripts"))
import tiny  # noqa: E402

STEPS = 60  # long enough that Slurm's time-limit signal (1-31 s after the start) lands mid-training
FAULT_STEPS = 12
SMOKE = ["--random-init", "--synthetic-latents", "24", "--not-private"]
COLLECTIVE_TIMEOUT = 15  # seconds: how long the ranks wait on a cut link
SETTINGS = tiny.TINY + ["train.deterministic=true", "train.seed=5", "privacy.epsilon=1e6",
                        "privacy.expected_batch_size=6", "privacy.noise_multiplier=0.8", "privacy.delta=1e-3",
                        "privacy.physical_batch_size=2", "train.log_every=1", "train.checkpoint_every=4",
                        "train.lr=1e-2"]


def _why_unavailable() -> str | None:
    if sys.platform != "linux":
        return "Linux only"
    if os.geteuid() != 0:
        return "needs root (network namespaces, sshd, Slurm daemons)"
    caps = int(next(ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("CapEff")), 16)
    if not (caps >> 12) & 1 or not (caps >> 21) & 1:
        return "needs CAP_NET_ADMIN and CAP_SYS_ADMIN (network and mount namespaces)"
    needed = ("slurmctld", "slurmd", "munged", "sshd", "pdsh", "nsenter", "ip")
    if shutil.which("apt-get") is None and not all(shutil.which(b) or Path(f"/usr/sbin/{b}").exists() for b in needed):
        return "needs apt-get, or slurmctld/slurmd/munge/openssh-server/pdsh installed"
    return None


UNAVAILABLE = _why_unavailable()
REQUIRED = os.environ.get("DPLDM_REQUIRE_CLUSTER") == "1"
pytestmark = [pytest.mark.cluster, pytest.mark.slow,
              pytest.mark.skipif(UNAVAILABLE is not None and not REQUIRED, reason=f"cluster tests: {UNAVAILABLE}")]


def _sh(*cmd: str, timeout: float = 300, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), capture_output=True, text=True, errors="replace", timeout=timeout, env=env, cwd=ROOT)
    if check and r.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def _leftovers() -> list[str]:
    """Anything the cluster scripts start, still running."""
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()[1:]
    names = ("slurmctld", "slurmd", "munged", "/dpldm-cluster/", "sshd -D -f")
    procs = [ln.strip() for ln in ps if any(n in ln for n in names) and "ps -eo" not in ln
             and "<defunct>" not in ln]  # an exited daemon not yet reaped by PID 1 holds nothing
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return procs + [f"netns {ln.split()[0]}" for ln in netns.splitlines() if ln.startswith("dpldm-")]


def _write_recipe(path: Path, steps: int) -> Path:
    """The smoke recipe as a TOML file (what a user passes with --config)."""
    sections: dict[str, list[str]] = {}
    for item in SETTINGS + [f"privacy.steps={steps}"]:
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        try:
            json.loads(value)
        except json.JSONDecodeError:
            value = json.dumps(value)  # a bare string: privacy.backend=torch
        sections.setdefault(section, []).append(f"{name} = {value}")
    path.write_text("".join(f"[{s}]\n" + "\n".join(lines) + "\n\n" for s, lines in sections.items()))
    return path


def _results(text: str) -> list[dict]:
    return [json.loads(ln.split("RESULT_JSON ", 1)[1]) for ln in text.splitlines() if "RESULT_JSON " in ln]


def _final(run: Path, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    from dpldm.checkpoint import load_latest_checkpoint

    tensors, meta, _ = load_latest_checkpoint(run)
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, meta


def _assert_same_run(out: Path, ref: Path) -> None:
    """Final weights, EMA, scheduler and privacy ledger of `out` equal the reference run's."""
    for prefix in ("train.", "ema."):
        got, meta = _final(out, prefix)
        want, ref_meta = _final(ref, prefix)
        assert set(got) == set(want) and got
        for k, v in want.items():
            torch.testing.assert_close(got[k], v, rtol=0, atol=1e-5, msg=lambda m: f"{prefix}{k}: {m}")
    assert meta["privacy"]["ledger"] == ref_meta["privacy"]["ledger"]
    assert meta["scheduler"] == ref_meta["scheduler"]


def _journal(run: Path) -> list[int]:
    from dpldm.privacy.journal import PrivacyJournal

    return [r["step"] for r in PrivacyJournal(run).records()]


# -- the clusters --------------------------------------------------------------------------------------

class Cluster:
    def __init__(self, script: str) -> None:
        self.script = str(CLUSTER / script)

    def up(self) -> None:
        if UNAVAILABLE:
            pytest.fail(f"cluster tests are required here (DPLDM_REQUIRE_CLUSTER=1) but cannot run: {UNAVAILABLE}")
        r = _sh("bash", self.script, "up", timeout=600)
        print(r.stdout.strip())

    def down(self) -> None:
        _sh("bash", self.script, "down", timeout=120)


@pytest.fixture(scope="module")
def clusters():
    """Both clusters up for the module; down afterwards whatever happened, and nothing left running."""
    nodes, slurm = Cluster("nodes.sh"), Cluster("slurm.sh")
    try:
        nodes.up()
        slurm.up()
        yield nodes, slurm
    finally:
        nodes.down()
        slurm.down()
        left = _leftovers()
        assert not left, f"left running after down: {left}"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    # under /tmp (shared by the nodes, like a cluster's shared file system), outside the repository
    return tmp_path_factory.mktemp("cluster")


@pytest.fixture(scope="module")
def reference(work) -> Path:
    """The uninterrupted one-process run of the recipe (no DeepSpeed, no launcher)."""
    out = work / "reference"
    recipe = _write_recipe(work / "recipe.toml", STEPS)
    r = _sh(sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(recipe), "--out", str(out), *SMOKE,
            timeout=600, env=_env())
    res = _results(r.stdout)[-1]
    assert res["finished"] and res["steps_done"] == STEPS and res["world_size"] == 1
    return out


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "TORCHELASTIC", "PYTEST"))}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline",
                "TORCH_EXTENSIONS_DIR": env.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions")),
                **extra})
    return env


# -- 1. the README's multi-node command on two ssh nodes -------------------------------------------------

def _readme_command() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"`(deepspeed --hostfile hosts launch/train\.py --config configs/X\.toml [^`]*--out RUN)`", text)
    assert m, "README.md no longer shows the multi-node command `deepspeed --hostfile hosts launch/train.py ...`"
    return m.group(1)


def _node1_launch(work: Path, out: Path, steps: int, extra: str = "") -> subprocess.Popen:
    """The README's command, started on node1 as a user would (venv on PATH, in the repository)."""
    (work / "hosts").write_text("node1 slots=1\nnode2 slots=1\n")
    # DeepSpeed forwards only some variables to the remote ranks: the rest go through DS_ENV_FILE
    (work / "ds_env").write_text(f"TORCH_EXTENSIONS_DIR={_env()['TORCH_EXTENSIONS_DIR']}\nWANDB_MODE=offline\n"
                                 "OMP_NUM_THREADS=1\n")
    recipe = _write_recipe(work / f"recipe_{steps}.toml", steps)
    cmd = (_readme_command().replace("--hostfile hosts", f"--hostfile {work / 'hosts'}")
           .replace("configs/X.toml", str(recipe)).replace("--out RUN", f"--out {out}"))
    assert "--no_ssh" not in cmd
    cmd += " " + " ".join(shlex.quote(a) for a in SMOKE) + f" --collective-timeout {COLLECTIVE_TIMEOUT} {extra}"
    shell = f"cd {ROOT} && export PATH={Path(sys.executable).parent}:$PATH DS_ENV_FILE={work / 'ds_env'} && {cmd}"
    return subprocess.Popen(["bash", str(CLUSTER / "nodes.sh"), "exec", "node1", "--", "bash", "-c", shell],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", cwd=ROOT, env=_env(),
                            start_new_session=True)


def _follow(proc: subprocess.Popen, timeout: float, when: str | None = None, then=None) -> str:
    """Read the output to the end; the first time a line contains `when`, call `then()`."""
    lines, fired, deadline = [], False, time.time() + timeout
    try:
        for line in proc.stdout:
            lines.append(line)
            if when and not fired and when in line:
                fired = True
                then()
            if time.time() > deadline:
                raise TimeoutError
        proc.wait(timeout=60)
    except (TimeoutError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"timed out after {timeout} s:\n" + "".join(lines)[-6000:])
    if when:
        assert fired, f"never saw {when!r}:\n" + "".join(lines)[-4000:]
    return "".join(lines)


def test_readme_multinode_command_on_two_ssh_nodes(clusters, work, reference):
    out = work / "ssh_run"
    log = _follow(_node1_launch(work, out, STEPS), timeout=600)
    assert "--no_ssh" not in log
    res = _results(log)
    assert res and res[-1]["finished"] and res[-1]["steps_done"] == STEPS and res[-1]["world_size"] == 2, log[-4000:]
    assert "Running on the following workers: node1,node2" in log  # DeepSpeed's pdsh runner, over ssh
    assert "2 rank(s) via deepspeed, gloo, ZeRO stage 3" in log
    assert re.search(r"^node2: .*exits successfully", log, re.M) and re.search(r"^node1: .*exits successfully", log, re.M)
    _assert_same_run(out, reference)
    assert (out / "model" / "meta.json").is_file()
    print(f"ssh nodes: {res[-1]['world_size']} ranks on node1+node2, {res[-1]['steps_done']} steps, "
          f"epsilon_if_noise_were_secret {res[-1]['privacy']['epsilon_if_noise_were_secret']:.4f}")


# -- 2. Slurm: sbatch, its own time-limit signal, requeue, resume; scancel -----------------------------------

def _slurm_env(work: Path, out: Path, steps: int) -> dict[str, str]:
    return _env(SLURM_CONF=f"{os.environ.get('DPLDM_CLUSTER_DIR', '/tmp/dpldm-cluster')}/slurm/slurm.conf",
                CONFIG=str(_write_recipe(work / f"recipe_{steps}.toml", steps)), ZERO="3", OUT=str(out),
                PROCS_PER_NODE="1", LAUNCHER="torchrun", PYTHON=sys.executable)


def _job(job: str, env: dict) -> dict[str, str]:
    text = _sh("scontrol", "show", "job", job, "-o", env=env).stdout
    return dict(kv.split("=", 1) for kv in text.split() if "=" in kv)


def _read_log(path: Path) -> str:
    """A Slurm output file: both nodes' ranks append to it, so a progress bar's multi-byte character can
    be split by another rank's line (not UTF-8 there): read it replacing such bytes."""
    return path.read_text(errors="replace")


def _slurm_diagnostics(job: str, env: dict, log_file: Path) -> str:
    """What a failed Slurm test needs to be understood from CI's output alone: the job record, the
    batch log's tail and the daemons' logs about this job."""
    state = Path(env["SLURM_CONF"]).parent
    parts = [_sh("scontrol", "show", "job", job, env=env, check=False).stdout,
             "--- batch log (tail) ---\n" + (_read_log(log_file)[-4000:] if log_file.exists() else "(none)")]
    for daemon_log in sorted((state / "log").glob("slurm*.log")):
        lines = daemon_log.read_text(errors="replace").splitlines()
        mine = [ln for ln in lines if f"JobId={job}" in ln or f"job {job}" in ln or f"job_id {job}" in ln
                or "error" in ln.lower()]
        parts.append(f"--- {daemon_log.name} (lines naming job {job} or an error, last 40) ---\n"
                     + "\n".join(mine[-40:]))
    return "\n".join(parts)


def _sbatch(env: dict, out_file: Path, *opts: str) -> str:
    r = _sh("sbatch", "--parsable", "-N", "2", f"--output={out_file}", f"--chdir={ROOT}", *opts,
            str(ROOT / "launch" / "slurm" / "finetune.sbatch"), *SMOKE, env=env)
    return r.stdout.strip().split(";")[0]


def test_sbatch_on_two_slurm_nodes_stops_on_slurms_signal_requeues_and_resumes(clusters, work, reference):
    out, log_file = work / "slurm_run", work / "slurm.out"
    env = _slurm_env(work, out, STEPS)
    job = _sbatch(env, log_file, "--time=1", "--signal=B:USR1@59")
    deadline, released = time.time() + 420, False
    while True:
        info = _job(job, env)
        if info["JobState"] == "PENDING" and info.get("Restarts", "0") == "1" and not released:
            # a requeued job waits cred_expire (Reason=BeginTime; 10 s on the test cluster, 120 s by default) and
            # must not start sooner: a slurmd still refuses its revoked credential ("Job credential revoked", the job
            # FAILS). An admin (here: the test) gives the resumed job more time than the first one had.
            _sh("scontrol", "update", f"JobId={job}", "TimeLimit=10", env=env)
            released = True
        if info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            break
        if time.time() > deadline:
            _sh("scancel", job, env=env, check=False)
            pytest.fail(f"job {job} still {info['JobState']} after 420 s:\n{_slurm_diagnostics(job, env, log_file)}")
        time.sleep(1)
    log = _read_log(log_file)
    if not (info["JobState"] == "COMPLETED" and info.get("Restarts") == "1"):
        pytest.fail(f"job {job} ended {info['JobState']} (Restarts={info.get('Restarts')}, released={released}), "
                    f"expected COMPLETED after one requeue:\n{_slurm_diagnostics(job, env, log_file)}")
    assert f"job {job} (restart 0), 2 node(s) [n1 n2] x 1 rank(s) = 2" in log
    assert f"job {job} (restart 1), 2 node(s) [n1 n2] x 1 rank(s) = 2" in log
    assert "USR1 received" in log, "Slurm's --signal did not reach the batch script before the run ended:\n" + log[-4000:]
    first, last = _results(log)[0], _results(log)[-1]
    assert not first["finished"] and first["stop_reason"] == "STOP" and 1 <= first["steps_done"] < STEPS, log[-4000:]
    assert last["finished"] and last["steps_done"] == STEPS and last["world_size"] == 2
    step_dir = out / "checkpoints" / f"step_{first['steps_done']:08d}"
    assert f"resumed from {step_dir}" in log
    assert "2 rank(s) via torchrun, gloo, ZeRO stage 3" in log
    assert _journal(out) == list(range(1, STEPS + 1))  # every step executed once: a clean stop re-runs nothing
    _assert_same_run(out, reference)
    eps = re.findall(r"epsilon spent ([0-9.]+)", log)
    print(f"slurm: job {job} nodes n1,n2, stopped by USR1 after {first['steps_done']} steps, restart 1, "
          f"finished {last['steps_done']}; epsilon at the stop {eps[0] if eps else '?'} -> end "
          f"{last['privacy']['epsilon_if_noise_were_secret']:.4f} (noise treated as secret)")


def test_scancel_stops_a_running_job_cleanly(clusters, work):
    out, log_file = work / "cancelled", work / "cancelled.out"
    env = _slurm_env(work, out, FAULT_STEPS)
    job = _sbatch(env, log_file, "--time=10")
    deadline, cancelled = time.time() + 300, False
    while True:
        log = _read_log(log_file) if log_file.exists() else ""
        if not cancelled and "step 2:" in log:
            _sh("scancel", job, env=env)
            cancelled = True
        info = _job(job, env)
        if cancelled and info["JobState"] not in ("RUNNING", "COMPLETING", "PENDING"):
            break
        assert info["JobState"] not in ("COMPLETED", "FAILED"), (info, log[-4000:])
        if time.time() > deadline:
            _sh("scancel", "--signal=KILL", job, env=env, check=False)
            pytest.fail(f"job {job}: {info['JobState']} after 300 s:\n{log[-6000:]}")
        time.sleep(0.5)
    time.sleep(2)
    log = _read_log(log_file)
    assert info["JobState"] == "CANCELLED" and info.get("Restarts", "0") == "0", info
    assert "stopped by SIGTERM" in log and "not requeued here" in log, log[-4000:]
    stopped = [r for r in _results(log) if not r["finished"]]
    assert stopped and stopped[-1]["stop_reason"] in ("SIGTERM", "STOP"), log[-4000:]
    assert not (out / "model").exists()  # nothing released
    ps = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    assert not ps, f"processes of the cancelled job still running: {ps}"
    from dpldm.checkpoint import checkpoint_step, list_step_checkpoints

    steps = [checkpoint_step(p) for p in list_step_checkpoints(out)]
    assert steps and max(steps) >= 2 and _journal(out) == list(range(1, max(steps) + 1)), (steps, _journal(out))
    print(f"scancel: job {job} CANCELLED after step {max(steps)} (checkpoint), not requeued, nothing left running")


# -- 3. faults on the ssh nodes -------------------------------------------------------------------------

def _peer_failure_line(log: str) -> str:
    lines = [ln for ln in log.splitlines() if "launch/train.py: error: rank 0 of 2 lost the process group" in ln]
    assert len(lines) == 1, log[-6000:]
    return lines[0]


def test_link_cut_and_killed_rank_end_with_one_line_and_resume(clusters, work):
    out = work / "faults"

    # (a) the link between the nodes goes down after step 5 (checkpoints every 4 steps: one at step 4)
    t_cut = []

    def cut():
        _sh("ip", "-n", "dpldm-node1", "link", "set", "dpldm-v1", "down")
        t_cut.append(time.time())

    log = _follow(_node1_launch(work, out, FAULT_STEPS), timeout=300, when="step 5:", then=cut)
    waited = time.time() - t_cut[0]
    _sh("ip", "-n", "dpldm-node1", "link", "set", "dpldm-v1", "up")
    line = _peer_failure_line(log)
    assert f"Timed out waiting {COLLECTIVE_TIMEOUT * 1000}ms" in line and "Nothing was released" in line
    assert waited < COLLECTIVE_TIMEOUT + 30, waited
    assert not (out / "model").exists()
    executed_a = _journal(out)
    assert executed_a == list(range(1, len(executed_a) + 1)) and len(executed_a) >= 5
    assert "keeps checkpoint step 4" in line
    assert f"privacy journal's {len(executed_a)} executed step(s)" in line
    print(f"link cut after step 5: ended {waited:.0f} s later: {line.split('node1: ', 1)[-1][:160]}")

    # (b) resume from step 4; the rank on node2 is killed after step 9 (checkpoint at step 8)
    def kill_node2_rank():
        _sh("bash", str(CLUSTER / "nodes.sh"), "exec", "node2", "--", "pkill", "-9", "-f", "--", "-u launch/train.py")

    log = _follow(_node1_launch(work, out, FAULT_STEPS), timeout=300, when="step 9:", then=kill_node2_rank)
    assert f"resumed from {out / 'checkpoints' / 'step_00000004'}" in log
    line = _peer_failure_line(log)
    assert "Nothing was released" in line and "keeps checkpoint step 8" in line and not (out / "model").exists()
    executed_b = _journal(out)
    assert len(executed_b) > len(executed_a) and f"privacy journal's {len(executed_b)} executed step(s)" in line
    print(f"rank on node2 killed after step 9: {line.split('node1: ', 1)[-1][:160]}")

    # (c) the same command finishes the run, every executed step accounted
    log = _follow(_node1_launch(work, out, FAULT_STEPS), timeout=300)
    assert f"resumed from {out / 'checkpoints' / 'step_00000008'}" in log
    res = _results(log)[-1]
    assert res["finished"] and res["steps_done"] == FAULT_STEPS and (out / "model" / "meta.json").is_file()
    executed = _journal(out)
    assert sorted(set(executed)) == list(range(1, FAULT_STEPS + 1))
    assert res["privacy"]["executed_steps"] == len(executed) > FAULT_STEPS
    print(f"resumed to the end: {FAULT_STEPS} steps, {len(executed)} executions journalled and accounted")
