"""`--device auto|cpu|cuda[:N]` for every command: one parser, one rule, one error.

auto = the first CUDA GPU when torch sees one (in a multi-rank launch: the rank's local GPU,
chosen by dpldm.parallel.dist), else the CPU. An explicit device that does not exist here is an
error naming what was asked and what exists, never a silent fall back to the CPU.
"""
from __future__ import annotations

import argparse
import re

import torch

from dpldm.errors import DeviceError

DEVICE_HELP = "auto (a CUDA GPU when present, else CPU) | cpu | cuda | cuda:N"
_SPEC = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device_spec(spec: str, where: str = "--device") -> str:
    """Validate the text of a device setting without touching any device."""
    if not isinstance(spec, str) or not _SPEC.fullmatch(spec.strip().lower()):
        raise DeviceError(f"{where}: expected {DEVICE_HELP}, got {spec!r}")
    return spec.strip().lower()


def resolve_device(spec: str = "auto", where: str = "--device", local_rank: int = 0) -> torch.device:
    """The torch.device for `spec`; `local_rank` picks the GPU of `auto` under a launcher."""
    spec = check_device_spec(spec, where)
    if spec == "auto":
        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        why = "this torch has no CUDA support" if torch.version.cuda is None else "torch sees no CUDA GPU"
        raise DeviceError(f"{where}={spec}: {why}; use --device cpu (or auto)")
    index = int(spec.split(":")[1]) if ":" in spec else local_rank % torch.cuda.device_count()
    if index >= torch.cuda.device_count():
        raise DeviceError(f"{where}={spec}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                          f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return torch.device("cuda", index)


def add_device_argument(parser: argparse.ArgumentParser, default: str | None = "auto") -> None:
    """The one `--device` option every command takes."""
    parser.add_argument("--device", default=default, metavar="DEVICE", help=DEVICE_HELP)


def describe_device(device: torch.device) -> str:
    """A human name for reports: 'cuda:0 (NVIDIA H200)' or 'cpu (2 threads)'."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"
