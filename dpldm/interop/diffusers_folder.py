"""Write a dpldm LDM as a diffusers folder (and read one back as a dpldm public init).

    OUT/README.md                                   model card (privacy: epsilon, delta, sigma, q, N, steps, accountant)
    OUT/dpldm.json                                  dpldm's RunConfig, scale factor, privacy report, what is exact
    OUT/unet/{config.json, diffusion_pytorch_model.safetensors}     UNet2DConditionModel
    OUT/vae/{config.json, diffusion_pytorch_model.safetensors}      AutoencoderKL
    OUT/scheduler/scheduler_config.json                             DDIMScheduler
    OUT/class_embedder/{config.json, embedding.safetensors}         "weight": (num_classes + 1, context_dim)

Each component loads with diffusers' own `from_pretrained(OUT, subfolder=...)`. What maps exactly
and what does not: `dpldm.interop.diffusers_layout`. The folder is built beside OUT and renamed
into place, so a failed export leaves nothing half-written. diffusers itself is needed only by
`verify_export`; exporting and importing use safetensors and JSON.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dpldm.checkpoint import CheckpointError, read_json_object
from dpldm.config import ConfigError, RunConfig
from dpldm.interop import diffusers_layout as L
from dpldm.models.privacy_card import is_private, privacy_table
from dpldm.utils.io import atomic_dir

__all__ = ["export_diffusers", "is_private", "load_diffusers", "privacy_table", "verify_export"]  # the card's
# privacy section lives in dpldm.models.privacy_card; re-exported for older imports

FORMAT = "dpldm-diffusers"
KIND = "diffusers-export"  # the output-folder kind (dpldm.utils.io: --overwrite replaces only this kind)
FORMAT_VERSION = 1
WEIGHTS = "diffusion_pytorch_model.safetensors"
EMBEDDER_KEY = "label_embedder.embedding.weight"
CARD_SNIPPET_FOLDER = 'folder = "path/to/this/folder"'

EXACT = {
    "unet": "exact (UNet2DConditionModel with encoder_hidden_states = class_embedder weight[labels][:, None, :])",
    "vae.decoder": "exact (AutoencoderKL.decode)",
    "vae.encoder": "NOT exact when the autoencoder downsamples: diffusers pads asymmetrically before its stride-2 "
                   "convs, dpldm pads 1 on every side; dpldm's import applies the same weights exactly",
    "scheduler.betas": "exact up to float32 (diffusers computes the betas in float32)",
    "scheduler.ddim": "exact when num_inference_steps == num_train_timesteps; with fewer steps diffusers' DDIM "
                      "steps from t to t - T // steps, dpldm to the next of its linspace timesteps",
}


def is_diffusers_folder(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / "unet" / "config.json").is_file() and not (folder / "meta.json").is_file()


# -- export ------------------------------------------------------------------------------------------

def export_diffusers(ldm, out: str | Path, *, use_ema: bool = True, overwrite: bool = False,
                     source: str | None = None, inputs=()) -> Path:
    """Write `ldm` (a LatentDiffusion) to the diffusers folder `out`; UserError when the model
    cannot be expressed exactly (see diffusers_layout.check_exportable) or `out` may not be
    written (dpldm.utils.io.check_output_dir; `inputs`: (flag, path) pairs the command reads)."""
    cfg = ldm.cfg
    unet = ldm.sampling_unet(use_ema)
    L.check_exportable(cfg.unet, cfg.autoencoder, unet, ldm.ae)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in unet.state_dict().items()}
    table = state.pop(EMBEDDER_KEY)  # (num_classes + 1, context_dim)
    unet_state = L.unet_to_diffusers(state, cfg.unet)
    ae_state = L.ae_to_diffusers({k: v.detach().cpu().contiguous().clone() for k, v in ldm.ae.state_dict().items()},
                                 cfg.autoencoder)
    privacy = (getattr(ldm, "meta", None) or {}).get("privacy")
    info = {"format": FORMAT, "version": FORMAT_VERSION, "dpldm_version": _dpldm_version(),
            "config": cfg.to_dict(), "scale_factor": ldm.scale_factor, "weights": "ema" if use_ema else "raw",
            "privacy": privacy, "source": source, "exact": EXACT}
    with atomic_dir(out, overwrite=overwrite, kind=KIND, inputs=inputs) as tmp:
        _write_json(tmp / "unet" / "config.json",
                    L.unet_config(cfg.unet, L.latent_size(cfg.data.image_size, cfg.autoencoder), L.norm_groups(unet)))
        save_file(unet_state, str(tmp / "unet" / WEIGHTS), metadata={"format": "pt"})
        _write_json(tmp / "vae" / "config.json",
                    L.vae_config(cfg.autoencoder, cfg.data.image_size, ldm.scale_factor, L.norm_groups(ldm.ae)))
        save_file(ae_state, str(tmp / "vae" / WEIGHTS), metadata={"format": "pt"})
        _write_json(tmp / "scheduler" / "scheduler_config.json", L.scheduler_config(cfg.diffusion))
        _write_json(tmp / "class_embedder" / "config.json",
                    {"num_classes": cfg.unet.num_classes, "null_class": cfg.unet.num_classes,
                     "context_dim": cfg.unet.context_dim, "shape": list(table.shape),
                     "usage": "encoder_hidden_states = weight[labels][:, None, :]  # (B, 1, context_dim)"})
        save_file({"weight": table}, str(tmp / "class_embedder" / "embedding.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "dpldm.json", info)
        (tmp / "README.md").write_text(model_card(cfg, privacy, info))
    return Path(out)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _dpldm_version() -> str:
    import dpldm

    return dpldm.__version__


# -- model card --------------------------------------------------------------------------------------

def model_card(cfg: RunConfig, privacy: dict[str, Any] | None, info: dict[str, Any]) -> str:
    T = cfg.diffusion.timesteps
    u = cfg.unet
    return f"""---
library_name: diffusers
tags:
- dpldm
- differential-privacy
- latent-diffusion
- class-conditional
---
# Class-conditional latent diffusion model (dpldm {info['dpldm_version']})

Exported by `dpldm export --format diffusers` ({info['weights']} weights). Images
{cfg.data.channels}x{cfg.data.image_size}x{cfg.data.image_size} in [-1, 1]; {u.num_classes} classes
(labels 0..{u.num_classes - 1}) plus the null class {u.num_classes} for classifier-free guidance.

## Privacy

{privacy_table(privacy)}
## Components

| folder | diffusers class | exact? |
| --- | --- | --- |
| `unet/` | `UNet2DConditionModel` | {EXACT['unet']} |
| `vae/` | `AutoencoderKL` (scaling_factor = {info['scale_factor']:.6g}) | decoder: exact; encoder: {EXACT['vae.encoder']} |
| `scheduler/` | `DDIMScheduler` ({L.BETA_SCHEDULES[cfg.diffusion.schedule]}, T = {T}) | {EXACT['scheduler.ddim']} |
| `class_embedder/embedding.safetensors` | (a tensor, not a diffusers model) | `weight` ({u.num_classes + 1}, {u.context_dim}): the UNet's cross-attention context is `weight[labels][:, None, :]`; row {u.num_classes} is the null class |

`dpldm.json` holds dpldm's full configuration; `dpldm sample --checkpoint THIS_FOLDER` and
`dpldm finetune --init THIS_FOLDER` read the folder as it is.

## Sampling with diffusers

```python
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from safetensors.torch import load_file

{CARD_SNIPPET_FOLDER}
unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
table = load_file(f"{{folder}}/class_embedder/embedding.safetensors")["weight"]  # row -1: the null class

labels = torch.tensor([0, 1, 2])
guidance = 1.0  # > 1: classifier-free guidance against the null class
context = table[labels][:, None, :]  # (B, 1, context_dim)
null = table[-1].expand(len(labels), -1)[:, None, :]
scheduler.set_timesteps({T})  # = num_train_timesteps: dpldm's DDIM (eta 0) exactly
size = unet.config.sample_size
x = torch.randn(len(labels), unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    for t in scheduler.timesteps:
        if guidance == 1.0:
            eps = unet(x, t, encoder_hidden_states=context).sample
        else:
            eps_c, eps_u = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([context, null])).sample.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
        x = scheduler.step(eps, t, x).prev_sample
    images = vae.decode(x / vae.config.scaling_factor).sample.clamp(-1, 1)  # (B, C, H, W) in [-1, 1]
```
"""


# -- import ------------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, "not a complete diffusers export")


def _read_tensors(path: Path, missing: str = "dpldm reads safetensors weights only") -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing ({missing})")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None


def _derive(what: str, path: Path, fn, *args):
    try:
        return fn(*args)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, ConfigError) as e:
        detail = f"missing key {e}" if isinstance(e, KeyError) else str(e) or type(e).__name__
        raise CheckpointError(f"{path}: {detail} (cannot be read as dpldm's {what})") from None


def load_diffusers(folder: str | Path):
    """A LatentDiffusion (eval mode, CPU, fresh EMA) from a diffusers folder written by
    `export_diffusers` -- or any folder with the same components and a class embedding table.
    The architecture comes from the diffusers configs (cross-checked against dpldm.json when it is
    there); the other settings from dpldm.json, else dpldm's defaults."""
    from dpldm.diffusion.ema import EMA
    from dpldm.models.latent_diffusion import LatentDiffusion, _load_strict

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    uc_path, vc_path = folder / "unet" / "config.json", folder / "vae" / "config.json"
    sc_path = folder / "scheduler" / "scheduler_config.json"
    uc, vc, sc = _read_json(uc_path), _read_json(vc_path), _read_json(sc_path)
    table_path = folder / "class_embedder" / "embedding.safetensors"
    table = _read_tensors(table_path, "dpldm needs the class embedding table: the UNet's context is "
                                      "weight[labels]").get("weight")
    if table is None or table.ndim != 2 or table.shape[0] < 2:
        raise CheckpointError(f"{table_path}: needs a 2-D 'weight' (num_classes + 1, context_dim)")
    info = _read_json(folder / "dpldm.json") if (folder / "dpldm.json").exists() else {}
    if info and info.get("format") != FORMAT:
        raise CheckpointError(f"{folder / 'dpldm.json'}: format {info.get('format')!r} is not {FORMAT!r}")
    base = _derive("configuration", folder / "dpldm.json", RunConfig.from_dict, info.get("config", {}),
                   f"{folder / 'dpldm.json'}")
    unet_cfg = _derive("UNet", uc_path, L.unet_config_from, uc, int(table.shape[0]) - 1)
    ae_cfg = _derive("autoencoder", vc_path, L.ae_config_from, vc, base.autoencoder.kl_weight)
    diff_cfg = _derive("noise schedule", sc_path, L.diffusion_config_from, sc, base.diffusion)
    if info:  # the diffusers configs are what the weights follow; dpldm.json must agree with them
        for name, derived, path in (("unet", unet_cfg, uc_path), ("autoencoder", ae_cfg, vc_path),
                                    ("diffusion", diff_cfg, sc_path)):
            ours = dataclasses.asdict(getattr(base, name))
            diffs = [f"{name}.{k}: {v!r} here, {ours[k]!r} in dpldm.json"
                     for k, v in dataclasses.asdict(derived).items() if _differs(v, ours[k])]
            if diffs:
                raise CheckpointError(f"{path}: does not match {folder / 'dpldm.json'}: {'; '.join(diffs)}")
    image_size = vc.get("sample_size", base.data.image_size)
    if not _is_int(image_size):
        raise CheckpointError(f"{vc_path}: sample_size must be an integer (the image size), got {image_size!r}")
    scale = vc.get("scaling_factor", info.get("scale_factor", 1.0))
    if not (_is_number(scale) and math.isfinite(scale) and scale > 0):
        raise CheckpointError(f"{vc_path}: scaling_factor must be a finite number > 0 (decoding divides the "
                              f"latents by it), got {scale!r}")
    data = dataclasses.replace(base.data, image_size=image_size, channels=ae_cfg.in_channels,
                               num_classes=min(base.data.num_classes, unet_cfg.num_classes))
    cfg = _derive("configuration", folder, lambda: dataclasses.replace(
        base, unet=unet_cfg, autoencoder=ae_cfg, diffusion=diff_cfg, data=data))
    ldm = LatentDiffusion(cfg, scale_factor=float(scale))
    _check_configs_as_exported(folder, ldm, {uc_path: uc, vc_path: vc, sc_path: sc}, table)
    unet_state = _derive("UNet weights", uc_path.parent / WEIGHTS, L.unet_from_diffusers,
                         _read_tensors(uc_path.parent / WEIGHTS), cfg.unet)
    unet_state[EMBEDDER_KEY] = table
    _load_strict(ldm.unet, unet_state, uc_path.parent, "unet")
    ae_state = _derive("autoencoder weights", vc_path.parent / WEIGHTS, L.ae_from_diffusers,
                       _read_tensors(vc_path.parent / WEIGHTS), cfg.autoencoder)
    _load_strict(ldm.ae, ae_state, vc_path.parent, "vae")
    ldm.ema = EMA(ldm.unet, cfg.train.ema_decay)
    ldm.meta = {"kind": "ldm", "config": cfg.to_dict(), "scale_factor": ldm.scale_factor,
                "privacy": info.get("privacy"), "imported_from": str(folder), "format": "diffusers"}
    return ldm.eval()


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _same(a: Any, b: Any) -> bool:
    """JSON values equal as export_diffusers would write them (floats to 1e-12 relative)."""
    if _is_number(a) and _is_number(b):
        return math.isfinite(a) and not _differs(a, b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _check_configs_as_exported(folder: Path, ldm, configs: dict[Path, dict[str, Any]], table: torch.Tensor) -> None:
    """Every key a component config shares with what `export_diffusers` writes for the derived
    architecture must hold that value: a key dpldm does not read to build the model (norm_num_groups,
    conv kernels, padding, block types, scheduler flags, ...) but that diffusers would follow
    would otherwise be silently ignored, and dpldm would sample from a different model."""
    cfg = ldm.cfg
    uc_path, vc_path, sc_path = configs
    expected = {
        uc_path: L.unet_config(cfg.unet, L.latent_size(cfg.data.image_size, cfg.autoencoder), L.norm_groups(ldm.unet)),
        vc_path: L.vae_config(cfg.autoencoder, cfg.data.image_size, ldm.scale_factor, L.norm_groups(ldm.ae)),
        sc_path: L.scheduler_config(cfg.diffusion),
    }
    emb_path = folder / "class_embedder" / "config.json"
    if emb_path.is_file():
        configs = {**configs, emb_path: _read_json(emb_path)}
        expected[emb_path] = {"num_classes": cfg.unet.num_classes, "null_class": cfg.unet.num_classes,
                              "context_dim": cfg.unet.context_dim, "shape": list(table.shape)}
    for path, want in expected.items():
        have = configs[path]
        bad = [f"{k}: {have[k]!r}, but the weights' architecture needs {v!r}" for k, v in want.items()
               if k in have and not k.startswith("_") and not _same(have[k], v)]
        if bad:
            raise CheckpointError(f"{path}: {'; '.join(bad)} (dpldm cannot express this diffusers setting)")


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return not abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(b)))
    return tuple(a) != tuple(b) if isinstance(a, (list, tuple)) else a != b


# -- verification against diffusers itself ------------------------------------------------------------

@torch.no_grad()
def verify_export(ldm, folder: str | Path, device: str | torch.device = "cpu", use_ema: bool = True,
                  batch: int = 2, seed: int = 0) -> dict[str, float]:
    """Load `folder` with diffusers' from_pretrained and compare with `ldm` on random inputs:
    max |difference| of one UNet forward and one decode, relative to the output's max |value|."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    folder, device = Path(folder), torch.device(device)
    quiet = {"low_cpu_mem_usage": False}  # (without `accelerate` diffusers would warn that it cannot be low)
    unet_d = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **quiet).to(device).eval()
    vae_d = AutoencoderKL.from_pretrained(folder, subfolder="vae", **quiet).to(device).eval()
    table = load_file(str(folder / "class_embedder" / "embedding.safetensors"))["weight"].to(device)
    ldm = ldm.to(device)
    unet = ldm.sampling_unet(use_ema)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((batch, *ldm.latent_shape), generator=g).to(device)  # (B, Z, h, w)
    t = torch.randint(0, ldm.schedule.num_timesteps, (batch,), generator=g).to(device)
    y = torch.randint(0, ldm.cfg.unet.num_classes + 1, (batch,), generator=g).to(device)
    ours = unet(z, t, y)
    theirs = unet_d(z, t, encoder_hidden_states=table[y][:, None, :]).sample
    dec_ours = ldm.ae.decode(z)
    dec_theirs = vae_d.decode(z).sample

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

    return {"unet_rel_err": rel(theirs, ours), "decode_rel_err": rel(dec_theirs, dec_ours)}
