#!/usr/bin/env python
"""Distributed DP fine-tuning of the attention modules: one entry point for every launcher.

    deepspeed --hostfile hosts launch/train.py --config configs/X.toml --zero 3
    deepspeed --num_gpus 8 launch/train.py --config configs/X.toml
    torchrun --nnodes 2 --nproc_per_node 8 ... launch/train.py --config configs/X.toml
    srun python launch/train.py --config configs/X.toml          (one task per rank)
    python launch/train.py --config configs/X.toml               (one process)

    python launch/train.py --config configs/X.toml --dry-run --hostfile hosts
        prints the resolved plan (world size, per-rank physical batch, expected logical batch,
        sigma, steps, epsilon) and exits without training
    python launch/train.py --consolidate runs/X [--out DIR]
        writes a single-process LDM folder (AE + UNet with the trained attention weights) from
        the newest DP checkpoint, for `dpldm sample` / `dpldm evaluate`

A run resumes from the newest checkpoint in --out (default train.out_dir), on any number of
ranks. SIGTERM/SIGUSR1 or a file named STOP in --out make every rank finish the current
logical step, checkpoint and exit 0.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere, installed or not
    sys.path.insert(0, str(ROOT))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/train.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", help="TOML recipe (configs/*.toml); defaults when omitted")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
    p.add_argument("--zero", default="0", help="ZeRO stage 0-3 (launch/ds_configs/zeroN.json) or a DeepSpeed JSON path")
    p.add_argument("--out", help="run folder (default: train.out_dir); checkpoints/ and model/ go here")
    p.add_argument("--resume", choices=("auto", "never"), default="auto",
                   help="auto: continue from the newest checkpoint in --out (default)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved plan and exit")
    p.add_argument("--hostfile", help="with --dry-run: take the world size from this DeepSpeed hostfile")
    p.add_argument("--world-size", type=int, help="with --dry-run: the world size to plan for")
    p.add_argument("--synthetic-latents", type=int, default=0, metavar="N",
                   help="smoke runs: N random latents instead of data.private (not private data)")
    p.add_argument("--random-init", action="store_true",
                   help="smoke runs: fine-tune a randomly initialised model (saved to OUT/init_model) instead of "
                        "train.init_checkpoint (default: the shipped public glyph model)")
    p.add_argument("--sampling-seed", type=int, help="Poisson plan seed (default: drawn from the OS; keep private)")
    p.add_argument("--noise-seed", type=int,
                   help="TESTS ONLY: seeded noise (whoever knows the seed can subtract the noise)")
    p.add_argument("--stop-after", type=int, default=0, metavar="K",
                   help="stop (checkpoint, exit 0) after K logical steps of this invocation")
    p.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto")
    p.add_argument("--check-every", type=int, default=0, metavar="K",
                   help="check every K steps that the trainable parameters are bit-identical on all ranks")
    p.add_argument("--consolidate", metavar="RUN_OR_CHECKPOINT",
                   help="write a single-process model from a DP checkpoint and exit")
    p.add_argument("--init", help="with --consolidate: the init LDM folder (default: the one the run recorded)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed passes it
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dpldm.checkpoint import CheckpointError
    from dpldm.config import ConfigError
    from dpldm.parallel.env import LaunchError
    from dpldm.parallel.plan import PlanError
    from dpldm.parallel.runner import main_consolidate, options_from_args, run
    from dpldm.parallel.zero import ZeroConfigError
    from dpldm.privacy.accountant import PrivacyParameterError

    try:
        if args.consolidate:
            return main_consolidate(args.consolidate, args.out, args.init)
        if (args.hostfile or args.world_size) and not args.dry_run:
            raise PlanError("--hostfile/--world-size here only plan a --dry-run; to launch, give the hostfile to "
                            "the launcher: deepspeed --hostfile hosts launch/train.py ...")
        return run(options_from_args(args))
    except (ConfigError, PlanError, LaunchError, ZeroConfigError, PrivacyParameterError, CheckpointError) as e:
        print(f"launch/train.py: error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
