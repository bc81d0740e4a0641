"""`dpldm finetune`: DP fine-tuning of the attention modules (+ class embedder) of a public LDM.

A thin command over THE trainer (`dpldm.train.dp_finetune.train`), which `launch/train.py` and
`dpldm demo` call too. Under a launcher (torchrun / deepspeed / srun) it runs on every rank;
alone it is one process on `--device` (no DeepSpeed).

    dpldm finetune --config configs/demo.toml --private latents/mnist --out runs/ft [--device cuda]
    dpldm finetune ... --resume        # continue after a stop (SIGTERM / SIGINT / STOP file / --max-steps)

The last line printed is `RESULT_JSON {...}` (model folder, public privacy report, steps).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from dpldm.config import RunConfig, load_config
from dpldm.errors import UserError
from dpldm.train.dp_finetune import FinetuneOptions, print_result, train
from dpldm.utils.device import DEVICE_HELP


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by `dpldm finetune` and `launch/train.py` (one trainer, one vocabulary)."""
    parser.add_argument("--config", help="TOML recipe (configs/*.toml); defaults when omitted")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable), e.g. --set privacy.steps=500")
    parser.add_argument("--out", help="run folder (overrides train.out_dir)")
    parser.add_argument("--allow-older-checkpoint", action="store_true",
                        help="resume from the newest LOADABLE checkpoint when the newest one is corrupt (refused "
                             "otherwise); the steps after it run again and the privacy journal accounts both runs")
    parser.add_argument("--init", help="public LDM folder to start from (default: train.init_checkpoint, else the "
                                       "shipped glyph model)")
    parser.add_argument("--private", help="private data: a built-in source name, an image folder, a .npz, or a latent "
                                          "shard folder from `dpldm data encode` (overrides data.private)")
    parser.add_argument("--device", default=None, metavar="DEVICE", help=f"{DEVICE_HELP} (overrides train.device)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                        help="bf16: autocast forward/backward, fp32 norms, accumulators and noise (train.precision)")
    parser.add_argument("--no-wandb", action="store_true", help="turn wandb logging off")
    parser.add_argument("--not-private", action="store_true",
                        help="state that this run is not private (needed by train.deterministic): epsilon = inf")
    parser.add_argument("--synthetic-latents", type=int, default=None, metavar="N",
                        help="smoke runs: N random latents instead of data.private (NOT private data)")
    parser.add_argument("--random-init", action="store_true",
                        help="smoke runs: fine-tune a randomly initialised model (saved to OUT/init_model)")
    parser.add_argument("--collective-timeout", type=float, default=1800.0, metavar="SECONDS",
                        help="several ranks: how long a rank waits in a collective for its peers before the run stops "
                             "with one line naming the step (a node or the network between nodes failed); default 1800")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser)
    parser.add_argument("--resume", action="store_true", help="continue from the newest step checkpoint in --out")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop after this many logical steps in this invocation (checkpoint, resumable)")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    overrides = list(args.set or [])
    for flag, key in ((args.out, "train.out_dir"), (args.private, "data.private"), (args.device, "train.device"),
                      (args.precision, "train.precision")):
        if flag is not None:
            overrides.append(f"{key}={json.dumps(str(flag))}")
    if args.no_wandb:
        overrides.append("train.wandb=false")
    if args.not_private:
        overrides.append("train.not_private=true")
    return load_config(args.config, overrides)


MAX_SYNTHETIC_LATENTS = 1_000_000  # smoke runs: random latents held in memory


def options_from_args(args: argparse.Namespace, cfg: RunConfig, **extra) -> FinetuneOptions:
    if args.synthetic_latents is not None and args.synthetic_latents < 1:
        raise UserError(f"--synthetic-latents must be >= 1 (it replaces the private data), got {args.synthetic_latents}")
    if args.synthetic_latents is not None and args.synthetic_latents > MAX_SYNTHETIC_LATENTS:
        raise UserError(f"--synthetic-latents {args.synthetic_latents:,}: at most {MAX_SYNTHETIC_LATENTS:,} (a smoke run "
                        "holds them all in memory)")
    if args.init is not None and not str(args.init).strip():
        raise UserError("--init: empty path (name a public model folder, a run folder with model/, or 'public')")
    if not args.collective_timeout > 0:
        raise UserError(f"--collective-timeout must be > 0 seconds, got {args.collective_timeout:g}")
    return FinetuneOptions(out=Path(cfg.train.out_dir), init=args.init, synthetic_latents=args.synthetic_latents or 0,
                           random_init=args.random_init, allow_older_checkpoint=args.allow_older_checkpoint,
                           collective_timeout_s=args.collective_timeout, **extra)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    result = train(cfg, options_from_args(args, cfg, resume=args.resume, max_steps=args.max_steps))
    if result["rank"] == 0:
        print(json.dumps(result["privacy"], indent=2))
        print_result(result)
    return 0
