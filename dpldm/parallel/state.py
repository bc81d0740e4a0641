"""Run state across ranks: the shared privacy ledger, rank-0 checkpoints, resume, consolidation.

* The ledger (sigma, q, N, delta, accountant history, the Poisson plan's seed) is created on
  rank 0 and broadcast, so every rank derives the same global sample; each rank's DPStep keeps
  its copy in lock-step (`ledger.step()` once per logical step everywhere), and rank 0's copy is
  the one written. A seed drawn from the OS on each rank would give every rank another sample.
* Checkpoints hold only what changes: the trainable (replicated) parameters, the optimizer state
  (replicated: the same step on every rank), the ledger, the config and the init model's path.
  Rank 0 writes them with `dpldm.checkpoint.save_step_checkpoint` (tensors, then meta.json, in a
  `.partial` folder renamed into place), after checking that the replicas agree bit for bit.
* Resume: rank 0 reads the newest complete checkpoint and broadcasts it; nothing in it depends on
  the world size, so a run may resume on another number of ranks and continues the same plan.
* Consolidation: the frozen weights never change, so a single-process model is the init model
  with the trained tensors put back (`consolidate`, `launch/train.py --consolidate`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpldm.checkpoint import (CheckpointError, load_checkpoint, load_latest_checkpoint, save_checkpoint,
                              save_step_checkpoint, unprefixed)
from dpldm.parallel.dist import DistContext

KIND = "dp-finetune"


# -- the ledger ---------------------------------------------------------------------------------

def shared_ledger(ctx: DistContext, privacy_cfg, num_examples: int, seed: int | None = None,
                  state: dict[str, Any] | None = None):
    """One PrivacyLedger for all ranks: built (or restored from `state`) on rank 0, broadcast.
    sigma is calibrated once, on rank 0."""
    from dpldm.privacy.accountant import PrivacyLedger

    if ctx.is_main:
        if state is not None:
            ledger = PrivacyLedger.from_state_dict(state)
        else:
            ledger = PrivacyLedger.from_config(privacy_cfg, num_examples, seed=seed)
        payload = ledger.state_dict()
    else:
        payload = None
    payload = ctx.broadcast_object(payload)
    ledger = PrivacyLedger.from_state_dict(payload)
    if ledger.num_examples != num_examples:
        raise CheckpointError(f"the ledger covers N={ledger.num_examples} private examples but the data has "
                              f"{num_examples}: a resumed run must read the same private set")
    return ledger


def public_privacy_summary(ledger) -> dict[str, Any]:
    """What may be published with a model: no seed, no history beyond the counts."""
    d = ledger.describe()
    d["epsilon"] = ledger.epsilon_spent() if ledger.steps_done else 0.0
    return d


# -- optimizer state as named tensors (world-size independent) ----------------------------------

def optimizer_tensors(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten a torch optimizer's state into tensors "opt.<param name>.<key>" and JSON meta."""
    sd = optimizer.state_dict()
    flat_params = [i for g in sd["param_groups"] for i in g["params"]]
    if len(flat_params) != len(names):
        raise ValueError(f"optimizer has {len(flat_params)} parameters, {len(names)} names given")
    index_to_name = dict(zip(flat_params, names))
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for i, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{index_to_name[i]}.{k}"] = v.detach().cpu().clone()
            else:
                scalars.setdefault(index_to_name[i], {})[k] = v
    groups = []
    for g in sd["param_groups"]:
        clean = {k: v for k, v in g.items() if k != "params" and isinstance(v, (int, float, bool, str, type(None), list, tuple))}
        clean["param_names"] = [index_to_name[i] for i in g["params"]]
        groups.append(clean)
    return tensors, {"param_groups": groups, "scalars": scalars, "class": type(optimizer).__name__}


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, names: list[str], tensors: dict[str, torch.Tensor],
                           meta: dict) -> None:
    if meta.get("class") != type(optimizer).__name__:
        raise CheckpointError(f"checkpoint optimizer is {meta.get('class')}, the run uses {type(optimizer).__name__}")
    sd = optimizer.state_dict()
    flat_params = [i for g in sd["param_groups"] for i in g["params"]]
    name_to_index = dict(zip(names, flat_params))
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if not key.startswith("opt."):
            continue
        rest = key[len("opt."):]
        pname, k = rest.rsplit(".", 1)
        if pname not in name_to_index:
            raise CheckpointError(f"optimizer state for unknown parameter {pname!r}")
        state.setdefault(name_to_index[pname], {})[k] = v
    for pname, extra in meta.get("scalars", {}).items():
        state.setdefault(name_to_index[pname], {}).update(extra)
    groups = []
    for g, saved in zip(sd["param_groups"], meta["param_groups"]):
        if [names[flat_params.index(i)] for i in g["params"]] != saved["param_names"]:
            raise CheckpointError("optimizer parameter groups do not match the checkpoint")
        merged = dict(g)
        merged.update({k: (tuple(v) if isinstance(g.get(k), tuple) else v) for k, v in saved.items() if k != "param_names"})
        groups.append(merged)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# -- checkpoints ---------------------------------------------------------------------------------

def save_dp_checkpoint(ctx: DistContext, run_dir: str | Path, model, optimizer: torch.optim.Optimizer, dp,
                       meta: dict[str, Any], keep: int = 3,
                       extra_tensors: dict[str, torch.Tensor] | None = None) -> Path | None:
    """Collective: check the replicas agree, then rank 0 writes `checkpoints/step_XXXXXXXX/`
    atomically. Returns the folder on rank 0, None elsewhere."""
    trainable = model.trainable()
    digest = model.sync_check()
    ledgers = ctx.all_gather_object(json.dumps(dp.ledger.state_dict(), sort_keys=True))
    if len(set(ledgers)) != 1:
        raise RuntimeError("the ranks' privacy ledgers disagree; refusing to checkpoint (every rank must take the "
                           "same logical steps)")
    step = dp.step_index
    folder = None
    if ctx.is_main:
        names = list(trainable)
        tensors = {f"train.{n}": p.detach().cpu() for n, p in trainable.items()}
        opt_t, opt_meta = optimizer_tensors(optimizer, names)
        tensors.update(opt_t)
        tensors.update(extra_tensors or {})
        full_meta = {**meta, "kind": KIND, "privacy": dp.state_dict(), "optimizer": opt_meta,
                     "trainable": names, "world_size": ctx.world_size, "zero_stage": model.stage,
                     "replica_digest": digest}
        folder = save_step_checkpoint(run_dir, step, tensors, full_meta, keep=keep)
    ctx.barrier()
    return folder


def load_latest_dp_checkpoint(ctx: DistContext, run_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict, str] | None:
    """Rank 0 reads the newest complete checkpoint of `run_dir` and broadcasts it (None: none)."""
    found = None
    if ctx.is_main:
        got = load_latest_checkpoint(run_dir)
        if got is not None:
            tensors, meta, folder = got
            if meta.get("kind") != KIND:
                raise CheckpointError(f"{folder}: kind {meta.get('kind')!r} is not a DP fine-tuning checkpoint")
            found = (tensors, meta, str(folder))
    return ctx.broadcast_object(found)


def restore_dp_state(model, optimizer: torch.optim.Optimizer, dp, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Put a checkpoint's trainable tensors, optimizer state and ledger into this rank's objects."""
    trainable = model.trainable()
    names = list(trainable)
    if names != meta["trainable"]:
        raise CheckpointError(f"the checkpoint trains {len(meta['trainable'])} tensors, this run {len(names)}: "
                              "finetune spec or model config differ")
    with torch.no_grad():
        for n, p in trainable.items():
            p.copy_(tensors[f"train.{n}"].to(device=p.device, dtype=p.dtype))
    load_optimizer_tensors(optimizer, names, tensors, meta["optimizer"])
    dp.ledger.load_state_dict(meta["privacy"]["ledger"])


# -- consolidation -------------------------------------------------------------------------------

def _resolve_checkpoint(path: str | Path) -> Path:
    """A step checkpoint folder, or a run folder (its newest checkpoint)."""
    p = Path(path)
    if (p / "meta.json").is_file():
        return p
    from dpldm.checkpoint import list_step_checkpoints

    steps = list_step_checkpoints(p)
    if not steps:
        raise CheckpointError(f"{p}: neither a checkpoint folder nor a run folder with checkpoints/step_*")
    return steps[-1]


def consolidate(checkpoint: str | Path, out: str | Path, init_checkpoint: str | Path | None = None,
                weights: str = "auto") -> Path:
    """Write a single-process LDM folder (kind "ldm", loadable by dpldm.models.ldm.load_ldm):
    the init model's autoencoder and frozen UNet weights with the trained tensors put back --
    their EMA when the checkpoint has one (weights="auto"/"ema", what `dpldm finetune` releases),
    else (or with weights="raw") the last iterate. The UNet of the init model is replaced, its
    EMA dropped (load_ldm then starts a fresh EMA from the released weights). The privacy meta
    kept is public (epsilon, delta, sigma, q, steps): no seed."""
    from dpldm.privacy.accountant import PrivacyLedger

    folder = _resolve_checkpoint(checkpoint)
    tensors, meta = load_checkpoint(folder)
    if meta.get("kind") != KIND:
        raise CheckpointError(f"{folder}: kind {meta.get('kind')!r} is not a DP fine-tuning checkpoint")
    init = Path(init_checkpoint or meta.get("init_checkpoint") or "")
    if not str(init) or str(init) == ".":
        raise CheckpointError(f"{folder}: no init model recorded; pass init_checkpoint")
    from dpldm.models.ldm import _model_folder

    init = _model_folder(init)
    base, base_meta = load_checkpoint(init)
    if base_meta.get("kind") != "ldm":
        raise CheckpointError(f"{init}: expected an LDM folder (kind 'ldm'), got {base_meta.get('kind')!r}")
    out_tensors = {k: v for k, v in base.items() if k.startswith("ae.")}
    ema_base = unprefixed("module", unprefixed("ema", base))
    start = ema_base if (meta.get("init_weights") == "ema" and ema_base) else unprefixed("unet", base)
    out_tensors.update({f"unet.{k}": v for k, v in start.items()})  # the weights the run started from
    if weights not in ("auto", "ema", "raw"):
        raise ValueError(f"weights must be auto|ema|raw, got {weights!r}")
    has_ema = all(f"ema.{n}" in tensors for n in meta["trainable"])
    if weights == "ema" and not has_ema:
        raise CheckpointError(f"{folder}: holds no EMA of the trained tensors")
    prefix = "ema" if (has_ema and weights != "raw") else "train"
    for name in meta["trainable"]:
        key = f"unet.{name}"
        if key not in out_tensors:
            raise CheckpointError(f"{init}: has no tensor {key!r} for the trained parameter {name!r}")
        t = tensors[f"{prefix}.{name}"]
        if tuple(t.shape) != tuple(out_tensors[key].shape):
            raise CheckpointError(f"{key}: trained shape {tuple(t.shape)} != init shape {tuple(out_tensors[key].shape)}")
        out_tensors[key] = t.to(out_tensors[key].dtype)
    ledger = PrivacyLedger.from_state_dict(meta["privacy"]["ledger"])
    out_meta = {"kind": "ldm", "config": base_meta["config"], "scale_factor": base_meta.get("scale_factor", 1.0),
                "finetuned": {"from": str(init), "checkpoint": str(folder), "step": meta.get("step"),
                              "finetune": meta.get("config", {}).get("train", {}).get("finetune"),
                              "weights": "ema" if prefix == "ema" else "last iterate",
                              "privacy": public_privacy_summary(ledger)}}
    return save_checkpoint(out, out_tensors, out_meta)


def trained_unet_state(ldm_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return unprefixed("unet", ldm_state)


def check_finite_params(params: dict[str, nn.Parameter]) -> None:
    bad = [n for n, p in params.items() if not torch.isfinite(p).all()]
    if bad:
        raise FloatingPointError(f"non-finite trainable parameters after the step: {bad[:5]}")


def epsilon_or_inf(ledger) -> float:
    try:
        return ledger.epsilon_spent()
    except Exception:  # noqa: BLE001 - sigma = 0 (noise off, tests): no finite epsilon
        return math.inf
