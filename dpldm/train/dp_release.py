"""After a DP fine-tuning run: the result line, how to resume a stopped run, and the release of a
model folder from a step checkpoint (`launch/train.py --consolidate`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dpldm.checkpoint import list_step_checkpoints
from dpldm.config import RunConfig
from dpldm.errors import UserError
from dpldm.train.dp_init import state_sha256
from dpldm.train.dp_options import FinetuneOptions

RESULT_PREFIX = "RESULT_JSON "


def resume_hint(opts: FinetuneOptions) -> str:
    """How to continue a stopped run, for the command that was actually run."""
    if opts.command == "launch/train.py":
        if opts.resume == "never":
            return "Resume with the same launch/train.py command with --resume in place of --resume never"
        return ("Resume with the same command: launch/train.py continues from the newest checkpoint (--resume auto, "
                "the default; a plain --resume also refuses to start over when there is none)")
    if opts.resume == "must":
        return "Resume with the same command (it already has --resume)"
    return "Resume with the same command plus --resume"  # dpldm finetune, dpldm demo


def print_result(result: dict[str, Any]) -> None:
    """The machine-readable last line of a trainer run (rank 0)."""
    print(RESULT_PREFIX + json.dumps(result, default=str), flush=True)


def release_from_checkpoint(checkpoint: str | Path, out: str | Path, init: str | None = None,
                            weights: str = "ema") -> Path:
    """`launch/train.py --consolidate`: a model folder from a step checkpoint (or a run folder's
    newest), as the trainer releases it at the end (weights="ema"), or its last iterate ("raw")."""
    from dpldm.checkpoint import CheckpointError, load_checkpoint
    from dpldm.diffusion.ema import EMA
    from dpldm.models.ldm import load_ldm, save_ldm
    from dpldm.privacy import PrivacyLedger
    from dpldm.train.dp_state import KIND, privacy_report
    from dpldm.utils.io import atomic_dir, check_output_dir

    p = Path(checkpoint)
    if not (p / "meta.json").is_file():
        steps = list_step_checkpoints(p)
        if not steps:
            raise CheckpointError(f"{p}: neither a checkpoint folder nor a run folder with checkpoints/step_*")
        p = steps[-1]
    check_output_dir(out, "dpldm-model", overwrite=False, inputs=[("--consolidate", Path(checkpoint)), ("--consolidate", p)])
    tensors, meta = load_checkpoint(p)
    if meta.get("kind") != KIND:
        raise CheckpointError(f"{p}: kind {meta.get('kind')!r} is not a DP fine-tuning checkpoint")
    if weights not in ("ema", "raw"):
        raise UserError(f"weights must be ema|raw, got {weights!r}")
    cfg = RunConfig.from_dict(meta["config"], f"{p}/meta.json")
    ldm = load_ldm(init or meta["init"]["folder"])
    ldm.copy_ema_to_unet()
    if state_sha256(ldm.unet.state_dict()) != meta["init"]["unet_sha256"]:
        raise CheckpointError(f"{init or meta['init']['folder']}: not the model the run started from (UNet sha256)")
    sd = ldm.unet.state_dict()
    prefix = "ema" if weights == "ema" else "train"
    for n in meta["trainable"]:
        sd[n] = tensors[f"{prefix}.{n}"].to(sd[n].dtype)
    ldm.unet.load_state_dict(sd)
    ldm.cfg = cfg
    ldm.ema = EMA(ldm.unet, cfg.train.ema_decay)
    ledger = PrivacyLedger.from_state_dict(meta["privacy"]["ledger"])
    total = sum(t.numel() for t in ldm.unet.state_dict().values())
    trainable = sum(tensors[f"train.{n}"].numel() for n in meta["trainable"])
    report = privacy_report(ledger, cfg.privacy, private=not cfg.train.not_private, trainable=trainable, total=total,
                            finetune=cfg.train.finetune, fixed_shape=meta["privacy"].get("fixed_shape"))
    extra = {"privacy": report, "finetuned_from": meta["init"]["folder"], "private_data": meta["data"]["description"],
             "released_from": {"checkpoint": str(p), "step": meta["step"],
                               "weights": "ema" if prefix == "ema" else "last iterate"}}
    # a new or empty folder only (never the user's files, never the checkpoint or run folder read)
    with atomic_dir(out, overwrite=False, kind="dpldm-model", inputs=[("--consolidate", Path(checkpoint)), ("--consolidate", p)],
                    flag="--out") as tmp:
        save_ldm(tmp, ldm.eval(), extra)
    return Path(out)
