"""Process-group set-up and the few collectives the DP step needs.

`init_distributed()` works the same under `deepspeed`, `torchrun`, `srun` and a bare `python`
(see `env.py`): it exports the rendezvous variables, picks NCCL when this rank has a GPU and gloo
otherwise, and calls `deepspeed.init_distributed`. It returns a `DistContext`, which the rest of
the code passes around instead of calling torch.distributed itself.

The DP reduction (design card, "The DP-SGD engine"): each rank sums its clipped per-example
gradients, ONE rank (rank 0, `is_noise_rank`) adds the step's Gaussian noise to its local sum,
and `all_reduce_sum` adds the W local sums. The reduced sum therefore carries the noise exactly
once, whatever W is. Why noise on one rank before the sum rather than noise drawn after it and
broadcast: one collective per step instead of two, and the noise never has to be reproducible
on another rank, so it can come from the OS or a CSPRNG on that rank alone (a shared noise seed
would put every rank -- and anyone who reads its memory -- in a position to subtract the noise).
All ranks then divide by the public q*N and take the same optimizer step; `assert_replicas_equal`
checks that the trainable parameters are bit-identical across ranks.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch

from dpldm.parallel.env import LaunchEnv, LaunchError, resolve_launch_env

BACKENDS = ("auto", "gloo", "nccl")


class ReplicaMismatchError(RuntimeError):
    """Tensors that must be identical on every rank differ."""


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = "none"  # gloo | nccl | none (no process group)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    launcher: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return self.backend != "none"

    def _dist(self):
        import torch.distributed as dist

        return dist

    # -- collectives --------------------------------------------------------------------------
    def barrier(self) -> None:
        if self.world_size > 1:
            self._dist().barrier()

    def all_reduce_sum(self, tensors: Sequence[torch.Tensor]) -> None:
        """In place: every tensor becomes the SUM over ranks. Tensors of one dtype/device are
        flattened into one buffer, so a step costs one collective per dtype."""
        if self.world_size == 1 or not tensors:
            return
        dist = self._dist()
        groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for t in tensors:
            groups.setdefault((t.dtype, t.device), []).append(t)
        for ts in groups.values():
            flat = torch.cat([t.reshape(-1) for t in ts])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for t in ts:
                n = t.numel()
                t.copy_(flat[offset:offset + n].view_as(t))
                offset += n

    def all_reduce_max_int(self, value: int) -> int:
        """The maximum of an integer over ranks (e.g. "a stop signal arrived somewhere")."""
        if self.world_size == 1:
            return int(value)
        dist = self._dist()
        t = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """`obj` from rank `src` on every rank (pickled; for metadata and small state)."""
        if self.world_size == 1:
            return obj
        box = [obj if self.rank == src else None]
        self._dist().broadcast_object_list(box, src=src, device=self.device if self.backend == "nccl" else None)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        self._dist().all_gather_object(out, obj)
        return out

    def broadcast_tensors(self, tensors: Sequence[torch.Tensor], src: int = 0) -> None:
        """In place: every rank's tensors take rank `src`'s values."""
        if self.world_size == 1:
            return
        dist = self._dist()
        for t in tensors:
            buf = t.data if t.is_contiguous() else t.data.contiguous()
            dist.broadcast(buf, src=src)
            if buf is not t.data:
                t.data.copy_(buf)

    def on_main(self, fn: Callable[[], Any], *, share: bool = True) -> Any:
        """Collective: run `fn()` on rank 0 only; its result reaches every rank (`share`), and an
        error raised there is raised on every rank (an input error stays an input error, so each
        rank prints one line and exits 2 instead of hanging in the next collective)."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
                error = e
        self.raise_everywhere(error)
        return self.broadcast_object(result) if share else result

    def raise_everywhere(self, error: BaseException | None) -> None:
        """Collective: when rank 0 hit `error`, raise it there and an error with its message elsewhere."""
        from dpldm.errors import InputError, UserError

        msg = self.broadcast_object(None if error is None else (isinstance(error, InputError), str(error)))
        if msg is None:
            return
        if self.is_main:
            raise error
        is_input, text = msg
        raise UserError(text) if is_input else RuntimeError(f"rank 0 failed: {text}")

    # -- the DP engine's view of the world -------------------------------------------------------
    def world(self):
        """A `dpldm.privacy.dp_step.World`: SUM all-reduce and rank 0 as the one noise rank."""
        from dpldm.privacy.dp_step import World

        return World(rank=self.rank, world_size=self.world_size, all_reduce_sum=self.all_reduce_sum,
                     is_noise_rank=lambda: self.rank == 0)

    def assert_replicas_equal(self, named: dict[str, torch.Tensor] | Sequence[tuple[str, torch.Tensor]],
                              what: str = "trainable parameters") -> str:
        """Raise ReplicaMismatchError naming the first tensor whose bytes differ between ranks;
        returns the common digest."""
        items = list(named.items()) if isinstance(named, dict) else list(named)
        digests = [hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
                   if t.dtype != torch.bfloat16 else
                   hashlib.sha256(t.detach().cpu().float().contiguous().numpy().tobytes()).hexdigest()[:16]
                   for _, t in items]
        total = hashlib.sha256("".join(digests).encode()).hexdigest()[:16]
        everyone = self.all_gather_object((total, digests))
        if any(d[0] != total for d in everyone):
            for k, (name, _) in enumerate(items):
                values = {d[1][k] for d in everyone}
                if len(values) > 1:
                    raise ReplicaMismatchError(f"{what}: '{name}' differs between ranks (digests {sorted(values)}); "
                                               "the replicas have diverged")
            raise ReplicaMismatchError(f"{what}: the set of tensors differs between ranks")
        return total

    def close(self) -> None:
        if self.backend != "none":
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.backend = "none"


def _pick_backend(requested: str, device: torch.device) -> str:
    if requested not in BACKENDS:
        raise LaunchError(f"backend must be one of {BACKENDS}, got {requested!r}")
    backend = requested if requested != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise LaunchError("backend 'nccl' needs this rank on a GPU (--device cuda or auto with a GPU); use gloo on CPU")
    return backend


def init_distributed(backend: str = "auto", timeout_s: float = 1800.0, env: LaunchEnv | None = None,
                     device: str = "auto") -> DistContext:
    """Join (or create) the process group described by the launcher's environment.

    `device` (auto|cpu|cuda[:N]): auto puts rank r on its node's GPU `local_rank` when there is
    one (NCCL), else on the CPU (gloo). A single process without a launcher gets a one-rank group
    too (tests of the multi-rank machinery). Calling it twice returns a context for the existing
    group. (`dpldm.train.dp_finetune` never calls this for one rank: one rank needs no DeepSpeed.)"""
    import torch.distributed as dist

    from dpldm.utils.device import resolve_device

    env = env or resolve_launch_env()
    device = resolve_device(device, local_rank=env.local_rank)
    name = _pick_backend(backend, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized():
        if dist.get_world_size() != env.world_size or dist.get_rank() != env.rank:
            raise LaunchError(f"a process group already exists as rank {dist.get_rank()} of {dist.get_world_size()}, "
                              f"but the environment says rank {env.rank} of {env.world_size}")
        return DistContext(env.rank, env.world_size, env.local_rank, dist.get_backend(), device, env.launcher)
    os.environ.update(env.as_environ())
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import deepspeed

        deepspeed.init_distributed(dist_backend=name, auto_mpi_discovery=False, verbose=False,
                                   timeout=timedelta(seconds=timeout_s), rank=env.rank, world_size=env.world_size)
    if dist.get_world_size() != env.world_size:
        raise LaunchError(f"process group has {dist.get_world_size()} ranks, the environment said {env.world_size}")
    return DistContext(env.rank, env.world_size, env.local_rank, name, device, env.launcher)


def single_process_context(device: str | torch.device = "cpu") -> DistContext:
    """A context with no process group (W=1): for offline tools and reference computations."""
    return DistContext(device=torch.device(device))
