"""The resolved plan of a distributed DP fine-tuning run: every derived quantity, printed before
anything trains (`launch/train.py --dry-run`) and saved with the run.

Public quantities only: sizes, rates, sigma, epsilon. The sampling seed is private and never in
the plan.
"""
from __future__ import annotations

from dpldm.errors import InputError

import math
from pathlib import Path
from typing import Any

from dpldm.config import RunConfig
from dpldm.parallel.step import expected_passes


class PlanError(InputError, ValueError):
    """The run cannot work as configured (printed as one line, exit code 2)."""


def read_hostfile(path: str | Path) -> list[tuple[str, int]]:
    """DeepSpeed hostfile lines `host slots=N` (comments with #) -> [(host, slots)]."""
    p = Path(path)
    if not p.is_file():
        raise PlanError(f"hostfile {p} not found (one line per node: '<host> slots=<ranks>', see launch/hosts.example)")
    hosts: list[tuple[str, int]] = []
    for k, raw in enumerate(p.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("slots="):
            raise PlanError(f"{p}:{k}: expected '<host> slots=<N>', got {raw.strip()!r}")
        try:
            slots = int(parts[1][len("slots="):])
        except ValueError:
            raise PlanError(f"{p}:{k}: slots must be an integer, got {raw.strip()!r}") from None
        if slots < 1:
            raise PlanError(f"{p}:{k}: slots must be >= 1")
        if any(h == parts[0] for h, _ in hosts):
            raise PlanError(f"{p}:{k}: host {parts[0]!r} listed twice")
        hosts.append((parts[0], slots))
    if not hosts:
        raise PlanError(f"hostfile {p} lists no host")
    return hosts


def unet_counts(cfg: RunConfig) -> dict[str, int]:
    """Total/trainable/frozen UNet parameters for cfg.train.finetune, built on the meta device."""
    from dpldm.models.selection import apply_finetune
    from dpldm.models.unet import UNet
    from dpldm.parallel.zero import meta_model

    unet = meta_model(lambda: UNet(cfg.unet))
    apply_finetune(unet, cfg.train.finetune)
    total = sum(p.numel() for p in unet.parameters())
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable, "frozen": total - trainable}


def resolve_plan(cfg: RunConfig, num_examples: int, world_size: int, zero_stage: int,
                 counts: dict[str, int] | None = None) -> dict[str, Any]:
    """Every number the run will use. Raises PlanError for runs that cannot work."""
    from dpldm.privacy.accountant import PrivacyParameterError, calibrate_noise, compute_epsilon

    p = cfg.privacy
    if world_size < 1:
        raise PlanError(f"world size must be >= 1, got {world_size}")
    if num_examples < 1:
        raise PlanError("the private set is empty")
    if p.sample_rate is None and p.expected_batch_size > num_examples:
        raise PlanError(f"privacy.expected_batch_size={p.expected_batch_size} exceeds the N={num_examples} "
                        "private examples")
    q = p.sample_rate if p.sample_rate is not None else p.expected_batch_size / num_examples
    expected = q * num_examples
    chunks = math.ceil(math.ceil(expected) / p.physical_batch_size)
    warnings = []
    if world_size > chunks:
        warnings.append(f"{world_size} ranks but the expected logical batch q*N = {expected:g} makes only {chunks} "
                        f"physical chunk(s) of privacy.physical_batch_size={p.physical_batch_size} per step (chunks "
                        f"are dealt to ranks whole): about {world_size - chunks} rank(s) idle each step; set "
                        f"privacy.physical_batch_size <= {max(1, int(expected // world_size))} to use them all")
    try:
        if p.noise_multiplier is not None:
            sigma = float(p.noise_multiplier)
            calibrated = False
        else:
            sigma = calibrate_noise(p.epsilon, p.delta, q, p.steps, p.accountant)
            calibrated = True
        eps = compute_epsilon(sigma, q, p.steps, p.delta, p.accountant) if sigma > 0 else math.inf
    except PrivacyParameterError as e:
        raise PlanError(str(e)) from None
    per_rank_share = expected / world_size
    plan: dict[str, Any] = {
        "world_size": world_size,
        "zero_stage": zero_stage,
        "num_examples": num_examples,
        "sample_rate": q,
        "expected_logical_batch": expected,
        "expected_share_per_rank": per_rank_share,
        "physical_batch_per_rank": p.physical_batch_size,
        "passes_per_rank_per_step": expected_passes(expected, world_size, p.physical_batch_size),
        "noise_multiplier": sigma,
        "sigma_calibrated": calibrated,
        "max_grad_norm": p.max_grad_norm,
        "noise_std_on_update": sigma * p.max_grad_norm / expected,
        "steps": p.steps,
        "epsilon": eps,
        "target_epsilon": p.epsilon,
        "delta": p.delta,
        "accountant": p.accountant,
        "timesteps_per_example": cfg.diffusion.timesteps_per_example,
        "finetune": cfg.train.finetune,
        "warnings": warnings,
    }
    if counts is not None:
        frozen_bytes = 4 * counts["frozen"]
        plan.update({
            "unet_params": counts["total"],
            "trainable_params": counts["trainable"],
            "frozen_params": counts["frozen"],
            "frozen_bytes_per_rank": frozen_bytes if zero_stage != 3 else math.ceil(frozen_bytes / world_size),
            "frozen_bytes_per_rank_zero0": frozen_bytes,
            "frozen_bytes_per_rank_zero3": math.ceil(frozen_bytes / world_size),
        })
    return plan


def format_plan(plan: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.6g}"
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10_000:
            return f"{v:,}"
        return str(v)

    width = max(len(k) for k in plan)
    lines = [f"  {k:<{width}}  {fmt(v)}" for k, v in plan.items() if k != "warnings"]
    return "\n".join(lines + [f"  warning: {w}" for w in plan.get("warnings", [])])


def count_private(cfg: RunConfig, synthetic: int | None = None) -> int:
    """N without loading the data (dry runs): a latent folder's manifest, or the source's size."""
    if synthetic:
        return int(synthetic)
    folder = Path(cfg.data.private)
    if folder.is_dir() and (folder / "manifest.json").is_file():
        from dpldm.data.manifest import open_shard_folder

        return int(open_shard_folder(folder).num_examples)
    from dpldm.data.sources import load_source

    try:
        _, labels, _ = load_source(cfg.data.private, "train")
    except Exception as e:  # noqa: BLE001 - any source error: say which setting
        raise PlanError(f"data.private={cfg.data.private!r}: {e}") from None
    return int(len(labels))


def plan_only(cfg: RunConfig, *, zero: str = "0", hostfile: str | None = None, world_size: int | None = None,
              synthetic: int | None = None) -> dict[str, Any]:
    """The plan of a launch, without starting ranks (`launch/train.py --dry-run`)."""
    from dpldm.parallel.env import resolve_launch_env
    from dpldm.parallel.zero import load_ds_config, zero_stage

    stage = zero_stage(load_ds_config(zero, cfg.privacy.physical_batch_size))
    if world_size:
        world = int(world_size)
    elif hostfile:
        world = sum(s for _, s in read_hostfile(hostfile))
    else:
        world = resolve_launch_env().world_size
    return resolve_plan(cfg, count_private(cfg, synthetic), world, stage if world > 1 else 0, unet_counts(cfg))
