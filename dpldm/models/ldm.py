"""`LatentDiffusion`: the pretrained bundle (autoencoder, UNet, schedule, latent scale, EMA).

A model folder (dpldm.checkpoint format) holds tensors `ae.*`, `unet.*`, `ema.*` and a
meta.json with {"kind": "ldm", "config": <RunConfig>, "scale_factor": s, ...}. Latents seen by
the UNet are `scale_factor * z`, with scale_factor = 1 / std of the public latents (computed
after autoencoder pretraining, as in LDM), so they have roughly unit variance.
An autoencoder-only folder (`dpldm pretrain-ae`) has kind "autoencoder" and tensors `ae.*`.
"""
from __future__ import annotations

import importlib.resources
import warnings
from pathlib import Path
from typing import Any


from dpldm.checkpoint import CheckpointError, load_checkpoint, prefixed, save_checkpoint, unprefixed
from dpldm.config import RunConfig
from dpldm.diffusion.ema import EMA
from dpldm.models.autoencoder import Autoencoder
from dpldm.models.latent_diffusion import LatentDiffusion, _load_strict, check_usable
from dpldm.models.privacy_card import is_private, privacy_table
from dpldm.utils.io import atomic_write_text

__all__ = ["CARD", "CARD_SIGNATURE", "LatentDiffusion", "PUBLIC_MODEL", "check_usable", "load_autoencoder", "load_ldm",
           "load_public_model", "model_card", "public_model_path", "save_autoencoder", "save_ldm"]

PUBLIC_MODEL = "public_glyphs"


def _model_folder(folder: str | Path) -> Path:
    """Accept a model folder or a run folder that has one in `model/`."""
    if not str(folder).strip():
        raise CheckpointError("empty path given for a model folder (name a model folder or a run folder with model/)")
    folder = Path(folder)
    if not (folder / "meta.json").is_file() and (folder / "model" / "meta.json").is_file():
        return folder / "model"
    return folder


def save_autoencoder(folder: str | Path, ae: Autoencoder, cfg: RunConfig, extra: dict[str, Any] | None = None) -> Path:
    meta = {"kind": "autoencoder", "config": cfg.to_dict(), **(extra or {})}
    return save_checkpoint(folder, prefixed("ae", ae.state_dict()), meta)


def _is_diffusers_folder(folder: Path) -> bool:
    """A folder written by `dpldm export --format diffusers` (unet/, vae/, ...; no meta.json)."""
    return (folder / "unet" / "config.json").is_file() and not (folder / "meta.json").is_file()


def load_autoencoder(folder: str | Path) -> tuple[Autoencoder, RunConfig, dict[str, Any]]:
    """An autoencoder from an "autoencoder" or "ldm" folder (or a run folder with `model/`, or a
    diffusers folder)."""
    folder = _model_folder(folder)
    if _is_diffusers_folder(folder):
        ldm = load_ldm(folder)
        return ldm.ae, ldm.cfg, ldm.meta
    tensors, meta = load_checkpoint(folder)
    if meta.get("kind") not in ("autoencoder", "ldm"):
        raise CheckpointError(f"{folder}: kind {meta.get('kind')!r} holds no autoencoder")
    cfg = RunConfig.from_dict(meta["config"], f"{folder}/meta.json")
    ae = Autoencoder(cfg.autoencoder)
    _load_strict(ae, unprefixed("ae", tensors), folder, "ae")
    return ae, cfg, meta


CARD = "README.md"
CARD_SIGNATURE = "A dpldm model folder:"  # how save_ldm recognises its own card (never replaces another README.md)


def save_ldm(folder: str | Path, ldm: LatentDiffusion, extra: dict[str, Any] | None = None) -> Path:
    """Write the bundle (AE, UNet, EMA, RunConfig, scale_factor) atomically into `folder`, with a
    model card `README.md` (model_card: what it is, its privacy report, how to use it)."""
    tensors = {**prefixed("ae", ldm.ae.state_dict()), **prefixed("unet", ldm.unet.state_dict()),
               **prefixed("ema", ldm.ema.state_dict())}
    meta = {"kind": "ldm", "config": ldm.cfg.to_dict(), "scale_factor": ldm.scale_factor, **(extra or {})}
    folder = save_checkpoint(folder, tensors, meta)
    card = folder / CARD
    if card.exists() and CARD_SIGNATURE not in card.read_text(errors="replace"):
        warnings.warn(f"{card}: not a dpldm model card; left as it is (the model card was not written)", stacklevel=2)
    else:
        atomic_write_text(card, model_card(ldm.cfg, meta))
    return folder


def model_card(cfg: RunConfig, meta: dict[str, Any]) -> str:
    """The model card of a native model folder: the diffusers export's privacy section
    (dpldm.models.privacy_card.privacy_table, the same wording and numbers), where the
    model came from, and the commands that use it."""
    import dpldm

    privacy = meta.get("privacy")
    d, u = cfg.data, cfg.unet
    origin = []
    if meta.get("finetuned_from"):
        origin.append(f"fine-tuned from `{meta['finetuned_from']}`")
    if privacy and privacy.get("finetune"):
        trained = f"trained modules `{privacy['finetune']}`"
        if privacy.get("trainable_parameters") and privacy.get("total_unet_parameters"):
            trained += (f" ({privacy['trainable_parameters']:,} of {privacy['total_unet_parameters']:,} UNet "
                        "parameters; everything else is the initial model's)")
        origin.append(trained)
    released = meta.get("released_from")
    if isinstance(released, dict):
        origin.append(f"released from step {released.get('step')} ({released.get('weights')} weights) by "
                      "`launch/train.py --consolidate`")
    if not privacy and meta.get("public"):
        steps = f" for {meta['steps']} steps" if meta.get("steps") else ""
        origin.append(f"pretrained by `dpldm pretrain-ldm` on the public data `{meta['public']}`{steps}")
    text = "; ".join(origin)
    origin_text = f" {text[0].upper()}{text[1:]}." if text else ""
    private = is_private(privacy)
    what = "differentially private fine-tune" if private else "model"
    tags = "\n".join(f"- {t}" for t in ["dpldm", "latent-diffusion", "class-conditional"]
                     + (["differential-privacy"] if private else []))
    return f"""---
tags:
{tags}
---
# Class-conditional latent diffusion {what} (dpldm {dpldm.__version__})

{CARD_SIGNATURE} `tensors.safetensors` (autoencoder `ae.*`, UNet `unet.*`, its EMA `ema.*`) and
`meta.json` (configuration, latent scale factor{', privacy report' if privacy else ''}). Images
{d.channels}x{d.image_size}x{d.image_size} in [-1, 1]; {u.num_classes} classes (labels 0..{u.num_classes - 1}) plus the
null class {u.num_classes} for classifier-free guidance.{origin_text}

## Privacy

{privacy_table(privacy)}
## Use

```bash
dpldm sample --checkpoint THIS_FOLDER --classes 0,1,2 --n 8 --out grid.png
dpldm sample --checkpoint THIS_FOLDER --per-class 100 --format npz --out samples.npz   # for dpldm evaluate
dpldm export --checkpoint THIS_FOLDER --format diffusers --out hf/                       # diffusers folder + card
```
```python
from dpldm import load_ldm
ldm = load_ldm("THIS_FOLDER")  # LatentDiffusion, eval mode; ldm.meta holds meta.json
```
"""


def load_ldm(folder: str | Path) -> LatentDiffusion:
    """Load a folder written by `save_ldm` (or a run folder with `model/`, or a diffusers folder
    written by `dpldm export --format diffusers`: dpldm.interop.diffusers_folder); eval mode, on CPU."""
    folder = _model_folder(folder)
    if _is_diffusers_folder(folder):
        from dpldm.interop.diffusers_folder import load_diffusers

        ldm = load_diffusers(folder)
        check_usable(ldm, str(folder))
        return ldm
    tensors, meta = load_checkpoint(folder)
    if meta.get("kind") != "ldm":
        raise CheckpointError(f"{folder}: expected an LDM checkpoint (kind 'ldm'), got {meta.get('kind')!r}")
    cfg = RunConfig.from_dict(meta["config"], f"{folder}/meta.json")
    ldm = LatentDiffusion(cfg, scale_factor=meta["scale_factor"])
    _load_strict(ldm.ae, unprefixed("ae", tensors), folder, "ae")
    _load_strict(ldm.unet, unprefixed("unet", tensors), folder, "unet")
    ema_state = unprefixed("ema", tensors)
    if ema_state:
        ldm.ema.load_state_dict(ema_state)
    else:
        ldm.ema = EMA(ldm.unet, cfg.train.ema_decay)
    ldm.meta = meta
    check_usable(ldm, str(folder))
    return ldm.eval()


def public_model_path() -> Path:
    return Path(str(importlib.resources.files("dpldm") / "assets" / PUBLIC_MODEL))


def load_public_model() -> LatentDiffusion:
    """The shipped glyph model (`dpldm/assets/public_glyphs/`)."""
    path = public_model_path()
    if not (path / "meta.json").is_file():
        raise CheckpointError(f"{path}: the shipped public model is missing (see docs/pretraining.md)")
    return load_ldm(path)
