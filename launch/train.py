#!/usr/bin/env python
"""Distributed DP fine-tuning of the attention modules: one entry point for every launcher,
over the same trainer as `dpldm finetune` (dpldm.train.dp_finetune).

    deepspeed --hostfile hosts launch/train.py --config configs/X.toml --zero 3
    deepspeed --num_gpus 8 launch/train.py --config configs/X.toml
    torchrun --nnodes 2 --nproc_per_node 8 ... launch/train.py --config configs/X.toml
    srun python launch/train.py --config configs/X.toml          (one task per rank)
    python launch/train.py --config configs/X.toml               (one process: no DeepSpeed)

    python launch/train.py --config configs/X.toml --dry-run --hostfile hosts
        prints the resolved plan (world size, passes per rank, expected logical batch, sigma,
        steps, epsilon) and exits without training
    python launch/train.py --consolidate runs/X [--out DIR]
        writes a model folder from the newest DP checkpoint of runs/X (what the run releases at
        its end), for `dpldm sample` / `dpldm evaluate`

A run resumes from the newest checkpoint in --out (default train.out_dir), on any number of
ranks, and starts a new run when there is none (`--resume auto`, the default). A plain `--resume`
(= `--resume must`) refuses to start over: --out must hold a step checkpoint. `--resume never`
refuses to continue. SIGTERM/SIGUSR1/SIGINT or a file named STOP in --out make every rank finish
the current logical step, checkpoint and exit 0; the same command resumes.
The last line printed (rank 0) is `RESULT_JSON {...}`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere, installed or not
    sys.path.insert(0, str(ROOT))


def build_parser() -> argparse.ArgumentParser:
    from dpldm.train.finetune import add_run_arguments

    p = argparse.ArgumentParser(prog="launch/train.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_run_arguments(p)
    p.add_argument("--zero", default="0", help="ZeRO stage 0-3 (launch/ds_configs/zeroN.json) or a DeepSpeed JSON path "
                                               "(several ranks; one rank runs without DeepSpeed)")
    p.add_argument("--resume", nargs="?", choices=("auto", "must", "never"), default="auto", const="must",
                   help="auto (default): continue from the newest checkpoint in --out, or start a new run when there is "
                        "none; --resume alone (= must): continue, and refuse when --out holds no checkpoint; never: "
                        "refuse if there is one")
    p.add_argument("--max-steps", "--stop-after", dest="max_steps", type=int, default=None, metavar="K",
                   help="stop (checkpoint, exit 0) after K logical steps of this invocation")
    p.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto", help="process-group backend")
    p.add_argument("--check-every", type=int, default=0, metavar="K",
                   help="check every K steps that the trainable parameters are bit-identical on all ranks")
    p.add_argument("--dry-run", action="store_true", help="print the resolved plan and exit")
    p.add_argument("--hostfile", help="with --dry-run: take the world size from this DeepSpeed hostfile")
    p.add_argument("--world-size", type=int, help="with --dry-run: the world size to plan for")
    p.add_argument("--consolidate", metavar="RUN_OR_CHECKPOINT",
                   help="write a model folder from a DP checkpoint (to --out, default RUN/model) and exit")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema",
                   help="with --consolidate: the EMA (what the run releases) or the last iterate")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed passes it
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dpldm.errors import InputError
    from dpldm.parallel.failure import PeerFailure

    try:
        return _main(args)
    except InputError as e:
        print(f"launch/train.py: error: {e}", file=sys.stderr, flush=True)
        return 2
    except PeerFailure as e:  # a peer rank died or the network between nodes failed: one line, exit 3
        print(f"launch/train.py: error: {e}", file=sys.stderr, flush=True)
        return 3


def _main(args: argparse.Namespace) -> int:
    import json

    from dpldm.errors import UserError
    from dpldm.train.dp_finetune import print_result, release_from_checkpoint, train
    from dpldm.train.finetune import config_from_args, options_from_args

    if args.consolidate:
        out = Path(args.out) if args.out else Path(args.consolidate) / "model"
        print(f"consolidated single-process model: {release_from_checkpoint(args.consolidate, out, args.init, args.weights)}")
        return 0
    if (args.hostfile or args.world_size) and not args.dry_run:
        raise UserError("--hostfile/--world-size here only plan a --dry-run; to launch, give the hostfile to the "
                        "launcher: deepspeed --hostfile hosts launch/train.py ...")
    cfg = config_from_args(args)
    if args.dry_run:
        from dpldm.parallel.plan import format_plan, plan_only

        plan = plan_only(cfg, zero=args.zero, hostfile=args.hostfile, world_size=args.world_size,
                         synthetic=args.synthetic_latents)
        print("dry run: resolved plan (nothing trained)")
        print(format_plan(plan))
        print("PLAN_JSON " + json.dumps(plan, sort_keys=True))
        return 0
    result = train(cfg, options_from_args(args, cfg, resume=args.resume, max_steps=args.max_steps,
                                          zero=str(args.zero), dist_backend=args.backend, check_every=args.check_every,
                                          command="launch/train.py"))
    if result["rank"] == 0:
        print_result(result)
    return 0


def _leave(code: int) -> None:
    """A rank of a multi-rank run leaves with os._exit once its work is written and its output
    flushed: C++ static destructors at interpreter exit sometimes aborted rank 1 ('terminate called
    without an active exception', SIGABRT) after a finished run whose process group was already
    destroyed (seen twice in clean-clone CI runs; a barrier before the teardown did not cure it)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)


if __name__ == "__main__":
    _leave(main())
