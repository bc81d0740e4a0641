"""Typed run configuration: one dataclass per section, read from TOML, overridable from the CLI.

A recipe in `configs/*.toml` has the sections `[autoencoder]`, `[unet]`, `[diffusion]`,
`[data]`, `[privacy]`, `[train]`; every key maps to a field below. Unknown keys and values of
the wrong type are refused with an error that names `section.key`. No `target:` indirection.
"""
from __future__ import annotations

from dpldm.errors import InputError

import dataclasses
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(InputError, ValueError):
    """A recipe or override names an unknown key or holds a bad value."""


def _require(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: {msg}")


def _check_fields(obj: Any, section: str) -> None:
    """Type-check every field of a section dataclass against its annotation, however it was built
    (TOML, `--set`, a checkpoint's meta.json, a diffusers config, Python): bools are not numbers,
    numbers are finite, lists become tuples, ints become floats where a float is declared."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        setattr(obj, f.name, _coerce(getattr(obj, f.name), hints[f.name], f"{section}.{f.name}"))


# Upper limits on sizes: far above any real recipe, low enough that a typo (an extra zero or ten)
# is refused here rather than ending in an allocation failure or a run that never finishes.
MAX_CHANNELS = 8192  # widths, context_dim
MAX_LEVEL_COUNT = 8  # unet.channel_mult entries (each level halves the latent)
MAX_BLOCKS = 64  # res blocks / transformer depth / heads
MAX_CLASSES = 1_000_000
MAX_IMAGE_SIZE = 8192
MAX_TIMESTEPS = 100_000
SAMPLERS = ("ddim", "dpmpp-2m", "unipc", "ddpm")  # dpldm.diffusion.schedulers.sample
MAX_STEPS = 10**9
LR_DECAYS = ("constant", "cosine")  # train.lr_decay (dpldm.train.common.lr_factor)
MAX_LR = 10.0  # AdamW learning rates above this diverge on the first steps


@dataclass
class AutoencoderConfig:
    in_channels: int = 1
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2)  # downsampling f = 2 ** (len - 1)
    num_res_blocks: int = 1
    latent_channels: int = 4
    kl_weight: float = 1e-6

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def __post_init__(self) -> None:
        _check_fields(self, "autoencoder")
        _require(self.in_channels in (1, 3, 4), "autoencoder.in_channels", f"must be 1, 3 or 4, got {self.in_channels}")
        _require(len(self.channel_mult) in (1, 2, 3, 4), "autoencoder.channel_mult",
                 f"length sets f in {{1,2,4,8}}; got {self.channel_mult}")
        _require(all(m > 0 for m in self.channel_mult), "autoencoder.channel_mult", "entries must be positive")
        _require(self.base_channels > 0 and self.base_channels % 8 == 0, "autoencoder.base_channels",
                 f"must be a positive multiple of 8 (GroupNorm), got {self.base_channels}")
        _require(all(self.base_channels * m <= MAX_CHANNELS for m in self.channel_mult), "autoencoder.channel_mult",
                 f"widths base_channels * mult must be <= {MAX_CHANNELS}, got {self.base_channels} * {self.channel_mult}")
        _require(1 <= self.num_res_blocks <= MAX_BLOCKS, "autoencoder.num_res_blocks",
                 f"must lie in [1, {MAX_BLOCKS}], got {self.num_res_blocks}")
        _require(1 <= self.latent_channels <= MAX_CHANNELS, "autoencoder.latent_channels",
                 f"must lie in [1, {MAX_CHANNELS}], got {self.latent_channels}")
        _require(self.kl_weight >= 0, "autoencoder.kl_weight", "must be >= 0")


@dataclass
class UNetConfig:
    in_channels: int = 4  # = autoencoder.latent_channels
    model_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    attention_levels: tuple[int, ...] = (0, 1)  # resolution levels (0 = top) that get a SpatialTransformer
    middle_attention: bool = True  # a SpatialTransformer in the middle block (as in LDM)
    num_heads: int = 4
    transformer_depth: int = 1
    context_dim: int = 64
    num_classes: int = 36  # class embedder rows = num_classes + 1 (last = null class); glyphs: 0-9, A-Z
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _check_fields(self, "unet")
        _require(1 <= self.in_channels <= MAX_CHANNELS, "unet.in_channels", f"must lie in [1, {MAX_CHANNELS}]")
        _require(self.model_channels > 0 and self.model_channels % 8 == 0, "unet.model_channels",
                 f"must be a positive multiple of 8, got {self.model_channels}")
        _require(1 <= len(self.channel_mult) <= MAX_LEVEL_COUNT, "unet.channel_mult",
                 f"must have 1..{MAX_LEVEL_COUNT} entries, got {len(self.channel_mult)}")
        _require(all(m > 0 for m in self.channel_mult), "unet.channel_mult", f"entries must be positive, got {self.channel_mult}")
        _require(all(self.model_channels * m <= MAX_CHANNELS for m in self.channel_mult), "unet.channel_mult",
                 f"widths model_channels * mult must be <= {MAX_CHANNELS}, got {self.model_channels} * {self.channel_mult}")
        _require(1 <= self.num_res_blocks <= MAX_BLOCKS, "unet.num_res_blocks", f"must lie in [1, {MAX_BLOCKS}], got {self.num_res_blocks}")
        _require(1 <= self.transformer_depth <= MAX_BLOCKS, "unet.transformer_depth",
                 f"must lie in [1, {MAX_BLOCKS}], got {self.transformer_depth}")
        _require(1 <= self.context_dim <= MAX_CHANNELS, "unet.context_dim", f"must lie in [1, {MAX_CHANNELS}], got {self.context_dim}")
        _require(all(0 <= lv < len(self.channel_mult) for lv in self.attention_levels), "unet.attention_levels",
                 f"levels must lie in [0, {len(self.channel_mult)}), got {self.attention_levels}")
        _require(1 <= self.num_heads <= MAX_BLOCKS, "unet.num_heads", f"must lie in [1, {MAX_BLOCKS}], got {self.num_heads}")
        for m in self.channel_mult:
            _require((self.model_channels * m) % self.num_heads == 0, "unet.num_heads",
                     f"must divide every level width ({self.model_channels * m})")
        _require(1 <= self.num_classes <= MAX_CLASSES, "unet.num_classes", f"must lie in [1, {MAX_CLASSES}], got {self.num_classes}")
        _require(0.0 <= self.dropout < 1.0, "unet.dropout", "must lie in [0, 1)")


@dataclass
class DiffusionConfig:
    schedule: str = "linear"  # linear | cosine
    timesteps: int = 1000
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    timesteps_per_example: int = 1  # K: losses of one example are averaged before clipping
    sampler: str = "ddim"  # ddim | dpmpp-2m | unipc (diffusers' schedulers) | ddpm (ours, all T steps)
    sample_steps: int = 50
    eta: float = 0.0
    guidance_scale: float = 1.0
    cond_drop_prob: float = 0.1  # classifier-free guidance training: label -> null class

    def __post_init__(self) -> None:
        _check_fields(self, "diffusion")
        _require(self.schedule in ("linear", "cosine"), "diffusion.schedule", f"must be linear|cosine, got {self.schedule!r}")
        _require(2 <= self.timesteps <= MAX_TIMESTEPS, "diffusion.timesteps", f"must lie in [2, {MAX_TIMESTEPS}], got {self.timesteps}")
        _require(0 < self.beta_start < self.beta_end < 1, "diffusion.beta_start/beta_end", "need 0 < start < end < 1")
        _require(1 <= self.timesteps_per_example <= 1024, "diffusion.timesteps_per_example",
                 f"must lie in [1, 1024], got {self.timesteps_per_example}")
        _require(self.sampler in SAMPLERS, "diffusion.sampler", f"must be {'|'.join(SAMPLERS)}, got {self.sampler!r}")
        _require(self.eta == 0 or self.sampler in ("ddim", "ddpm"), "diffusion.eta",
                 f"eta = {self.eta} needs sampler ddim ({self.sampler} is a deterministic solver)")
        _require(1 <= self.sample_steps <= self.timesteps, "diffusion.sample_steps", "must lie in [1, timesteps]")
        _require(0 <= self.eta <= 1, "diffusion.eta", f"must lie in [0, 1], got {self.eta}")
        _require(self.guidance_scale >= 0, "diffusion.guidance_scale", "must be >= 0")
        _require(0 <= self.cond_drop_prob < 1, "diffusion.cond_drop_prob", "must lie in [0, 1)")


@dataclass
class DataConfig:
    public: str = "glyphs"  # source name or shard folder for pretraining
    private: str = "mnist5k"  # source name or (latent) shard folder for fine-tuning
    image_size: int = 32
    channels: int = 1
    num_classes: int = 10  # classes of the private set (labels 0..num_classes-1)
    public_size: int = 20000  # generated public examples (glyphs)
    seed: int = 0
    num_workers: int = 0

    def __post_init__(self) -> None:
        _check_fields(self, "data")
        _require(8 <= self.image_size <= MAX_IMAGE_SIZE and self.image_size % 8 == 0, "data.image_size",
                 f"must be a multiple of 8 in [8, {MAX_IMAGE_SIZE}], got {self.image_size}")
        _require(self.channels in (1, 3, 4), "data.channels", "must be 1, 3 or 4")
        _require(1 <= self.num_classes <= MAX_CLASSES, "data.num_classes", f"must lie in [1, {MAX_CLASSES}], got {self.num_classes}")
        _require(1 <= self.public_size <= 10**9, "data.public_size", f"must lie in [1, 10**9], got {self.public_size}")
        _require(0 <= self.seed < 2**63, "data.seed", f"must lie in [0, 2**63), got {self.seed}")
        _require(self.public.strip() != "", "data.public", "must name a source or a shard folder, got ''")
        _require(self.private.strip() != "", "data.private", "must name a source or a shard folder, got ''")
        _require(0 <= self.num_workers <= 1024, "data.num_workers", f"must lie in [0, 1024], got {self.num_workers}")


@dataclass
class PrivacyConfig:
    enabled: bool = True
    epsilon: float | None = 10.0  # target; sigma is calibrated unless noise_multiplier is set
    delta: float = 1e-5
    noise_multiplier: float | None = None
    max_grad_norm: float = 1.0
    expected_batch_size: int = 256  # q = expected_batch_size / N
    sample_rate: float | None = None  # q given directly (then expected_batch_size is ignored; q*N is printed)
    steps: int = 100  # logical (noisy) steps
    accountant: str = "prv"  # prv | rdp
    secure_noise: bool = False  # CSPRNG noise seeded from the OS
    norm_method: str = "auto"  # auto | ghost | materialize  (per-example Linear norms)
    backend: str = "auto"  # auto | torch | triton | cpp | cuda
    physical_batch_size: int = 64  # examples per chunk through the model
    fixed_shape: bool = True  # every step runs the same padded chunks; truncation accounted (dpldm.privacy.fixed_shape)
    truncation_delta: float = 1e-3  # fixed_shape: the truncation may add at most this fraction of delta

    def __post_init__(self) -> None:
        _check_fields(self, "privacy")
        if self.epsilon is not None:
            _require(self.epsilon > 0, "privacy.epsilon", f"must be > 0, got {self.epsilon}")
        _require(0 < self.delta < 1, "privacy.delta", f"must lie in (0, 1), got {self.delta}")
        if self.noise_multiplier is not None:
            _require(self.noise_multiplier >= 0, "privacy.noise_multiplier", "must be >= 0")
        if self.enabled:
            _require(self.epsilon is not None or self.noise_multiplier is not None, "privacy.epsilon",
                     "set a target epsilon or an explicit noise_multiplier")
        _require(self.max_grad_norm > 0, "privacy.max_grad_norm", f"must be > 0, got {self.max_grad_norm}")
        _require(self.expected_batch_size >= 1, "privacy.expected_batch_size", "must be >= 1")
        if self.sample_rate is not None:
            _require(0 < self.sample_rate <= 1, "privacy.sample_rate", f"must lie in (0, 1], got {self.sample_rate}")
        _require(1 <= self.steps <= MAX_STEPS, "privacy.steps", f"must lie in [1, {MAX_STEPS}], got {self.steps}")
        _require(self.accountant in ("prv", "rdp"), "privacy.accountant", f"must be prv|rdp, got {self.accountant!r}")
        _require(self.norm_method in ("auto", "ghost", "materialize"), "privacy.norm_method",
                 f"must be auto|ghost|materialize, got {self.norm_method!r}")
        _require(self.backend in ("auto", "torch", "triton", "cpp", "cuda"), "privacy.backend",
                 f"must be auto|torch|triton|cpp|cuda, got {self.backend!r}")
        _require(self.physical_batch_size >= 1, "privacy.physical_batch_size", "must be >= 1")
        _require(0 < self.truncation_delta <= 0.1, "privacy.truncation_delta",
                 f"must lie in (0, 0.1] (a fraction of delta), got {self.truncation_delta}")


@dataclass
class TrainConfig:
    finetune: str = "attention:all"  # attention:9-16 | attention:all | all
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_decay: str = "constant"  # constant | cosine (to 0 at the last step): pretrain-ldm and DP fine-tuning, not the AE
    ema_decay: float = 0.999
    batch_size: int = 64  # non-private (pretraining) batch
    steps: int = 1000  # non-private steps (pretraining); DP runs use privacy.steps
    grad_clip: float = 1.0  # non-private global-norm clipping (pretraining only)
    seed: int = 0
    deterministic: bool = False  # noise, Poisson plan and diffusion draws from `seed`: NOT private (needs not_private)
    not_private: bool = False  # the user states the run is not private (deterministic/seeded runs): epsilon = inf
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16 (autocast forward/backward; fp32 norms, accumulators, noise)
    log_every: int = 50
    sample_every: int = 0  # DP fine-tuning: an EMA sample grid every this many steps (0 = off; post-processing)
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    out_dir: str = "runs/default"
    init_checkpoint: str = ""  # public model to fine-tune from
    wandb: bool = True  # offline by default; files inside the run folder
    threads: int = 0  # torch.set_num_threads; 0 = leave as is
    # autoencoder pretraining (`dpldm pretrain-ae`); steps/lr/batch_size above drive pretrain-ldm
    ae_steps: int = 1000
    ae_lr: float = 1e-3
    ae_batch_size: int = 64

    def __post_init__(self) -> None:
        _check_fields(self, "train")
        from dpldm.models.finetune_spec import check_finetune_spec

        try:
            check_finetune_spec(self.finetune)
        except ValueError as e:
            raise ConfigError(f"train.finetune: {e}") from None
        _require(0 < self.lr <= MAX_LR, "train.lr", f"must lie in (0, {MAX_LR:g}], got {self.lr:g}")
        _require(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _require(self.lr * self.weight_decay < 1, "train.weight_decay",
                 f"train.lr * train.weight_decay must be < 1 (AdamW multiplies the weights by 1 - lr * weight_decay "
                 f"every step), got {self.lr:g} * {self.weight_decay:g}")
        _require(0 <= self.warmup_steps <= MAX_STEPS, "train.warmup_steps",
                 f"must lie in [0, {MAX_STEPS}], got {self.warmup_steps}")
        _require(self.lr_decay in LR_DECAYS, "train.lr_decay", f"must be {'|'.join(LR_DECAYS)}, got {self.lr_decay!r}")
        _require(0 <= self.ema_decay < 1, "train.ema_decay", "must lie in [0, 1)")
        _require(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _require(0 <= self.steps <= MAX_STEPS, "train.steps", f"must lie in [0, {MAX_STEPS}], got {self.steps}")
        _require(0 <= self.seed < 2**63, "train.seed", f"must lie in [0, 2**63), got {self.seed}")
        _require(self.grad_clip > 0, "train.grad_clip", "must be > 0")
        _require(self.log_every >= 1, "train.log_every", "must be >= 1")
        _require(self.sample_every >= 0, "train.sample_every", "must be >= 0")
        _require(self.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")
        _require(self.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
        _require(0 <= self.threads <= 4096, "train.threads", f"must lie in [0, 4096] (0 = leave as is), got {self.threads}")
        _require(self.out_dir.strip() != "", "train.out_dir", "must name a run folder, got ''")
        from dpldm.utils.device import check_device_spec

        try:
            check_device_spec(self.device, "train.device")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        _require(self.precision in ("fp32", "bf16"), "train.precision", f"must be fp32|bf16, got {self.precision!r}")
        _require(0 <= self.ae_steps <= MAX_STEPS, "train.ae_steps", f"must lie in [0, {MAX_STEPS}], got {self.ae_steps}")
        _require(0 < self.ae_lr <= MAX_LR, "train.ae_lr", f"must lie in (0, {MAX_LR:g}], got {self.ae_lr:g}")
        _require(self.ae_batch_size >= 1, "train.ae_batch_size", "must be >= 1")


@dataclass
class RunConfig:
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        _require(self.unet.in_channels == self.autoencoder.latent_channels, "unet.in_channels",
                 f"must equal autoencoder.latent_channels ({self.autoencoder.latent_channels}), got {self.unet.in_channels}")
        _require(self.autoencoder.in_channels == self.data.channels, "autoencoder.in_channels",
                 f"must equal data.channels ({self.data.channels})")
        _require(self.unet.num_classes >= self.data.num_classes, "unet.num_classes",
                 f"must be >= data.num_classes ({self.data.num_classes}): private labels index the public embedder")
        _require(self.data.image_size % self.autoencoder.downsample_factor == 0, "data.image_size",
                 f"must be divisible by the autoencoder's f={self.autoencoder.downsample_factor}")

    # -- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "config") -> "RunConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a table of sections, got {type(raw).__name__}")
        sections = {f.name: f for f in dataclasses.fields(cls)}
        for name in raw:
            if name not in sections:
                raise ConfigError(f"{where}: unknown section [{name}] (known: {', '.join(sections)})")
        built = {}
        for name, f in sections.items():
            section_cls = _section_types()[name]
            built[name] = _build_section(section_cls, raw.get(name, {}), name)
        return cls(**built)


def _section_types() -> dict[str, type]:
    return {"autoencoder": AutoencoderConfig, "unet": UNetConfig, "diffusion": DiffusionConfig,
            "data": DataConfig, "privacy": PrivacyConfig, "train": TrainConfig}


def _build_section(section_cls: type, values: Any, section: str):
    if not isinstance(values, dict):
        raise ConfigError(f"[{section}]: expected a table, got {type(values).__name__}")
    hints = typing.get_type_hints(section_cls)
    known = {f.name for f in dataclasses.fields(section_cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{section}.{key}: unknown key (known: {', '.join(sorted(known))})")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
    return section_cls(**kwargs)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check `value` against the annotation `hint`; convert lists to tuples and ints to floats."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _coerce(value, opt, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        return tuple(_coerce(v, item, where) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:  # an integer beyond float range
            raise ConfigError(f"{where}: expected a finite number, got an integer of {len(str(abs(value)))} digits "
                              "(beyond float range)") from None
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {hint}")


def parse_override(text: str) -> tuple[str, str, Any]:
    """`section.key=value` with a TOML value (`1e-3`, `true`, `"x"`, `[1,2]`); bare words are strings."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    path, raw = text.split("=", 1)
    section, key = path.strip().split(".", 1)
    if not section.strip() or not key.strip():
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    try:
        parsed = tomllib.loads(f"v = {raw}")
    except tomllib.TOMLDecodeError:
        parsed = {"v": raw}
    if set(parsed) != {"v"}:  # a newline in the value smuggled in another TOML key
        raise ConfigError(f"--set {text!r}: the value must be one TOML value on one line")
    return section.strip(), key.strip(), parsed["v"]


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a TOML recipe (or the defaults when `path` is None) and apply `--set` overrides."""
    raw: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        p = Path(path)
        where = str(p)
        if p.is_dir():
            raise ConfigError(f"{p}: is a folder, not a config file (give a .toml recipe)")
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            raw = tomllib.loads(p.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}: {e.reason}); TOML recipes are UTF-8") from None
        except OSError as e:
            raise ConfigError(f"{p}: cannot read the config file ({e.strerror or e})") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from None
    for text in overrides:
        section, key, value = parse_override(text)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"--set {text!r}: [{section}] is not a table")
        raw[section][key] = value
    return RunConfig.from_dict(raw, where)


def save_resolved(cfg: RunConfig, run_dir: str | Path) -> Path:
    """Write the resolved config as JSON into the run folder (atomically)."""
    from dpldm.utils.io import atomic_write_text

    path = Path(run_dir) / "config.json"
    atomic_write_text(path, cfg.to_json() + "\n")
    return path
