"""Which launcher started this process, and what rank it is: a pure function of the environment.

    deepspeed launch/train.py ...      RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT (+ --local_rank)
    torchrun ... launch/train.py       the same variables (+ TORCHELASTIC_RUN_ID)
    srun python launch/train.py        SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR/PORT
                                       exported by the sbatch script (else the first host of
                                       SLURM_JOB_NODELIST via `scontrol show hostnames`, and a port
                                       derived from SLURM_JOB_ID)
    python launch/train.py             a single process: rank 0 of 1 on 127.0.0.1, a free port

When a launcher's RANK/WORLD_SIZE are present they win over SLURM's variables: under
`srun torchrun ...` (one launcher per node) SLURM_PROCID is the node, not the rank.
No torch.distributed here, so this module is importable and testable anywhere.
"""
from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from typing import Mapping

from dpldm.errors import InputError

LAUNCHERS = ("deepspeed", "torchrun", "env", "slurm", "none")


class LaunchError(InputError, RuntimeError):
    """The environment describes no consistent set of ranks."""


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # one of LAUNCHERS

    def as_environ(self) -> dict[str, str]:
        """The variables torch.distributed's env:// rendezvous (and DeepSpeed) read."""
        return {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank),
                "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port)}


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise LaunchError(f"environment variable {key}={env[key]!r} is not an integer") from None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def slurm_head_node(nodelist: str) -> str:
    """First host of a SLURM node list ("node[01-04]" -> "node01"), through scontrol."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True,
                             text=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError) as e:
        raise LaunchError(f"cannot expand SLURM_JOB_NODELIST={nodelist!r} with scontrol ({e}); export MASTER_ADDR "
                          "(the sbatch script in launch/slurm does)") from None
    if not out:
        raise LaunchError(f"scontrol returned no host for SLURM_JOB_NODELIST={nodelist!r}")
    return out[0]


def slurm_port(job_id: str | None) -> int:
    """A port every task of one job agrees on without talking: 20000 + job id mod 20000."""
    return 20000 + (int(job_id) % 20000 if job_id and job_id.isdigit() else 9500)


def resolve_launch_env(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """Rank, world size, local rank and rendezvous address from the launcher's variables."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        if "TORCHELASTIC_RUN_ID" in env:
            launcher = "torchrun"
        elif "CROSS_RANK" in env and "LOCAL_SIZE" in env:  # set by deepspeed's per-node launcher
            launcher = "deepspeed"
        else:
            launcher = "env"
        if world > 1 and ("MASTER_ADDR" not in env or "MASTER_PORT" not in env):
            raise LaunchError(f"RANK={rank} WORLD_SIZE={world} are set but MASTER_ADDR/MASTER_PORT are not")
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else free_port()
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env and _int(env, "SLURM_NTASKS") > 1:
        rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
        local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        launcher = "slurm"
        addr = env.get("MASTER_ADDR") or slurm_head_node(env.get("SLURM_JOB_NODELIST", ""))
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else slurm_port(env.get("SLURM_JOB_ID"))
    else:
        rank, world, local, launcher = 0, 1, 0, "none"
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else free_port()
    if world < 1:
        raise LaunchError(f"world size must be >= 1, got {world}")
    if not (0 <= rank < world):
        raise LaunchError(f"rank {rank} outside world of size {world}")
    if local < 0:
        raise LaunchError(f"local rank must be >= 0, got {local}")
    if not (0 < port < 65536):
        raise LaunchError(f"MASTER_PORT={port} is not a TCP port")
    return LaunchEnv(rank, world, local, addr, port, launcher)
