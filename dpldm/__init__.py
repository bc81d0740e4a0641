"""dpldm: differentially private latent diffusion models (DP-LDM, arXiv 2305.15759).

Pretrain an autoencoder and a class-conditional latent diffusion model on public images, then
fine-tune only the attention modules on private images with DP-SGD, then sample.

The Python API (docs/api.md); each name is imported on first use (PEP 562), so `import dpldm`
and `dpldm privacy` do not load torch models:

    from dpldm import load_ldm, LatentDiffusion, DPStep, PrivacyLedger, __version__
"""
from __future__ import annotations

import importlib
from typing import Any

# name -> module that defines it
_API: dict[str, str] = {
    "LatentDiffusion": "dpldm.models.ldm",
    "load_ldm": "dpldm.models.ldm",
    "save_ldm": "dpldm.models.ldm",
    "load_public_model": "dpldm.models.ldm",
    "DPStep": "dpldm.privacy.dp_step",
    "PrivacyLedger": "dpldm.privacy.accountant",
    "calibrate_noise": "dpldm.privacy.accountant",
    "compute_epsilon": "dpldm.privacy.accountant",
    "export_diffusers": "dpldm.interop.diffusers_folder",
    "load_diffusers": "dpldm.interop.diffusers_folder",
}

__all__ = sorted([*_API, "__version__"])


def _version() -> str:
    """The installed distribution's version (setup.py's `version`); a source tree that was never
    installed says so instead of guessing."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dpldm")
    except PackageNotFoundError:
        return "0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        value = _version()
    elif name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
    else:
        raise AttributeError(f"module 'dpldm' has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
