"""Backend discovery for dpldm.kernels: which backend can run on which device, and why not.

backend = "auto" | "torch" | "triton" | "cpp" | "cuda"
  torch   plain PyTorch reference (always available, any device)
  triton  Triton kernels (kernels/*_triton.py): CUDA tensors, or CPU tensors when the Triton
          interpreter is on (TRITON_INTERPRET=1 before the first Triton use; slow, for tests)
  cpp     the C++/OpenMP extension dpldm._C (csrc/*.cpp): CPU tensors
  cuda    the CUDA extension dpldm._cuda (csrc/cuda/*.cu): CUDA tensors, built only where
          torch has CUDA
  auto    chosen by kernels/registry.py (`select()`: the fixed rule, or a KernelSelector's
          measurement); this module only answers "can backend X run here, and if not, why".
Asking for a backend that cannot run on the tensor at hand raises BackendUnavailableError with
the reason (raised by registry.select).
"""
from __future__ import annotations

import importlib
import os
from functools import lru_cache

import torch

from dpldm.errors import InputError

BACKENDS = ("auto", "torch", "triton", "cpp", "cuda")


class BackendUnavailableError(InputError, RuntimeError):
    """The requested kernel backend cannot run here; the message says why (an input error: the
    CLI prints it as one line, exit 2)."""


@lru_cache(maxsize=None)
def _import(name: str):
    """(module or None, reason)."""
    try:
        return importlib.import_module(name), ""
    except Exception as e:  # noqa: BLE001 - any import failure means "not available", with its reason
        return None, f"{type(e).__name__}: {e}"


def cpp_ext():
    """The dpldm._C module or None."""
    return _import("dpldm._C")[0]


def cuda_ext():
    """The dpldm._cuda module or None."""
    return _import("dpldm._cuda")[0]


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cpu")
    return device if isinstance(device, torch.device) else torch.device(device)


def why_unavailable(backend: str, device=None) -> str | None:
    """None when `backend` can run on tensors of `device` (default CPU), else the reason."""
    dev = _device(device)
    if backend == "torch":
        return None
    if backend == "cpp":
        mod, err = _import("dpldm._C")
        if mod is None:
            return ("the C++ extension dpldm._C is not built (build it with `python setup.py build_ext "
                    f"--inplace` or `pip install --no-build-isolation -e .`; import said: {err})")
        if dev.type != "cpu":
            return f"the C++ extension runs on CPU tensors, got a {dev.type} tensor"
        return None
    if backend == "cuda":
        if dev.type != "cuda":
            return f"the CUDA extension needs CUDA tensors, got a {dev.type} tensor"
        mod, err = _import("dpldm._cuda")
        if mod is None:
            why = "torch has no CUDA" if torch.version.cuda is None else (
                "it was skipped (DPLDM_SKIP_CUDA_BUILD=1) or failed to build")
            return f"the CUDA extension dpldm._cuda is not built ({why}; import said: {err})"
        return None
    if backend == "triton":
        mod, err = _import("triton")
        if mod is None:
            return f"triton is not importable ({err})"
        if dev.type == "cuda":
            return None
        if dev.type == "cpu" and triton_interpreting():
            return None
        return (f"Triton kernels need CUDA tensors (got a {dev.type} tensor); on CPU they run only under "
                "the interpreter, TRITON_INTERPRET=1 set before the first Triton use (slow; for tests)")
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def available_backends(device=None) -> tuple[str, ...]:
    """Concrete backends that can run on tensors of `device` (default CPU), in the fixed rule's order of
    preference (registry.py; torch last)."""
    dev = _device(device)
    order = ("triton", "cuda", "torch") if dev.type == "cuda" else ("cpp", "triton", "torch")
    return tuple(b for b in order if why_unavailable(b, dev) is None)


def backend_report() -> dict[str, str]:
    """{backend: "available" or the reason it is not}, for CPU and (when present) CUDA tensors."""
    out = {}
    devs = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for d in devs:
        for b in BACKENDS[1:]:
            why = why_unavailable(b, d)
            out[f"{b}@{d}"] = "available" if why is None else why
    return out
