"""Typed run configuration: one dataclass per section, read from TOML, overridable from the CLI.

A recipe in `configs/*.toml` has the sections `[autoencoder]`, `[unet]`, `[diffusion]`,
`[data]`, `[privacy]`, `[train]`; every key maps to a field below. Unknown keys and values of
the wrong type are refused with an error that names `section.key`. No `target:` indirection.
"""
from __future__ import annotations

from dpldm.errors import InputError

import dataclasses
import json
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
        _require(self.in_channels in (1, 3, 4), "autoencoder.in_channels", f"must be 1, 3 or 4, got {self.in_channels}")
        _require(len(self.channel_mult) in (1, 2, 3, 4), "autoencoder.channel_mult",
                 f"length sets f in {{1,2,4,8}}; got {self.channel_mult}")
        _require(all(m > 0 for m in self.channel_mult), "autoencoder.channel_mult", "entries must be positive")
        _require(self.base_channels > 0 and self.base_channels % 8 == 0, "autoencoder.base_channels",
                 f"must be a positive multiple of 8 (GroupNorm), got {self.base_channels}")
        _require(self.num_res_blocks >= 1, "autoencoder.num_res_blocks", "must be >= 1")
        _require(self.latent_channels >= 1, "autoencoder.latent_channels", "must be >= 1")
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
        _require(self.in_channels >= 1, "unet.in_channels", "must be >= 1")
        _require(self.model_channels > 0 and self.model_channels % 8 == 0, "unet.model_channels",
                 f"must be a positive multiple of 8, got {self.model_channels}")
        _require(len(self.channel_mult) >= 1, "unet.channel_mult", "must not be empty")
        _require(all(0 <= lv < len(self.channel_mult) for lv in self.attention_levels), "unet.attention_levels",
                 f"levels must lie in [0, {len(self.channel_mult)}), got {self.attention_levels}")
        _require(self.num_heads >= 1, "unet.num_heads", "must be >= 1")
        for m in self.channel_mult:
            _require((self.model_channels * m) % self.num_heads == 0, "unet.num_heads",
                     f"must divide every level width ({self.model_channels * m})")
        _require(self.num_classes >= 1, "unet.num_classes", "must be >= 1")
        _require(0.0 <= self.dropout < 1.0, "unet.dropout", "must lie in [0, 1)")


@dataclass
class DiffusionConfig:
    schedule: str = "linear"  # linear | cosine
    timesteps: int = 1000
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    timesteps_per_example: int = 1  # K: losses of one example are averaged before clipping
    sampler: str = "ddim"  # ddim | ddpm
    sample_steps: int = 50
    eta: float = 0.0
    guidance_scale: float = 1.0
    cond_drop_prob: float = 0.1  # classifier-free guidance training: label -> null class

    def __post_init__(self) -> None:
        _require(self.schedule in ("linear", "cosine"), "diffusion.schedule", f"must be linear|cosine, got {self.schedule!r}")
        _require(self.timesteps >= 2, "diffusion.timesteps", "must be >= 2")
        _require(0 < self.beta_start < self.beta_end < 1, "diffusion.beta_start/beta_end", "need 0 < start < end < 1")
        _require(self.timesteps_per_example >= 1, "diffusion.timesteps_per_example", "must be >= 1")
        _require(self.sampler in ("ddim", "ddpm"), "diffusion.sampler", f"must be ddim|ddpm, got {self.sampler!r}")
        _require(1 <= self.sample_steps <= self.timesteps, "diffusion.sample_steps", "must lie in [1, timesteps]")
        _require(self.eta >= 0, "diffusion.eta", "must be >= 0")
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
        _require(self.image_size >= 8 and self.image_size % 8 == 0, "data.image_size", "must be a multiple of 8, >= 8")
        _require(self.channels in (1, 3, 4), "data.channels", "must be 1, 3 or 4")
        _require(self.num_classes >= 1, "data.num_classes", "must be >= 1")
        _require(self.public_size >= 1, "data.public_size", "must be >= 1")
        _require(self.num_workers >= 0, "data.num_workers", "must be >= 0")


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

    def __post_init__(self) -> None:
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
        _require(self.steps >= 1, "privacy.steps", "must be >= 1")
        _require(self.accountant in ("prv", "rdp"), "privacy.accountant", f"must be prv|rdp, got {self.accountant!r}")
        _require(self.norm_method in ("auto", "ghost", "materialize"), "privacy.norm_method",
                 f"must be auto|ghost|materialize, got {self.norm_method!r}")
        _require(self.backend in ("auto", "torch", "triton", "cpp", "cuda"), "privacy.backend",
                 f"must be auto|torch|triton|cpp|cuda, got {self.backend!r}")
        _require(self.physical_batch_size >= 1, "privacy.physical_batch_size", "must be >= 1")


@dataclass
class TrainConfig:
    finetune: str = "attention:all"  # attention:9-16 | attention:all | all
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
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
        ok = self.finetune in ("all", "attention:all") or self.finetune.startswith("attention:")
        _require(ok, "train.finetune", f"must be all | attention:all | attention:A-B, got {self.finetune!r}")
        _require(self.lr > 0, "train.lr", "must be > 0")
        _require(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _require(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        _require(0 <= self.ema_decay < 1, "train.ema_decay", "must lie in [0, 1)")
        _require(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _require(self.steps >= 0, "train.steps", "must be >= 0")
        _require(self.grad_clip > 0, "train.grad_clip", "must be > 0")
        _require(self.log_every >= 1, "train.log_every", "must be >= 1")
        _require(self.sample_every >= 0, "train.sample_every", "must be >= 0")
        _require(self.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")
        _require(self.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
        _require(self.threads >= 0, "train.threads", "must be >= 0")
        from dpldm.utils.device import check_device_spec

        try:
            check_device_spec(self.device, "train.device")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        _require(self.precision in ("fp32", "bf16"), "train.precision", f"must be fp32|bf16, got {self.precision!r}")
        _require(self.ae_steps >= 0, "train.ae_steps", "must be >= 0")
        _require(self.ae_lr > 0, "train.ae_lr", "must be > 0")
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
        return float(value)
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
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return section, key, value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a TOML recipe (or the defaults when `path` is None) and apply `--set` overrides."""
    raw: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        p = Path(path)
        where = str(p)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            raw = tomllib.loads(p.read_text())
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
