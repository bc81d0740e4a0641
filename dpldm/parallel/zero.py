"""DeepSpeed ZeRO for the frozen part of the LDM; the trainable part stays whole on every rank.

Stage 3: the model is built under `deepspeed.zero.Init`, so every frozen parameter is cut into W
partitions at construction (rank r keeps 1/W of it: `param.ds_tensor`) and never exists whole
on one rank except briefly: DeepSpeed's ZeRO-3 parameter coordinator (the engine that
`deepspeed.initialize` builds for a model without optimizer) gathers a module's parameters in
its forward pre-hook, frees them after the forward, and gathers them again for the backward.
The trainable modules (attention layers, class embedder) are taken back out of ZeRO right after
the build: their parameters are gathered once and become plain, replicated tensors, so the DP
engine's per-layer rules, the all-reduce of clipped sums and the optimizer work on whole
tensors exactly as on one process. DeepSpeed never sees them afterwards (they are detached
while `deepspeed.initialize` installs its hooks), so nothing can silently re-partition them.

Stages 0-2 keep the whole model on every rank (ZeRO-1/2 partition optimizer state and
gradients; here those exist only for the small trainable part, which the DP step replicates,
so 1 and 2 behave like 0 and say so).

Lock-step rule for stage 3: every forward/backward gathers parameters with collectives, so
all ranks must run the same number of forward+backward passes per logical step, in the same
order. `dpldm.parallel.step.run_logical_step` guarantees it (equal chunk counts, a discarded
dummy pass on a rank whose Poisson share is empty).
"""
from __future__ import annotations

from dpldm.errors import InputError

import copy
import json
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from dpldm.parallel.dist import DistContext

CONFIG_DIR = Path(__file__).resolve().parents[2] / "launch" / "ds_configs"
ZERO_STAGES = (0, 1, 2, 3)


class ZeroConfigError(InputError, ValueError):
    """A DeepSpeed config or ZeRO stage this code does not support."""


# -- DeepSpeed configs -------------------------------------------------------------------------

def default_ds_config(stage: int) -> dict[str, Any]:
    """The config of `launch/ds_configs/zero{stage}.json` (built in, in case the file is absent)."""
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        zero.update({"stage3_param_persistence_threshold": 0, "stage3_model_persistence_threshold": 0,
                     "stage3_prefetch_bucket_size": 5e7, "stage3_max_live_parameters": 1e9,
                     "stage3_max_reuse_distance": 1e9, "overlap_comm": True})
    return {"train_micro_batch_size_per_gpu": 64, "gradient_accumulation_steps": 1,
            "zero_optimization": zero, "zero_allow_untested_optimizer": True, "fp16": {"enabled": False},
            "bf16": {"enabled": False}, "steps_per_print": 1 << 30, "wall_clock_breakdown": False}


def load_ds_config(spec: int | str | Path | dict | None, physical_batch_size: int | None = None) -> dict[str, Any]:
    """A DeepSpeed config from a stage number (0-3), a JSON path, or a dict; returns a copy with
    the micro batch set to the physical batch (DeepSpeed wants one; the DP loop does its own
    chunking, and gradient accumulation is the DP step's, so it is fixed to 1)."""
    if spec is None:
        spec = 0
    if isinstance(spec, dict):
        cfg = copy.deepcopy(spec)
        where = "config dict"
    elif isinstance(spec, int) or (isinstance(spec, str) and spec.isdigit()):
        stage = int(spec)
        if stage not in ZERO_STAGES:
            raise ZeroConfigError(f"ZeRO stage must be one of {ZERO_STAGES}, got {stage}")
        path = CONFIG_DIR / f"zero{stage}.json"
        cfg = json.loads(path.read_text()) if path.is_file() else default_ds_config(stage)
        where = str(path)
    else:
        path = Path(spec)
        if not path.is_file():
            raise ZeroConfigError(f"{path}: DeepSpeed config not found (stock ones: {CONFIG_DIR}/zero0..3.json)")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ZeroConfigError(f"{path}: not valid JSON ({e})") from None
        where = str(path)
    if not isinstance(cfg, dict):
        raise ZeroConfigError(f"{where}: expected a JSON object")
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}  # "_comment" keys are for people
    stage = int(cfg.get("zero_optimization", {}).get("stage", 0))
    if stage not in ZERO_STAGES:
        raise ZeroConfigError(f"{where}: zero_optimization.stage must be one of {ZERO_STAGES}, got {stage}")
    for key in ("fp16", "bf16"):
        if cfg.get(key, {}).get("enabled"):
            raise ZeroConfigError(f"{where}: {key}.enabled is not supported: the DP step keeps the trainable "
                                  "parameters, clipped sums and noise in fp32")
    if cfg.get("optimizer") or cfg.get("scheduler"):
        raise ZeroConfigError(f"{where}: 'optimizer'/'scheduler' must not be set: the DP step owns the optimizer "
                              "(the same torch optimizer on every rank, after the noisy all-reduce)")
    cfg.pop("train_batch_size", None)
    if physical_batch_size is not None:
        cfg["train_micro_batch_size_per_gpu"] = int(physical_batch_size)
    cfg["gradient_accumulation_steps"] = 1
    cfg.setdefault("zero_optimization", {"stage": 0})
    if stage == 3:
        # only the explicitly replicated (trainable) modules stay whole; every frozen tensor is cut
        cfg["zero_optimization"].setdefault("stage3_param_persistence_threshold", 0)
        cfg["zero_optimization"].setdefault("stage3_model_persistence_threshold", 0)
    return cfg


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


# -- building -----------------------------------------------------------------------------------

def is_zero_param(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


@contextmanager
def zero_init(ds_config: dict[str, Any], enabled: bool = True) -> Iterator[None]:
    """Modules constructed inside are partitioned across ranks at construction (ZeRO-3).
    `mem_efficient_linear=False`: DeepSpeed would otherwise replace torch.nn.functional.linear
    process-wide, under the DP engine's Linear rule."""
    if not enabled:
        yield
        return
    import deepspeed

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with deepspeed.zero.Init(config_dict_or_path=ds_config, mem_efficient_linear=False):
            yield


@dataclass
class PartitionInfo:
    name: str
    numel: int  # full size (ds_numel)
    local_numel: int  # elements this rank stores (its partition, or the whole tensor if replicated)
    trainable: bool
    partitioned: bool


@dataclass
class ShardedModel:
    """A model built for this world: `module` is the ordinary nn.Module to call."""

    module: nn.Module
    ctx: DistContext
    stage: int
    ds_config: dict[str, Any]
    engine: Any = None  # the DeepSpeed engine (stage 3), holding the parameter coordinator
    replicated: list[str] = field(default_factory=list)  # module names taken out of ZeRO (stage 3)

    @property
    def lockstep(self) -> bool:
        """True when every rank must run the same forward/backward passes (ZeRO-3, W > 1)."""
        return self.stage == 3 and self.ctx.world_size > 1

    def trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.module.named_parameters() if p.requires_grad}

    def partition_info(self) -> list[PartitionInfo]:
        out = []
        for n, p in self.module.named_parameters():
            if is_zero_param(p):
                out.append(PartitionInfo(n, int(p.ds_numel), int(p.ds_tensor.numel()), p.requires_grad, True))
            else:
                out.append(PartitionInfo(n, p.numel(), p.numel(), p.requires_grad, False))
        return out

    def frozen_bytes(self) -> dict[str, int]:
        """Bytes of frozen parameters: stored on this rank vs the full model."""
        local = full = 0
        for n, p in self.module.named_parameters():
            if p.requires_grad:
                continue
            size = p.element_size() if not is_zero_param(p) else p.ds_tensor.element_size()
            if is_zero_param(p):
                local += int(p.ds_tensor.numel()) * size
                full += int(p.ds_numel) * size
            else:
                local += p.numel() * size
                full += p.numel() * size
        return {"local": local, "full": full}

    def after_backward(self) -> None:
        """Release parameters of modules whose post-backward hook never ran (ZeRO-3)."""
        opt = getattr(self.engine, "optimizer", None)
        if opt is not None and hasattr(opt, "release_backward_leftovers"):
            opt.release_backward_leftovers()

    def sync_check(self) -> str:
        """Bit-identical trainable parameters on every rank, or ReplicaMismatchError."""
        return self.ctx.assert_replicas_equal(self.trainable())

    # -- whole-model state (consolidation, loading) ----------------------------------------------
    def full_state_dict(self, rank0_only: bool = True, group_numel: int = 50_000_000) -> dict[str, torch.Tensor]:
        """The whole model's state dict on CPU, gathered from the partitions. Collective under
        ZeRO-3: every rank must call it; only rank 0 gets the tensors when `rank0_only`."""
        state = self.module.state_dict(keep_vars=True)
        out: dict[str, torch.Tensor] = {}
        want = self.ctx.is_main or not rank0_only
        pending: list[tuple[str, torch.Tensor]] = []

        def flush() -> None:
            if not pending:
                return
            import deepspeed

            with deepspeed.zero.GatheredParameters([t for _, t in pending], modifier_rank=None):
                if want:
                    for k, t in pending:
                        out[k] = t.detach().clone().cpu()
            pending.clear()

        size = 0
        for k, t in state.items():
            if is_zero_param(t):
                pending.append((k, t))
                size += int(t.ds_numel)
                if size >= group_numel:
                    flush()
                    size = 0
            elif want:
                out[k] = t.detach().clone().cpu()
        flush()
        return out

    def load_full_state_dict(self, state: dict[str, torch.Tensor] | None, strict: bool = True) -> None:
        """Load a whole-model state dict held by rank 0 (others pass None) into every rank:
        partitioned tensors through DeepSpeed's GatheredParameters(modifier_rank=0) (rank 0
        writes the whole tensor, DeepSpeed re-partitions it), replicated ones by broadcast.
        Collective: every rank calls it."""
        mine = self.module.state_dict(keep_vars=True)
        keys: list[str] | None = None
        problem = ""
        if self.ctx.is_main:
            if state is None:
                problem = "rank 0 holds no state dict"
            else:
                missing = sorted(set(mine) - set(state))
                unexpected = sorted(set(state) - set(mine))
                if strict and (missing or unexpected):
                    problem = f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
                for k, t in mine.items():
                    shape = tuple(t.ds_shape) if is_zero_param(t) else tuple(t.shape)
                    if not problem and k in state and tuple(state[k].shape) != shape:
                        problem = f"'{k}' has shape {tuple(state[k].shape)}, the model expects {shape}"
                keys = [k for k in mine if k in state]
        problem, keys = self.ctx.broadcast_object((problem, keys))
        if problem:
            raise ValueError(f"state dict does not match the model: {problem}")
        for k in keys:
            t = mine[k]
            if is_zero_param(t):
                import deepspeed

                with deepspeed.zero.GatheredParameters([t], modifier_rank=0):
                    if self.ctx.is_main:
                        with torch.no_grad():
                            t.data.copy_(state[k].to(dtype=t.dtype))
            else:
                if self.ctx.is_main:
                    with torch.no_grad():
                        t.data.copy_(state[k].to(device=t.device, dtype=t.dtype))
                self.ctx.broadcast_tensors([t])


def _parent_of(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parts = name.split(".")
    parent = root
    for p in parts[:-1]:
        parent = getattr(parent, p)
    return parent, parts[-1]


def _replicated_roots(module: nn.Module) -> list[str]:
    """Names of the smallest set of subtrees that hold every trainable parameter: each module that
    directly owns a trainable parameter, dropping those inside another chosen one."""
    owners = [name for name, m in module.named_modules()
              if any(p.requires_grad for p in m.parameters(recurse=False))]
    if "" in owners:
        raise ZeroConfigError("the root module itself owns a trainable parameter; ZeRO-3 needs the trainable "
                              "parameters inside submodules")
    owners.sort(key=lambda n: n.count("."))
    roots: list[str] = []
    for n in owners:
        if not any(n.startswith(r + ".") for r in roots):
            roots.append(n)
    return roots


def _unzero(module: nn.Module) -> None:
    """Replace every ZeRO parameter of `module`'s subtree by a plain parameter holding the whole
    (gathered) tensor; the partitioned originals are released. Collective."""
    import deepspeed

    for sub in module.modules():
        params = [(n, p) for n, p in sub.named_parameters(recurse=False) if is_zero_param(p)]
        if not params:
            continue
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            whole = {n: p.data.detach().clone() for n, p in params}
        for n, p in params:
            sub._parameters[n] = nn.Parameter(whole[n], requires_grad=p.requires_grad)


def build_model(factory: Callable[[], nn.Module], ctx: DistContext, ds_config: dict[str, Any],
                select_trainable: Callable[[nn.Module], Any] | None = None,
                state: dict[str, torch.Tensor] | None = None) -> ShardedModel:
    """Build `factory()` for this world.

    select_trainable(module) sets requires_grad (e.g. `apply_finetune(unet, "attention:all")`);
    it runs after construction and before partitioning decisions. `state`, on rank 0, is a whole
    state dict to load (others pass None); without it the factory's initialisation is kept
    (identical on every rank: zero.Init broadcasts rank 0's tensors before partitioning them;
    stages 0-2 broadcast rank 0's weights). Pass `state` for stage 3 whenever the values matter:
    a parent __init__ that re-initialises a child's parameters after the child was built (the
    UNet zeroes its last conv) acts on an already-partitioned, empty tensor under zero.Init."""
    stage = zero_stage(ds_config)
    with zero_init(ds_config, enabled=stage == 3):
        module = factory()
    if select_trainable is not None:
        select_trainable(module)
    if stage in (1, 2) and ctx.is_main:
        warnings.warn(f"ZeRO stage {stage} partitions optimizer state/gradients, which here exist only for the "
                      "replicated trainable part: it behaves like stage 0 (use 3 to partition the frozen model)",
                      stacklevel=2)
    has_state = ctx.broadcast_object(state is not None)
    if stage != 3:
        module.to(ctx.device)
        sm = ShardedModel(module, ctx, stage, ds_config)
        if has_state or ctx.world_size > 1:  # without a state: rank 0's initialisation everywhere
            sm.load_full_state_dict((state if has_state else module.state_dict()) if ctx.is_main else None)
        return sm

    import deepspeed

    roots = _replicated_roots(module)
    for name in roots:
        _unzero(module.get_submodule(name))
    # detach the replicated subtrees while DeepSpeed installs its hooks and converts parameters
    detached = []
    for name in roots:
        parent, attr = _parent_of(module, name)
        detached.append((parent, attr, parent._modules[attr]))
        parent._modules[attr] = nn.Identity()
    try:
        if not any(is_zero_param(p) for p in module.parameters()):
            raise ZeroConfigError("ZeRO-3 needs frozen parameters to partition; every parameter is trainable here "
                                  "(finetune 'all'): use stage 0")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            engine, _, _, _ = deepspeed.initialize(model=module, config=ds_config, dist_init_required=False)
    finally:
        for parent, attr, sub in detached:
            parent._modules[attr] = sub
    for _, _, sub in detached:
        sub.to(ctx.device)
    sm = ShardedModel(module, ctx, stage, ds_config, engine=engine, replicated=roots)
    if has_state:
        sm.load_full_state_dict(state if ctx.is_main else None)
    return sm


def meta_model(factory: Callable[[], nn.Module]) -> nn.Module:
    """The model on the meta device (shapes only, no memory): for counting parameters in dry runs."""
    with torch.device("meta"):
        return factory()

