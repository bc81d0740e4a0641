"""dpldm's UNet / autoencoder / schedule expressed in diffusers' on-disk layout, both ways.

Pure functions (no diffusers import): the component configs (`config.json` keys of
UNet2DConditionModel, AutoencoderKL, DDIMScheduler) and the state-dict key maps. The mapping is
exact -- the same function to float rounding -- when `check_exportable` passes:

* UNet -> UNet2DConditionModel: one GroupNorm group count for every norm (diffusers has a single
  `norm_num_groups`; dpldm uses gcd(32, channels), so all widths must share it: multiples of 32),
  `unet.channel_mult[0] == 1` (diffusers' conv_in and time projection use block_out_channels[0],
  dpldm uses model_channels), and `unet.middle_attention = true` (diffusers' UNetMidBlock2D
  without attention has one ResBlock, dpldm's middle block has two). `attention_head_dim` holds
  the number of heads (diffusers' historical misnomer; it derives head_dim = channels / heads).
  The class embedder is not part of UNet2DConditionModel: its table is exported on its own and
  `encoder_hidden_states = table[labels][:, None, :]` (B, 1, context_dim).
* Autoencoder -> AutoencoderKL (quant convs off, no mid-block attention): the decoder is exact.
  The encoder is NOT: diffusers' Encoder downsamples with asymmetric padding (pad right/bottom by
  one, then a stride-2 conv without padding), dpldm's with a padded (1 on every side) stride-2
  conv, so `AutoencoderKL.encode` differs wherever the autoencoder downsamples (f > 1). Its
  weights are exported (AutoencoderKL needs them) and dpldm's import applies them exactly.
* Schedule -> DDIMScheduler ("scaled_linear" = dpldm "linear", "squaredcos_cap_v2" = "cosine";
  diffusers computes the betas in float32). Its "linspace" spacing gives dpldm's timesteps, but
  diffusers' DDIM step goes from t to t - T // steps rather than to the next listed timestep, so
  a diffusers DDIM run equals dpldm's only when steps == T.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dpldm.config import AutoencoderConfig, DiffusionConfig, UNetConfig
from dpldm.errors import UserError

DIFFUSERS_VERSION = "0.42.1"  # the version the layout was checked against (tests load it with this one)
NORM_EPS = 1e-6  # dpldm's group_norm eps (the transformers' LayerNorms keep torch's 1e-5 on both sides)

RESBLOCK_LEAVES = {"in_layers.0.": "norm1.", "in_layers.2.": "conv1.", "emb_layers.1.": "time_emb_proj.",
                   "out_layers.0.": "norm2.", "out_layers.3.": "conv2.", "skip.": "conv_shortcut."}
AE_RESBLOCK_LEAVES = {"skip.": "conv_shortcut."}
TRANSFORMER_LEAVES = {".attn1.to_out.": ".attn1.to_out.0.", ".attn2.to_out.": ".attn2.to_out.0."}


# -- what can be expressed ---------------------------------------------------------------------------

def _groups(module: nn.Module) -> dict[int, int]:
    """{num_groups: one channel count that has it} over the GroupNorms of `module`."""
    out: dict[int, int] = {}
    for m in module.modules():
        if isinstance(m, nn.GroupNorm):
            out.setdefault(m.num_groups, m.num_channels)
    return out


def check_exportable(unet_cfg: UNetConfig, ae_cfg: AutoencoderConfig, unet: nn.Module, ae: nn.Module) -> None:
    """Raise UserError naming everything diffusers cannot express exactly."""
    problems = []
    for what, module in (("unet", unet), ("autoencoder", ae)):
        groups = _groups(module)
        if len(groups) > 1:
            detail = ", ".join(f"{g} for {c} channels" for g, c in sorted(groups.items()))
            problems.append(f"{what}: its GroupNorms have different group counts ({detail}) but diffusers has one "
                            "norm_num_groups; widths that are all multiples of 32 export exactly")
    if unet_cfg.channel_mult[0] != 1:
        problems.append(f"unet.channel_mult[0] = {unet_cfg.channel_mult[0]}: diffusers needs 1 (its conv_in and time "
                        "projection have block_out_channels[0] channels)")
    if ae_cfg.channel_mult[0] != 1:
        problems.append(f"autoencoder.channel_mult[0] = {ae_cfg.channel_mult[0]}: diffusers needs 1")
    if not unet_cfg.middle_attention:
        problems.append("unet.middle_attention = false: diffusers' middle block without attention has one ResBlock, "
                        "dpldm's has two")
    if problems:
        raise UserError("cannot export exactly to diffusers: " + "; ".join(problems))


def norm_groups(module: nn.Module) -> int:
    """The one GroupNorm group count of `module` (after check_exportable)."""
    return next(iter(_groups(module)))


# -- configs -----------------------------------------------------------------------------------------

def unet_config(cfg: UNetConfig, latent_size: int, norm_num_groups: int) -> dict[str, Any]:
    levels = range(len(cfg.channel_mult))
    down = ["CrossAttnDownBlock2D" if lv in cfg.attention_levels else "DownBlock2D" for lv in levels]
    up = ["CrossAttnUpBlock2D" if lv in cfg.attention_levels else "UpBlock2D" for lv in reversed(levels)]
    return {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": latent_size, "in_channels": cfg.in_channels, "out_channels": cfg.in_channels,
        "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
        "down_block_types": down, "mid_block_type": "UNetMidBlock2DCrossAttn", "up_block_types": up,
        "only_cross_attention": False, "block_out_channels": [cfg.model_channels * m for m in cfg.channel_mult],
        "layers_per_block": cfg.num_res_blocks, "downsample_padding": 1, "mid_block_scale_factor": 1,
        "dropout": cfg.dropout, "act_fn": "silu", "norm_num_groups": norm_num_groups, "norm_eps": NORM_EPS,
        "cross_attention_dim": cfg.context_dim, "transformer_layers_per_block": cfg.transformer_depth,
        "attention_head_dim": cfg.num_heads,  # diffusers reads it as the number of heads (see its issue 2011)
        "use_linear_projection": True, "upcast_attention": False, "resnet_time_scale_shift": "default",
        "class_embed_type": None, "num_class_embeds": None, "time_embedding_type": "positional",
        "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default",
    }


def vae_config(cfg: AutoencoderConfig, image_size: int, scale_factor: float, norm_num_groups: int) -> dict[str, Any]:
    n = len(cfg.channel_mult)
    return {
        "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": cfg.in_channels, "out_channels": cfg.in_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": [cfg.base_channels * m for m in cfg.channel_mult],
        "layers_per_block": cfg.num_res_blocks, "act_fn": "silu", "latent_channels": cfg.latent_channels,
        "norm_num_groups": norm_num_groups, "sample_size": image_size, "scaling_factor": scale_factor,
        "shift_factor": None, "force_upcast": False, "use_quant_conv": False, "use_post_quant_conv": False,
        "mid_block_add_attention": False,
    }


BETA_SCHEDULES = {"linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


def scheduler_config(cfg: DiffusionConfig) -> dict[str, Any]:
    return {
        "_class_name": "DDIMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": cfg.timesteps, "beta_start": cfg.beta_start, "beta_end": cfg.beta_end,
        "beta_schedule": BETA_SCHEDULES[cfg.schedule], "trained_betas": None, "clip_sample": False,
        "set_alpha_to_one": True, "steps_offset": 0, "prediction_type": "epsilon", "thresholding": False,
        "timestep_spacing": "linspace", "rescale_betas_zero_snr": False,
    }


# -- configs back (import) ----------------------------------------------------------------------------

def _need(cond: bool, where: str, msg: str) -> None:
    """ValueError naming the config key; the importer re-raises it as CheckpointError with the file."""
    if not cond:
        raise ValueError(f"{where}: {msg}")


def unet_config_from(d: dict[str, Any], num_classes: int) -> UNetConfig:
    """UNetConfig for a diffusers UNet2DConditionModel config.json (ValueError naming the key)."""
    bc = list(d["block_out_channels"])
    mc = bc[0]
    _need(all(c % mc == 0 for c in bc), "block_out_channels", f"{bc} are not multiples of the first")
    down = list(d["down_block_types"])
    _need(all(t in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down), "down_block_types",
          f"{down}: dpldm has CrossAttnDownBlock2D / DownBlock2D only")
    levels = [i for i, t in enumerate(down) if t == "CrossAttnDownBlock2D"]
    up_want = ["CrossAttnUpBlock2D" if i in levels else "UpBlock2D" for i in reversed(range(len(down)))]
    _need(list(d["up_block_types"]) == up_want, "up_block_types", f"{d['up_block_types']} != {up_want}")
    for key, want in (("mid_block_type", "UNetMidBlock2DCrossAttn"), ("use_linear_projection", True),
                      ("flip_sin_to_cos", True), ("freq_shift", 0), ("class_embed_type", None),
                      ("time_embedding_type", "positional"), ("resnet_time_scale_shift", "default"),
                      ("act_fn", "silu"), ("center_input_sample", False), ("only_cross_attention", False),
                      ("upcast_attention", False), ("norm_eps", NORM_EPS)):
        _need(d.get(key, want) == want, key, f"{d.get(key)!r} (dpldm's UNet needs {want!r})")
    for key in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim", "cross_attention_dim"):
        _need(isinstance(d[key], int), key, f"{d[key]!r}: per-block values are not supported (one int)")
    _need(d["in_channels"] == d["out_channels"], "out_channels", "must equal in_channels (epsilon prediction)")
    return UNetConfig(in_channels=d["in_channels"], model_channels=mc, channel_mult=tuple(c // mc for c in bc),
                      num_res_blocks=d["layers_per_block"], attention_levels=tuple(levels), middle_attention=True,
                      num_heads=d["attention_head_dim"], transformer_depth=d["transformer_layers_per_block"],
                      context_dim=d["cross_attention_dim"], num_classes=num_classes, dropout=float(d.get("dropout", 0.0)))


def ae_config_from(d: dict[str, Any], kl_weight: float = AutoencoderConfig.kl_weight) -> AutoencoderConfig:
    bc = list(d["block_out_channels"])
    base = bc[0]
    _need(all(c % base == 0 for c in bc), "block_out_channels", f"{bc} are not multiples of the first")
    for key, want in (("use_quant_conv", False), ("use_post_quant_conv", False), ("mid_block_add_attention", False),
                      ("act_fn", "silu")):
        _need(d.get(key, True) == want, key, f"{d.get(key, True)!r} (dpldm's autoencoder needs {want!r})")
    _need(d["in_channels"] == d["out_channels"], "out_channels", "must equal in_channels")
    return AutoencoderConfig(in_channels=d["in_channels"], base_channels=base, channel_mult=tuple(c // base for c in bc),
                             num_res_blocks=d["layers_per_block"], latent_channels=d["latent_channels"],
                             kl_weight=kl_weight)


def diffusion_config_from(d: dict[str, Any], base: DiffusionConfig) -> DiffusionConfig:
    inverse = {v: k for k, v in BETA_SCHEDULES.items()}
    _need(d.get("beta_schedule") in inverse, "beta_schedule", f"{d.get('beta_schedule')!r}: dpldm has {sorted(inverse)}")
    _need(d.get("prediction_type", "epsilon") == "epsilon", "prediction_type", "dpldm predicts epsilon")
    _need(d.get("trained_betas") is None, "trained_betas", "explicit betas are not supported")
    values = {**base.__dict__, "schedule": inverse[d["beta_schedule"]], "timesteps": d["num_train_timesteps"],
              "beta_start": d["beta_start"], "beta_end": d["beta_end"],
              "sample_steps": min(base.sample_steps, int(d["num_train_timesteps"]))}
    return DiffusionConfig(**values)


# -- state-dict keys ---------------------------------------------------------------------------------

def _rename(rest: str, leaves: dict[str, str]) -> str:
    for ours, theirs in leaves.items():
        if ours.startswith("."):
            rest = rest.replace(ours, theirs)
        elif rest.startswith(ours):
            return theirs + rest[len(ours):]
    return rest


def unet_prefixes(cfg: UNetConfig) -> list[tuple[str, str, dict[str, str]]]:
    """(dpldm module prefix, diffusers module prefix, leaf renames), walking the UNet as it is built."""
    out: list[tuple[str, str, dict[str, str]]] = [
        ("time_embed.0.", "time_embedding.linear_1.", {}), ("time_embed.2.", "time_embedding.linear_2.", {}),
        ("input_blocks.0.0.", "conv_in.", {}), ("out.0.", "conv_norm_out.", {}), ("out.2.", "conv_out.", {})]
    k, n = 1, len(cfg.channel_mult)
    for lv in range(n):
        for i in range(cfg.num_res_blocks):
            out.append((f"input_blocks.{k}.0.", f"down_blocks.{lv}.resnets.{i}.", RESBLOCK_LEAVES))
            if lv in cfg.attention_levels:
                out.append((f"input_blocks.{k}.1.", f"down_blocks.{lv}.attentions.{i}.", TRANSFORMER_LEAVES))
            k += 1
        if lv != n - 1:
            out.append((f"input_blocks.{k}.0.op.", f"down_blocks.{lv}.downsamplers.0.conv.", {}))
            k += 1
    out += [("middle_block.0.", "mid_block.resnets.0.", RESBLOCK_LEAVES),
            ("middle_block.1.", "mid_block.attentions.0.", TRANSFORMER_LEAVES),
            ("middle_block.2.", "mid_block.resnets.1.", RESBLOCK_LEAVES)]
    k = 0
    for u, lv in enumerate(reversed(range(n))):
        for i in range(cfg.num_res_blocks + 1):
            out.append((f"output_blocks.{k}.0.", f"up_blocks.{u}.resnets.{i}.", RESBLOCK_LEAVES))
            j = 1
            if lv in cfg.attention_levels:
                out.append((f"output_blocks.{k}.1.", f"up_blocks.{u}.attentions.{i}.", TRANSFORMER_LEAVES))
                j = 2
            if lv != 0 and i == cfg.num_res_blocks:
                out.append((f"output_blocks.{k}.{j}.conv.", f"up_blocks.{u}.upsamplers.0.conv.", {}))
            k += 1
    return out


def ae_prefixes(cfg: AutoencoderConfig) -> list[tuple[str, str, dict[str, str]]]:
    out: list[tuple[str, str, dict[str, str]]] = []
    n = len(cfg.channel_mult)
    for part in ("encoder", "decoder"):
        out += [(f"{part}.conv_in.", f"{part}.conv_in.", {}), (f"{part}.norm_out.", f"{part}.conv_norm_out.", {}),
                (f"{part}.conv_out.", f"{part}.conv_out.", {}),
                (f"{part}.mid.0.", f"{part}.mid_block.resnets.0.", AE_RESBLOCK_LEAVES),
                (f"{part}.mid.1.", f"{part}.mid_block.resnets.1.", AE_RESBLOCK_LEAVES)]
    k = 0
    for lv in range(n):
        for i in range(cfg.num_res_blocks):
            out.append((f"encoder.down.{k}.", f"encoder.down_blocks.{lv}.resnets.{i}.", AE_RESBLOCK_LEAVES))
            k += 1
        if lv != n - 1:
            out.append((f"encoder.down.{k}.conv.", f"encoder.down_blocks.{lv}.downsamplers.0.conv.", {}))
            k += 1
    k = 0
    for u, lv in enumerate(reversed(range(n))):
        for i in range(cfg.num_res_blocks + 1):
            out.append((f"decoder.up.{k}.", f"decoder.up_blocks.{u}.resnets.{i}.", AE_RESBLOCK_LEAVES))
            k += 1
        if lv != 0:
            out.append((f"decoder.up.{k}.conv.", f"decoder.up_blocks.{u}.upsamplers.0.conv.", {}))
            k += 1
    return out


def _map_keys(state: dict[str, torch.Tensor], prefixes, reverse: bool, what: str) -> dict[str, torch.Tensor]:
    table = [(theirs, ours, {v: k for k, v in leaves.items()}) for ours, theirs, leaves in prefixes] if reverse \
        else prefixes
    table = sorted(table, key=lambda e: -len(e[0]))  # longest prefix first
    out, unmapped = {}, []
    for key, value in state.items():
        for src, dst, leaves in table:
            if key.startswith(src):
                out[dst + _rename(key[len(src):], leaves)] = value
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise ValueError(f"{what}: {len(unmapped)} tensor(s) have no counterpart, e.g. {unmapped[:3]}")
    return out


def unet_to_diffusers(state: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """dpldm UNet state dict (without the class embedder) -> UNet2DConditionModel keys."""
    return _map_keys(state, unet_prefixes(cfg), False, "unet")


def unet_from_diffusers(state: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    return _map_keys(state, unet_prefixes(cfg), True, "unet")


def ae_to_diffusers(state: dict[str, torch.Tensor], cfg: AutoencoderConfig) -> dict[str, torch.Tensor]:
    return _map_keys(state, ae_prefixes(cfg), False, "autoencoder")


def ae_from_diffusers(state: dict[str, torch.Tensor], cfg: AutoencoderConfig) -> dict[str, torch.Tensor]:
    return _map_keys(state, ae_prefixes(cfg), True, "autoencoder")


def latent_size(image_size: int, ae_cfg: AutoencoderConfig) -> int:
    return image_size // (2 ** (len(ae_cfg.channel_mult) - 1))

