"""`dpldm experiment NAME [--quick] [--out DIR] ...`: the paper's experiments (docs/results.md).

Every experiment resumes after an interruption (results.json keeps every finished run), refuses a
results folder made with other settings, records the command, commit and machine, and writes
results.json, results.md and PNG figures into --out. `--quick` runs every cell tiny (the tests)."""
from __future__ import annotations

import argparse
import importlib

from dpldm.experiments import EXPERIMENTS
from dpldm.experiments.common import add_common_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="experiment", metavar="NAME", required=True)
    for name, (module, help_text) in EXPERIMENTS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_common_arguments(p, name)
        importlib.import_module(module).add_arguments(p)


def run(args: argparse.Namespace) -> int:
    return int(importlib.import_module(EXPERIMENTS[args.experiment][0]).run(args) or 0)
