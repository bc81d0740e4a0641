"""The model a DP fine-tuning run starts from: the public init model (or a random one for smoke
runs), checked against the recipe, with its EMA weights as the starting point and the hashes a
resume and a release check it by."""
from __future__ import annotations

from pathlib import Path

import torch

from dpldm.config import RunConfig
from dpldm.errors import UserError
from dpldm.train.dp_options import FinetuneOptions
from dpldm.train.dp_state import InitInfo


def check_model_config(cfg: RunConfig, saved: RunConfig, where: Path) -> None:
    """The recipe's model sections must describe the checkpoint being fine-tuned."""
    now, then = cfg.to_dict(), saved.to_dict()
    diffs = [f"{s}.{k}: recipe {now[s][k]!r} != checkpoint {then[s][k]!r}"
             for s in ("autoencoder", "unet") for k in now[s] if now[s][k] != then[s][k]]
    for k in ("schedule", "timesteps", "beta_start", "beta_end"):
        if now["diffusion"][k] != then["diffusion"][k]:
            diffs.append(f"diffusion.{k}: recipe {now['diffusion'][k]!r} != checkpoint {then['diffusion'][k]!r}")
    for k in ("image_size", "channels"):  # the images (and so latents) the public model was trained on
        if now["data"][k] != then["data"][k]:
            diffs.append(f"data.{k}: recipe {now['data'][k]!r} != checkpoint {then['data'][k]!r}")
    if diffs:
        raise UserError(f"--init {where} does not match the recipe: {'; '.join(diffs)}")


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    from dpldm.data.latents import ae_state_hash

    return ae_state_hash(state)


def load_init(cfg: RunConfig, opts: FinetuneOptions, run_dir: Path):
    """Rank 0: (InitInfo, the init LDM on CPU with its UNet set to the public EMA weights)."""
    from dpldm.models.ldm import LatentDiffusion, _model_folder, load_ldm, public_model_path, save_ldm

    if opts.random_init:
        folder = run_dir / "init_model"
        if not (folder / "meta.json").is_file():
            print(f"warning: --random-init: fine-tuning a RANDOMLY initialised model (smoke run), saved to {folder}",
                  flush=True)
            # a private run never seeds torch from the public train.seed (anything later drawing from the global
            # generator would be predictable); a seeded run (train.deterministic, not private) does, reproducibly
            from dpldm.train.draws import new_secret_seed

            torch.manual_seed(cfg.train.seed if cfg.train.deterministic else new_secret_seed())
            save_ldm(folder, LatentDiffusion(cfg))
    else:
        spec = opts.init or cfg.train.init_checkpoint
        folder = public_model_path() if not spec or spec == "public" else _model_folder(spec)
    ldm = load_ldm(folder)
    check_model_config(cfg, ldm.cfg, folder)
    ldm.copy_ema_to_unet()  # fine-tune from the public EMA weights
    ldm.ae.requires_grad_(False).eval()
    info = InitInfo(folder=str(folder), scale_factor=float(ldm.scale_factor),
                    ae_sha256=state_sha256(ldm.ae.state_dict()), unet_sha256=state_sha256(ldm.unet.state_dict()))
    return info, ldm
