"""The state of a DP fine-tuning run on disk: ONE checkpoint schema, ONE resume rule, ONE release.

Step checkpoint `<out>/checkpoints/step_XXXXXXXX/` (dpldm.checkpoint: atomic, checksummed;
mode 0600 files in a 0700 folder because it holds the run's secrets):
    tensors   train.<name>            trainable parameters now (fp32)
              ema.<name>              their EMA (what is released)
              opt.<name>.<key>        optimizer state by parameter NAME (world-size independent)
    meta      kind "dp-finetune", schema, step, config, init {folder, hashes, scale_factor},
              privacy {ledger (Poisson seed inside), noise mode}, secrets {diffusion_seed},
              data {fingerprint, N, description}, optimizer/scheduler/EMA scalars, world size,
              ZeRO stage, device, precision, replica digest, resumes [what changed, when]
Nothing in it depends on the world size: a run resumes on any number of ranks.

Released model `<out>/model/` (kind "ldm", loadable by `dpldm.models.ldm.load_ldm`): the init
model with the EMA of the trained tensors put back, and a PUBLIC privacy report (epsilon, delta,
sigma, q, N, steps, accountant, ...). Never a seed, never per-example values.

Resume rule: the newest checkpoint (a corrupt newest one is refused, naming it, unless
--allow-older-checkpoint: then the newest loadable one, and the steps after it run again, each
execution recorded in the append-only privacy journal, dpldm.privacy.journal, so the epsilon
reported covers every executed step); refused when every checkpoint is unusable (that would forget spent privacy),
when the private data differ (fingerprint), when the init model differs (hashes), or when a
setting that defines the mechanism or the optimisation changed. Settings that only change how
the work is executed (physical batch, kernels, device, precision, logging) may change; each
change is recorded in the checkpoint's `resumes` list.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpldm.checkpoint import (CheckpointError, list_step_checkpoints, load_checkpoint, load_latest_checkpoint,
                              save_step_checkpoint)
from dpldm.config import RunConfig
from dpldm.errors import RunFolderError

KIND = "dp-finetune"
SCHEMA = 2

# settings that only change how the work is executed, not what is computed or released
FREE_TO_CHANGE: dict[str, set[str]] = {
    "privacy": {"physical_batch_size", "backend", "norm_method"},
    "diffusion": {"sampler", "sample_steps", "eta", "guidance_scale"},
    "train": {"threads", "device", "precision", "log_every", "checkpoint_every", "keep_checkpoints", "wandb",
              "out_dir", "init_checkpoint", "sample_every",
              # pretraining-only settings: DP fine-tuning never reads them
              "batch_size", "steps", "grad_clip", "ae_steps", "ae_lr", "ae_batch_size"},
    "data": {"public", "public_size", "seed", "num_workers", "private"},  # the private CONTENT is checked by hash
}


@dataclass
class InitInfo:
    """Where the run started: the public model folder and hashes that identify its weights (the
    UNet hash is of the public model's EMA weights, which fine-tuning starts from)."""

    folder: str
    scale_factor: float
    ae_sha256: str
    unet_sha256: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# -- EMA of the trainable tensors ----------------------------------------------------------------

class TrainableEMA:
    """EMA of the trainable tensors (the frozen ones never change, so this is the EMA of the whole
    UNet): the first update copies, then ema = d*ema + (1-d)*p. Post-processing of the released
    updates: no privacy cost. Replicated like the trainable parameters."""

    def __init__(self, params: dict[str, nn.Parameter], decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = float(decay)
        self.shadow = {n: p.detach().clone() for n, p in params.items()}
        self.count = 0

    @torch.no_grad()
    def update(self, params: dict[str, nn.Parameter]) -> None:
        for n, p in params.items():
            if self.count == 0:
                self.shadow[n].copy_(p)
            else:
                self.shadow[n].mul_(self.decay).add_(p.detach(), alpha=1 - self.decay)
        self.count += 1

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"ema.{n}": t.detach().cpu().clone() for n, t in self.shadow.items()}

    def load(self, tensors: dict[str, torch.Tensor], count: int) -> None:
        for n, t in self.shadow.items():
            t.copy_(tensors[f"ema.{n}"].to(device=t.device, dtype=t.dtype))
        self.count = int(count)


# -- optimizer state by parameter name ------------------------------------------------------------

def optimizer_tensors(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """A torch optimizer's state as tensors "opt.<param name>.<key>" + JSON meta (scalars, groups)."""
    sd = optimizer.state_dict()
    flat = [i for g in sd["param_groups"] for i in g["params"]]
    if len(flat) != len(names):
        raise ValueError(f"optimizer has {len(flat)} parameters, {len(names)} names given")
    name_of = dict(zip(flat, names))
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for i, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{name_of[i]}.{k}"] = v.detach().cpu().clone()
            else:
                scalars.setdefault(name_of[i], {})[k] = v
    groups = []
    for g in sd["param_groups"]:
        clean = {k: v for k, v in g.items()
                 if k != "params" and isinstance(v, (int, float, bool, str, type(None), list, tuple))}
        clean["param_names"] = [name_of[i] for i in g["params"]]
        groups.append(clean)
    return tensors, {"param_groups": groups, "scalars": scalars, "class": type(optimizer).__name__}


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, names: list[str], tensors: dict[str, torch.Tensor],
                           meta: dict) -> None:
    if meta.get("class") != type(optimizer).__name__:
        raise CheckpointError(f"checkpoint optimizer is {meta.get('class')}, the run uses {type(optimizer).__name__}")
    sd = optimizer.state_dict()
    flat = [i for g in sd["param_groups"] for i in g["params"]]
    index_of = dict(zip(names, flat))
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            pname, k = key[len("opt."):].rsplit(".", 1)
            if pname not in index_of:
                raise CheckpointError(f"optimizer state for unknown parameter {pname!r}")
            state.setdefault(index_of[pname], {})[k] = v
    for pname, extra in meta.get("scalars", {}).items():
        state.setdefault(index_of[pname], {}).update(extra)
    groups = []
    for g, saved in zip(sd["param_groups"], meta["param_groups"]):
        if [names[flat.index(i)] for i in g["params"]] != saved["param_names"]:
            raise CheckpointError("optimizer parameter groups do not match the checkpoint")
        merged = dict(g)
        merged.update({k: (tuple(v) if isinstance(g.get(k), tuple) else v) for k, v in saved.items()
                       if k != "param_names"})
        groups.append(merged)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# -- save / load ----------------------------------------------------------------------------------

def save_state(run_dir: Path, step: int, *, trainable: dict[str, nn.Parameter], ema: TrainableEMA,
               optimizer: torch.optim.Optimizer, scheduler, meta: dict[str, Any], keep: int) -> Path:
    """Rank 0: write the step checkpoint (see module docstring). Disk errors become one-line errors
    naming the folder; the previous checkpoints stay intact (the new one is never half-visible)."""
    names = list(trainable)
    tensors = {f"train.{n}": p.detach().cpu() for n, p in trainable.items()}
    opt_t, opt_meta = optimizer_tensors(optimizer, names)
    tensors.update(opt_t)
    tensors.update(ema.tensors())
    full = {**meta, "kind": KIND, "schema": SCHEMA, "trainable": names, "optimizer": opt_meta,
            "scheduler": scheduler.state_dict(), "ema_count": ema.count}
    try:
        return save_step_checkpoint(run_dir, step, tensors, full, keep=keep, private=True)
    except OSError as e:
        raise RunFolderError(f"{run_dir}/checkpoints: cannot write the step {step} checkpoint ({e.strerror or e}); "
                             "the previous checkpoints are intact: free space / fix permissions and resume") from None


def load_latest_state(run_dir: Path, allow_older: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path] | None:
    """The newest checkpoint, or None when the run has none. A corrupt newest checkpoint is an error
    naming it, unless `allow_older` (--allow-older-checkpoint): then the newest loadable one, whose
    later steps run again (the privacy journal accounts every execution). Every checkpoint unusable
    is an error (starting over would forget the privacy already spent)."""
    folders = list_step_checkpoints(run_dir)
    if len(folders) > 1 and not allow_older:
        try:
            load_checkpoint(folders[-1])
        except CheckpointError as e:
            raise CheckpointError(f"the newest checkpoint cannot be loaded: {e}. Resuming from an older one re-runs "
                                  "steps already spent and released; pass --allow-older-checkpoint to do so (the "
                                  "privacy journal then accounts every executed step), or restore the file") from None
    found = load_latest_checkpoint(run_dir)
    if found is None:
        n = len(folders)
        if n:
            raise CheckpointError(f"{run_dir}: resuming, but none of its {n} step checkpoint(s) can be loaded (see the "
                                  "warnings above); refusing to start over, which would forget the privacy already "
                                  "spent. Restore a checkpoint, or start a new run in another folder")
        return None
    tensors, meta, folder = found
    if meta.get("kind") != KIND or meta.get("schema") != SCHEMA:
        raise CheckpointError(f"{folder}: not a DP fine-tuning checkpoint of this dpldm (kind {meta.get('kind')!r}, "
                              f"schema {meta.get('schema')!r}; expected {KIND!r}, {SCHEMA})")
    return tensors, meta, folder


def restore_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any], *, trainable: dict[str, nn.Parameter],
                  ema: TrainableEMA, optimizer: torch.optim.Optimizer, scheduler) -> None:
    names = list(trainable)
    if names != meta["trainable"]:
        raise CheckpointError(f"the checkpoint trains {len(meta['trainable'])} tensors, this run {len(names)}: the "
                              "finetune selection or the model differ")
    with torch.no_grad():
        for n, p in trainable.items():
            p.copy_(tensors[f"train.{n}"].to(device=p.device, dtype=p.dtype))
    load_optimizer_tensors(optimizer, names, tensors, meta["optimizer"])
    scheduler.load_state_dict(meta["scheduler"])
    ema.load(tensors, meta["ema_count"])


# -- the append-only privacy journal (dpldm.privacy.journal) ----------------------------------------

def journal_ledger_state(run_dir: Path, ledger_state: dict[str, Any], verbose: bool = True) -> dict[str, Any]:
    """Rank 0, on resume: the checkpoint's ledger state with `extra_executions` taken from the
    journal, so the ledger accounts every step ever executed (re-runs included). A checkpoint made
    with a journal whose journal is gone is refused; a run from before the journal existed gets one
    rebuilt from its checkpoint (each of its steps once)."""
    from dpldm.privacy.journal import JournalError, PrivacyJournal, extra_executions

    journal, k = PrivacyJournal(run_dir), int(ledger_state["steps_done"])
    sigma, q = float(ledger_state["noise_multiplier"]), float(ledger_state["plan"]["sample_rate"])
    if not journal.exists():
        if "extra_executions" in ledger_state:
            raise JournalError(f"{journal.path} is missing, but the checkpoint was written with one: without it the "
                               "steps executed after the checkpoint cannot be accounted; restore it, or start a new run")
        for step in range(1, k + 1):
            journal.append(step, 1, sigma, q)
        if verbose:
            print(f"[finetune] {journal.path}: started from the checkpoint (steps 1..{k} once; the run predates the "
                  "journal)", flush=True)
    extra = extra_executions(journal.executions(sigma, q), k)
    rerun = sorted(s for s in extra if s > k)
    if rerun and verbose:
        print(f"[finetune] the privacy journal holds step(s) {rerun[0]}..{rerun[-1]} beyond this checkpoint (step {k}): "
              "they run again and every execution is accounted (epsilon covers all executed steps)", flush=True)
    return {**ledger_state, "extra_executions": {str(s): n for s, n in extra.items()}}


def set_aside_stale_journal(run_dir: Path) -> None:
    """Rank 0, on a fresh start: a journal left by a run that died before its first checkpoint
    (nothing of its steps was released: a checkpoint comes before any grid or model) is moved
    aside, so the new run's journal holds the new run only."""
    from dpldm.privacy.journal import PrivacyJournal

    journal = PrivacyJournal(run_dir)
    if journal.exists():
        aside = journal.path.with_name(journal.path.name + ".before-fresh-start")
        with open(aside, "ab") as f:
            f.write(journal.path.read_bytes())
            f.flush()
            os.fsync(f.fileno())
        journal.path.unlink()


# -- resume checks --------------------------------------------------------------------------------

def config_changes(cfg: RunConfig, saved: dict[str, Any], where: str) -> dict[str, list[Any]]:
    """Settings changed since the checkpoint. Raises for changes that would alter the mechanism or
    the optimisation; returns the allowed ones as {"section.key": [then, now]}."""
    then = RunConfig.from_dict(saved, f"{where}/meta.json").to_dict()
    now = cfg.to_dict()
    refused, allowed = [], {}
    for sec, values in now.items():
        for k, v in values.items():
            if then[sec].get(k) == v:
                continue
            if k in FREE_TO_CHANGE.get(sec, set()):
                allowed[f"{sec}.{k}"] = [then[sec].get(k), v]
            else:
                refused.append(f"{sec}.{k}: checkpoint {then[sec].get(k)!r} != now {v!r}")
    if refused:
        raise RunFolderError(f"cannot resume from {where}: settings that define the run changed "
                             f"({'; '.join(refused)}); resume with the checkpoint's settings, or start a new run")
    return allowed


def check_same_data(meta: dict[str, Any], fingerprint: str, num_examples: int, where: str) -> None:
    data = meta["data"]
    if data["num_examples"] != num_examples or data["fingerprint"] != fingerprint:
        raise RunFolderError(f"cannot resume from {where}: it trained on other private data ({data['num_examples']} "
                             f"examples, fingerprint {data['fingerprint'][:12]}...), now {num_examples} examples, "
                             f"fingerprint {fingerprint[:12]}...; resuming on other data would void the accounting")


def check_same_init(meta: dict[str, Any], init: InitInfo, where: str) -> None:
    then = meta["init"]
    if (then["ae_sha256"], then["unet_sha256"]) != (init.ae_sha256, init.unet_sha256):
        raise RunFolderError(f"cannot resume from {where}: it started from the model in {then['folder']}, whose weights "
                             f"differ from {init.folder} (sha256 of the autoencoder/UNet)")


# -- the public privacy report ---------------------------------------------------------------------

def privacy_report(ledger, privacy_cfg, *, private: bool, trainable: int, total: int, finetune: str,
                   fixed_shape: dict[str, Any] | None = None) -> dict[str, Any]:
    """What is published with the model: numbers of the mechanism, never a seed. A run whose
    randomness came from the config (`train.deterministic`) is NOT private: epsilon = inf (the
    accountant's number, valid only for secret noise, is kept as `epsilon_if_noise_were_secret`)."""
    accounted = ledger.epsilon_spent()
    rep = {"epsilon": accounted if private else math.inf, "epsilon_target": privacy_cfg.epsilon,
           "delta": ledger.delta, "noise_multiplier": ledger.noise_multiplier, "max_grad_norm": ledger.max_grad_norm,
           "sample_rate": ledger.sample_rate, "expected_batch_size": ledger.expected_batch_size,
           "num_examples": ledger.num_examples, "steps": ledger.steps_done, "executed_steps": ledger.executed_steps(),
           "accountant": ledger.accountant_name,
           "sampling": "poisson", "private": private, "trainable_parameters": trainable,
           "total_unet_parameters": total, "finetune": finetune}
    # fixed-shape steps truncate the Poisson sample at a public size; that event is accounted in delta
    # (dpldm.privacy.fixed_shape): delta_total = delta + T p (1 + e^eps) over every executed step
    rep["fixed_shape"] = fixed_shape
    trunc = 0.0
    if fixed_shape is not None and fixed_shape["truncation_probability"] > 0:
        trunc = ledger.executed_steps() * fixed_shape["truncation_probability"] * (1 + math.exp(min(accounted, 700.0)))
    rep["delta_truncation"], rep["delta_total"] = trunc, ledger.delta + trunc
    if not private:
        rep["epsilon_if_noise_were_secret"] = accounted
        rep["why_not_private"] = ("train.deterministic: noise, sampling and diffusion draws were seeded from the "
                                  "config, so anyone with the config can remove the noise")
    return rep


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
