"""A PUBLIC proxy of the demo's private task, on which a DP recipe's settings are chosen
(docs/tuning.md; `dpldm/experiments/tune_public.py` runs the sweep).

    scikit-learn's 1,797 handwritten 8x8 digits (public), upsampled to the private task's layout
    (white on black, smooth upsampling, the digit in the central `digit_size` px of 32x32)
      -> a stratified split: one half STANDS IN for the private set, the other half is held out
    stand-in half -> jittered copies up to N_proxy examples -> DP fine-tuning with THE trainer
                     (same engine, same accountant); (N_proxy, q, steps) chosen so that the noise
                     multiplier sigma AND the expected batch q*N equal the recipe's at the same
                     epsilon (`match_sample_rate`): the noisy mean gradient has the same
                     signal-to-noise ratio as in the private run
    held-out half -> the PUBLIC JUDGE (a CNN trained on it alone, never on the private data)
                     reads the samples: class fidelity, per class and mean
                  -> the proxy's test split for the downstream accuracy (a CNN trained on the
                     samples, selected on a synthetic validation split, tested once)

Nothing here reads a private source. Deterministic given the seeds (the proxy's DP runs are seeded:
the data are public, so a seeded noise draw reveals nothing; they report epsilon = inf).
"""
from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dpldm.errors import InputError
from dpldm.eval.augment import random_affine

NUM_CLASSES = 10
CANVAS = 32  # the demo's image size (MNIST 28x28 padded to 32x32)
SCORES = ("mean", "fidelity", "downstream")


class ProxyConfigError(InputError, ValueError):
    """A bad value in the proxy recipe (configs/proxy/digits.toml) or its [quick] table."""


@dataclass
class ProxyConfig:
    """The `[proxy]` table of configs/proxy/digits.toml (see that file for what each value is)."""

    digit_size: int = 24  # the 8x8 digit is upsampled to digit_size x digit_size, centred in 32x32
    holdout_fraction: float = 0.5  # held out of the stand-in private set: judge training + proxy test
    split_seed: int = 0
    reference_num_examples: int = 4000  # N of the private task being tuned (a public fact of the recipe)
    steps: int = 0  # DP steps on the proxy; 0 = the recipe's privacy.steps
    match_sigma: bool = True  # q and N chosen so that sigma and q*N equal the recipe's (module docstring)
    num_examples: int = 0  # match_sigma = false: N of the stand-in private set (jittered copies)
    max_rotation_deg: float = 10.0  # jitter of the copies beyond the first (and of the judge's batches)
    max_shift_px: float = 2.0
    max_scale: float = 0.1
    samples_per_class: int = 100
    judge_epochs: int = 15
    judge_seed: int = 0
    classifier_epochs: int = 8
    seed: int = 0  # the proxy's DP runs (noise, Poisson plan, draws), sampling and the downstream CNN
    score: str = "mean"  # mean (of class fidelity and downstream accuracy) | fidelity | downstream

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            want = {"int": int, "float": (int, float), "bool": bool, "str": str}[str(f.type)]
            if isinstance(v, bool) != (str(f.type) == "bool") or not isinstance(v, want):
                raise ProxyConfigError(f"proxy.{f.name}: expected {f.type}, got {v!r}")
            if isinstance(v, float) and not math.isfinite(v):
                raise ProxyConfigError(f"proxy.{f.name}: must be finite, got {v}")
        _need(8 <= self.digit_size <= CANVAS, "digit_size", f"must lie in [8, {CANVAS}], got {self.digit_size}")
        _need(0.1 <= self.holdout_fraction <= 0.9, "holdout_fraction",
              f"must lie in [0.1, 0.9], got {self.holdout_fraction}")
        _need(0 <= self.split_seed < 2**63 and 0 <= self.judge_seed < 2**63 and 0 <= self.seed < 2**63,
              "seed", "seeds must lie in [0, 2**63)")
        _need(1 <= self.reference_num_examples <= 10**9, "reference_num_examples",
              f"must lie in [1, 10**9], got {self.reference_num_examples}")
        _need(0 <= self.steps <= 100_000, "steps", f"must lie in [0, 100000] (0 = the recipe's), got {self.steps}")
        _need(self.match_sigma or 1 <= self.num_examples <= 10**6, "num_examples",
              f"must lie in [1, 10**6] when match_sigma = false, got {self.num_examples}")
        _need(0 <= self.max_rotation_deg <= 45, "max_rotation_deg", f"must lie in [0, 45], got {self.max_rotation_deg}")
        _need(0 <= self.max_shift_px <= 8, "max_shift_px", f"must lie in [0, 8], got {self.max_shift_px}")
        _need(0 <= self.max_scale <= 0.5, "max_scale", f"must lie in [0, 0.5], got {self.max_scale}")
        _need(2 <= self.samples_per_class <= 10_000, "samples_per_class",
              f"must lie in [2, 10000], got {self.samples_per_class}")
        _need(1 <= self.judge_epochs <= 1000, "judge_epochs", f"must lie in [1, 1000], got {self.judge_epochs}")
        _need(1 <= self.classifier_epochs <= 1000, "classifier_epochs",
              f"must lie in [1, 1000], got {self.classifier_epochs}")
        _need(self.score in SCORES, "score", f"must be one of {'|'.join(SCORES)}, got {self.score!r}")


def _need(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ProxyConfigError(f"proxy.{key}: {msg}")


def _proxy_from(values: Any, where: str) -> ProxyConfig:
    if not isinstance(values, dict):
        raise ProxyConfigError(f"{where}: [proxy] must be a table")
    known = {f.name for f in fields(ProxyConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ProxyConfigError(f"{where}: proxy.{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
    return ProxyConfig(**values)


def load_proxy_config(path: str | Path, quick: bool = False) -> tuple[ProxyConfig, list[str]]:
    """(ProxyConfig, recipe overrides): the `[proxy]` table, and with `quick` the `[quick]` table's
    `proxy` values on top and its `set` list (`section.key=value` overrides of the recipe)."""
    p = Path(path)
    if not p.is_file():
        raise ProxyConfigError(f"{p}: proxy config file not found")
    try:
        raw = tomllib.loads(p.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ProxyConfigError(f"{p}: not valid UTF-8 TOML: {e}") from None
    unknown = sorted(set(raw) - {"proxy", "quick"})
    if unknown:
        raise ProxyConfigError(f"{p}: unknown section [{unknown[0]}] (known: proxy, quick)")
    cfg = _proxy_from(raw.get("proxy", {}), str(p))
    sets: list[str] = []
    if quick:
        q = raw.get("quick", {})
        if not isinstance(q, dict) or sorted(set(q) - {"proxy", "set"}):
            raise ProxyConfigError(f"{p}: [quick] takes only `proxy` (a table) and `set` (a list of strings)")
        quick_values = q.get("proxy", {})
        if not isinstance(quick_values, dict):
            raise ProxyConfigError(f"{p}: [quick] proxy must be a table")
        cfg = _proxy_from({**raw.get("proxy", {}), **quick_values}, f"{p} [quick]")
        sets = q.get("set", [])
        if not isinstance(sets, list) or not all(isinstance(s, str) for s in sets):
            raise ProxyConfigError(f"{p}: [quick] set must be a list of 'section.key=value' strings")
    return cfg, list(sets)


# -- the proxy data --------------------------------------------------------------------------------

def upsample_digits(images8: np.ndarray, digit_size: int = 24, canvas: int = CANVAS) -> np.ndarray:
    """uint8 (N, 8, 8) white-on-black digits -> uint8 (N, canvas, canvas): bicubic upsampling to
    digit_size x digit_size (clamped to 0..255), centred on a black canvas (the MNIST-like layout)."""
    if images8.ndim != 3 or images8.dtype != np.uint8:
        raise ValueError(f"expected uint8 (N, H, W) digits, got {images8.dtype} {images8.shape}")
    x = torch.from_numpy(images8.astype(np.float32))[:, None]  # (N, 1, 8, 8)
    up = F.interpolate(x, size=(digit_size, digit_size), mode="bicubic", align_corners=False)  # (N, 1, d, d)
    up = up.clamp(0, 255).round().to(torch.uint8)[:, 0].numpy()  # (N, d, d)
    out = np.zeros((len(images8), canvas, canvas), dtype=np.uint8)
    o = (canvas - digit_size) // 2
    out[:, o:o + digit_size, o:o + digit_size] = up
    return out


@dataclass
class ProxySplits:
    """uint8 (N, 32, 32) images and int64 (N,) labels of the two halves (both public)."""

    standin_x: np.ndarray  # stands in for the private set (DP fine-tuned on)
    standin_y: np.ndarray
    heldout_x: np.ndarray  # trains the judge; the proxy's test split
    heldout_y: np.ndarray


def load_proxy(cfg: ProxyConfig) -> ProxySplits:
    """All 1,797 sklearn digits (the `digits` source's two splits, put back in original order),
    upsampled, split stratified by `holdout_fraction` with `split_seed`."""
    from dpldm.data.sources import load_source, stratified_split

    parts = [load_source("digits", s) for s in ("train", "test")]
    order = np.concatenate([m["original_index"] for _, _, m in parts])
    x8 = np.concatenate([x for x, _, _ in parts])[np.argsort(order)]  # (1797, 8, 8)
    y = np.concatenate([y for _, y, _ in parts])[np.argsort(order)]  # (1797,)
    x = upsample_digits(x8, cfg.digit_size)
    keep, held = stratified_split(y, cfg.holdout_fraction, seed=cfg.split_seed)
    return ProxySplits(x[keep], y[keep], x[held], y[held])


def to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) -> float32 (N, 1, H, W) in [-1, 1]."""
    return torch.from_numpy(images).float().div(127.5).sub(1.0)[:, None]


def jitter(x: torch.Tensor, g: torch.Generator, cfg: ProxyConfig) -> torch.Tensor:
    """Random affine jitter of (N, C, H, W) images in [-1, 1] (background -1): rotation, scale,
    shift drawn from `g` (three draws per image, in this order)."""
    return random_affine(x, g, cfg.max_rotation_deg, cfg.max_scale, cfg.max_shift_px)


def standin_private_set(splits: ProxySplits, n: int, cfg: ProxyConfig) -> tuple[np.ndarray, np.ndarray]:
    """n examples from the stand-in half: example i is digit i mod n_half, copy i // n_half; copy 0
    is the digit itself, later copies are jittered (seed `cfg.seed`). uint8 (n, 32, 32), int64 (n,)."""
    base_x, base_y = splits.standin_x, splits.standin_y
    idx = np.arange(n) % len(base_x)
    x = to_unit(base_x[idx])  # (n, 1, 32, 32)
    copy = torch.from_numpy(np.arange(n) // len(base_x))
    g = torch.Generator().manual_seed(cfg.seed)
    jittered = jitter(x, g, cfg)
    x = torch.where((copy > 0)[:, None, None, None], jittered, x)
    images = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].numpy()
    return images, base_y[idx].astype(np.int64)


# -- matching the private run's noise -------------------------------------------------------------

@dataclass
class NoiseMatch:
    sigma_reference: float  # the recipe's sigma: (epsilon, delta, q_ref, steps_ref)
    sample_rate: float  # the proxy's q (= expected_batch / num_examples)
    num_examples: int  # the proxy's N
    steps: int
    expected_batch: int  # q*N, the recipe's


def match_sample_rate(epsilon: float, delta: float, q_ref: float, steps_ref: int, steps: int,
                      accountant: str = "prv", iterations: int = 40) -> tuple[float, float]:
    """(q, sigma_ref): sigma_ref is calibrated for (epsilon, delta, q_ref, steps_ref); q is the rate at
    which `steps` steps with that same sigma spend epsilon (bisection on the accountant's epsilon,
    increasing in q). With steps == steps_ref, q = q_ref. q = 1 when even q = 1 spends less."""
    from dpldm.privacy.accountant import calibrate_noise, compute_epsilon

    sigma = calibrate_noise(epsilon, delta, q_ref, steps_ref, accountant)
    if steps == steps_ref:
        return q_ref, sigma
    def eps(q: float) -> float:
        with np.errstate(divide="ignore"):  # Opacus' PRV takes log(1 - q), -inf at q = 1 (harmless)
            return compute_epsilon(sigma, q, steps, delta, accountant)

    if eps(1.0) <= epsilon:
        return 1.0, sigma
    lo, hi = 1e-6, 1.0
    for _ in range(iterations):
        mid = math.sqrt(lo * hi)
        if eps(mid) <= epsilon:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1 + 1e-4:
            break
    return lo, sigma


def match_noise(epsilon: float, delta: float, expected_batch: int, steps_ref: int, cfg: ProxyConfig,
                accountant: str = "prv") -> NoiseMatch:
    """The proxy's (N, q, steps) for a recipe with expected batch B = q_ref * reference_num_examples
    and steps_ref steps at (epsilon, delta): q from `match_sample_rate`, N = round(B / q), so the
    noise std per coordinate of the mean gradient, sigma*C/(qN), is the recipe's."""
    steps = cfg.steps or steps_ref
    q_ref = expected_batch / cfg.reference_num_examples
    if not 0 < q_ref <= 1:
        raise ProxyConfigError(f"the recipe's expected batch {expected_batch} exceeds proxy.reference_num_examples="
                               f"{cfg.reference_num_examples}")
    q, sigma = match_sample_rate(epsilon, delta, q_ref, steps_ref, steps, accountant)
    n = max(expected_batch, int(round(expected_batch / q)))
    return NoiseMatch(sigma, expected_batch / n, n, steps, expected_batch)


# -- the public judge ------------------------------------------------------------------------------

def train_judge(x: np.ndarray, y: np.ndarray, cfg: ProxyConfig, batch: int = 64, lr: float = 2e-3):
    """A SmallCNN trained on public digits only (uint8 (N, 32, 32), labels (N,)), every batch
    jittered; deterministic given cfg.judge_seed (init, order and jitter from seeded generators)."""
    from dpldm.eval.classifier import SmallCNN

    xs, ys = to_unit(x), torch.from_numpy(y).long()  # (N, 1, 32, 32), (N,)
    torch.manual_seed(cfg.judge_seed)
    model = SmallCNN(1, (x.shape[1], x.shape[2]), NUM_CLASSES, dropout=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(cfg.judge_seed)
    model.train()
    for _ in range(cfg.judge_epochs):
        perm = torch.randperm(len(xs), generator=g)
        for i in range(0, len(perm), batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(jitter(xs[idx], g, cfg)), ys[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def predict(model, images: np.ndarray, batch: int = 500) -> np.ndarray:
    """Labels (N,) the model reads in uint8 (N, 32, 32) images."""
    x = to_unit(images)
    return torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)]).numpy()


def class_fidelity(pred: np.ndarray, labels: np.ndarray, num_classes: int = NUM_CLASSES) -> tuple[list[float], float]:
    """(per-class fraction of samples read as their own label, their mean over classes present)."""
    per = [float((pred[labels == c] == c).mean()) if (labels == c).any() else float("nan")
           for c in range(num_classes)]
    present = [p for p in per if not math.isnan(p)]
    return per, float(np.mean(present)) if present else float("nan")


def combined_score(fidelity: float, downstream: float, how: str) -> float:
    """The number a sweep maximises (ProxyConfig.score)."""
    if how == "fidelity":
        return fidelity
    if how == "downstream":
        return downstream
    return 0.5 * (fidelity + downstream)


__all__ = ["NoiseMatch", "ProxyConfig", "ProxyConfigError", "ProxySplits", "class_fidelity", "combined_score",
           "jitter", "load_proxy", "load_proxy_config", "match_noise", "match_sample_rate", "predict",
           "standin_private_set", "train_judge", "upsample_digits"]
