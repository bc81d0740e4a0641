"""`dpldm <command> ...`: one entry point; each command lives in the module that does the work.

A command module exposes `add_arguments(parser)` and `run(args) -> int`; modules are imported
only when their command is used, so `dpldm privacy ...` does not load the models.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from dpldm.errors import InputError, UserError

__all__ = ["COMMANDS", "InputError", "UserError", "build_parser", "main"]  # UserError: re-exported for old imports

# command -> (module, help). Keep sorted by pipeline order.
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("dpldm.data.cli", "import, encode and inspect webdataset shards"),
    "pretrain-ae": ("dpldm.train.pretrain_ae", "pretrain the autoencoder on public images"),
    "pretrain-ldm": ("dpldm.train.pretrain_ldm", "pretrain the class-conditional LDM on public latents"),
    "privacy": ("dpldm.privacy.cli", "calibrate sigma or report epsilon with Opacus' accountants"),
    "finetune": ("dpldm.train.finetune", "DP fine-tune the attention modules on private data"),
    "sample": ("dpldm.sample", "sample a PNG grid or a labelled set (npz, png-dir) from a checkpoint"),
    "evaluate": ("dpldm.eval.cli", "FID, KID and downstream accuracy of synthetic samples"),
    "audit": ("dpldm.privacy.audit", "one-run empirical privacy audit (Steinke et al. 2023)"),
    "experiment": ("dpldm.experiments.cli", "the paper's experiments: epsilon, ablation, batch, mia, transfer"),
    "export": ("dpldm.export", "export a model as a diffusers folder (or a diffusers folder back to dpldm)"),
    "demo": ("dpldm.demo", "the end-to-end demo on the embedded data"),
}


def _input_error_types() -> tuple[type, ...]:
    """Errors about the user's input (dpldm.errors.InputError and its subclasses: config, data,
    privacy parameters, checkpoints, devices, run folders): one line, exit 2, never a traceback."""
    return (InputError,)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    from dpldm import __version__

    parser = argparse.ArgumentParser(prog="dpldm", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dpldm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    args.command_line = ["dpldm", *argv]  # what a command records as the command that made its output
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print(f"dpldm {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - re-raised unless it is about the user's input
        from dpldm.parallel.failure import PeerFailure

        if isinstance(e, PeerFailure):  # a peer rank or the network failed: one line, exit 3
            print(f"dpldm {args.command}: error: {e}", file=sys.stderr)
            return 3
        if not isinstance(e, _input_error_types()):
            raise
        print(f"dpldm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
