"""The direct DP-SGD baseline: a classifier trained on the private images themselves with DP-SGD.

The product must beat this: a user who only wants a classifier can train one on the private data
with DP-SGD at the same (epsilon, delta) instead of releasing synthetic data (issue 16). It goes
through the project's DP engine exactly as the fine-tuning trainer does:

    PrivacyLedger.create(N, q = B/N, C, delta, steps, epsilon)    # sigma calibrated (PRV)
    DPStep(SmallCNN, per-example cross-entropy, ledger, GaussianNoise, Adam)
    each of `steps` logical steps: Poisson sample -> clipped sums per physical chunk -> one
    noise draw N(0, sigma^2 C^2) -> / (q*N) -> Adam

The whole (epsilon, delta) is this classifier's own budget: sigma is calibrated for its own q and
steps. Its settings (DPClassifierConfig's defaults) were chosen on PUBLIC data only:
dpldm/experiments/tune_dp_classifier.py trains each candidate on the public proxy (dpldm.eval.proxy: the
stand-in set of scikit-learn digits grown to N = 4000, noise calibrated for the same (epsilon,
delta) with the candidate's own q and steps) and scores it on the proxy's held-out half
(docs/tuning.md, "The direct DP-SGD classifier").

Randomness: the model's initial weights are drawn from `seed` (a public, data-independent choice:
DP-SGD's guarantee holds for any initialisation fixed before the data are seen; the global torch
generator is restored afterwards). A private run (the default) draws the Poisson plan's seed and
every noise draw from the OS. `deterministic = True` seeds both from `seed` as well: anyone who
knows the seed can remove the noise, so it is refused unless `not_private = True` says the data
are public (the proxy), and the result then reports epsilon = inf, as the trainer does
(train.deterministic / train.not_private).

The test split is read once, after training; nothing is selected on it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dpldm.errors import InputError


class DPClassifierConfigError(InputError, ValueError):
    """A bad DPClassifierConfig value or bad data given to train_dp_classifier."""


@dataclass
class DPClassifierConfig:
    """Settings of the direct DP-SGD classifier (defaults: chosen on the public proxy, docs/tuning.md)."""

    steps: int = 200  # logical DP-SGD steps (carried over: 100k example-gradients, the compute budget)
    expected_batch_size: int = 500  # q*N: the sample rate is q = expected_batch_size / N
    max_grad_norm: float = 1.0  # the clip norm C: the proxy's best at eps 1 and 10 (0.1 within 0.7 points)
    lr: float = 3e-3  # Adam, constant: the proxy's best at eps 1 and 10 (docs/tuning.md; was 2e-3, never chosen)
    physical_batch_size: int = 250  # examples per forward/backward chunk (memory only: same result)
    accountant: str = "prv"  # prv | rdp (Opacus)
    channels: tuple[int, int] = (16, 32)  # SmallCNN widths
    hidden: int = 128
    deterministic: bool = False  # seed the Poisson plan and the noise from `seed`: NOT private
    not_private: bool = False  # required with deterministic: the data are public, epsilon reported as inf

    def __post_init__(self) -> None:
        if isinstance(self.channels, list):
            self.channels = tuple(self.channels)
        for name in ("steps", "expected_batch_size", "physical_batch_size", "hidden"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise DPClassifierConfigError(f"dp_classifier.{name}: must be an integer >= 1, got {v!r}")
        for name in ("max_grad_norm", "lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise DPClassifierConfigError(f"dp_classifier.{name}: must be a finite number > 0, got {v!r}")
        if self.accountant not in ("prv", "rdp"):
            raise DPClassifierConfigError(f"dp_classifier.accountant: must be one of prv|rdp, got {self.accountant!r}")
        ch = self.channels
        if not (isinstance(ch, tuple) and len(ch) == 2
                and all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in ch)):
            raise DPClassifierConfigError(f"dp_classifier.channels: must be two integers >= 1, got {ch!r}")
        for name in ("deterministic", "not_private"):
            if not isinstance(getattr(self, name), bool):
                raise DPClassifierConfigError(f"dp_classifier.{name}: must be true or false, "
                                              f"got {getattr(self, name)!r}")
        if self.deterministic and not self.not_private:
            raise DPClassifierConfigError(
                "dp_classifier.deterministic = true seeds the noise and the Poisson sampling from the seed: anyone "
                "who knows it can remove the noise, so the run is NOT private; set not_private = true (public data "
                "only, epsilon reported as inf)")


def _images(x: Any, name: str) -> torch.Tensor:
    """uint8 (N, H, W) -> float32 (N, 1, H, W) in [-1, 1]."""
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 3:
        what = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise DPClassifierConfigError(f"{name}: expected a uint8 numpy array (N, H, W), got {what}")
    if len(x) == 0:
        raise DPClassifierConfigError(f"{name}: no images")
    if min(x.shape[1:]) < 8:
        raise DPClassifierConfigError(f"{name}: images of {x.shape[1]}x{x.shape[2]} are too small (need >= 8)")
    return torch.from_numpy(np.ascontiguousarray(x)).float().div(127.5).sub(1.0)[:, None]  # (N, 1, H, W)


def _labels(y: Any, n: int, num_classes: int, name: str) -> torch.Tensor:
    """Integer labels (N,) in [0, num_classes) -> int64 tensor (N,)."""
    if not isinstance(y, np.ndarray) or y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        what = f"{y.dtype} {y.shape}" if isinstance(y, np.ndarray) else type(y).__name__
        raise DPClassifierConfigError(f"{name}: expected an integer numpy array (N,), got {what}")
    if len(y) != n:
        raise DPClassifierConfigError(f"{name}: {len(y)} labels for {n} images")
    if y.min() < 0 or y.max() >= num_classes:
        raise DPClassifierConfigError(f"{name}: labels must lie in [0, {num_classes}), got {int(y.min())}..{int(y.max())}")
    return torch.from_numpy(y.astype(np.int64))


@dataclass
class DPClassifierRun:
    """One direct DP-SGD run: the model, its DPStep and ledger, the training tensors (tests drive it
    step by step; train_dp_classifier runs every step)."""

    model: torch.nn.Module
    dp: Any  # dpldm.privacy.DPStep
    ledger: Any  # dpldm.privacy.PrivacyLedger
    x: torch.Tensor  # (N, 1, H, W) in [-1, 1]
    y: torch.Tensor  # (N,)

    def accumulate_step(self) -> torch.Tensor:
        """Open the next logical step and add every sampled example's clipped gradient (no noise
        yet); returns the Poisson sample (sorted indices)."""
        idx = self.dp.begin_step()
        for chunk in self.dp.my_chunks:
            self.dp.accumulate((self.x[chunk], self.y[chunk]))  # (B, 1, H, W), (B,)
        return idx

    def step(self) -> None:
        """One whole logical step: sample, clip and sum, one noise draw, / (q*N), Adam."""
        self.accumulate_step()
        self.dp.step()


def per_example_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """(B,) cross-entropy of each example of (images (B, 1, H, W), labels (B,))."""
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def build_run(train_x: np.ndarray, train_y: np.ndarray, ledger, config: DPClassifierConfig, seed: int,
              num_classes: int = 10) -> DPClassifierRun:
    """The model (initial weights from `seed`), Adam and a DPStep on `ledger` (its C, sigma, q and
    Poisson plan). The noise is seeded from `seed` only when config.deterministic."""
    from dpldm.eval.classifier import SmallCNN
    from dpldm.privacy import DPStep, GaussianNoise

    x = _images(train_x, "train images")
    y = _labels(train_y, len(x), num_classes, "train labels")
    with torch.random.fork_rng(devices=[]):  # a public, data-independent init; the global generator is restored
        torch.manual_seed(seed)
        model = SmallCNN(1, (x.shape[2], x.shape[3]), num_classes, channels=config.channels, hidden=config.hidden,
                         dropout=0.0)
    model.eval()  # no dropout, no batch norm: train and eval modes compute the same
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    noise = GaussianNoise(seed=seed if config.deterministic else None)
    dp = DPStep(model, per_example_loss, ledger, noise=noise, optimizer=opt,
                physical_batch_size=config.physical_batch_size)
    return DPClassifierRun(model, dp, ledger, x, y)


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, batch: int = 1000) -> np.ndarray:
    """Labels (N,) for images (N, 1, H, W) in [-1, 1]."""
    model.eval()
    return torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)]).numpy()


def train_dp_classifier(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                        epsilon: float, delta: float, config: DPClassifierConfig | None = None, seed: int = 0,
                        num_classes: int = 10) -> dict[str, Any]:
    """Train SmallCNN on (train_x uint8 (N, H, W), train_y (N,)) with DP-SGD at (epsilon, delta), then
    report its accuracy on the test split ONCE. Returns accuracy, epsilon (spent; inf when
    not_private), epsilon_accounted (the accountant's epsilon for the steps taken), delta,
    noise_multiplier, sample_rate (q = B/N), expected_batch_size, steps, max_grad_norm, lr,
    trainable_parameters, noise ("os" or "seeded"), private (bool)."""
    from dpldm.privacy import PrivacyLedger
    from dpldm.privacy.accountant import check_delta, check_epsilon

    config = DPClassifierConfig() if config is None else config
    if not isinstance(config, DPClassifierConfig):
        raise DPClassifierConfigError(f"config must be a DPClassifierConfig, got {type(config).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise DPClassifierConfigError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    epsilon = check_epsilon(epsilon)
    n = len(_images(train_x, "train images"))  # bad data are refused before sigma is calibrated
    _labels(train_y, n, num_classes, "train labels")
    tx = _images(test_x, "test images")
    ty = _labels(test_y, len(tx), num_classes, "test labels")
    if tuple(tx.shape[2:]) != tuple(train_x.shape[1:]):
        raise DPClassifierConfigError(f"test images are {tx.shape[2]}x{tx.shape[3]}, the training images "
                                      f"{train_x.shape[1]}x{train_x.shape[2]}")
    if config.expected_batch_size > n:
        raise DPClassifierConfigError(f"dp_classifier.expected_batch_size={config.expected_batch_size} exceeds the "
                                      f"N={n} training examples")
    delta = check_delta(delta, n)
    ledger = PrivacyLedger.create(num_examples=n, sample_rate=config.expected_batch_size / n,
                                  max_grad_norm=config.max_grad_norm, delta=delta, steps=config.steps,
                                  epsilon=epsilon, accountant=config.accountant,
                                  seed=seed if config.deterministic else None)
    run = build_run(train_x, train_y, ledger, config, seed, num_classes)
    for _ in range(config.steps):
        run.step()
    predicted, truth = predict(run.model, tx), ty.numpy()  # the test split, read once
    acc = float((predicted == truth).mean())
    recalls = [float((predicted[truth == c] == c).mean()) for c in np.unique(truth)]  # classes present in the test split
    spent = ledger.epsilon_spent()
    return {"accuracy": acc, "mean_per_class_accuracy": float(np.mean(recalls)),
            "epsilon": math.inf if config.not_private else spent, "epsilon_accounted": spent,
            "delta": delta, "noise_multiplier": ledger.noise_multiplier, "sample_rate": ledger.sample_rate,
            "expected_batch_size": config.expected_batch_size, "steps": ledger.steps_done,
            "max_grad_norm": ledger.max_grad_norm, "lr": config.lr,
            "trainable_parameters": sum(p.numel() for p in run.model.parameters()),
            "noise": run.dp.noise.mode, "private": not config.not_private}


def config_dict(config: DPClassifierConfig) -> dict[str, Any]:
    """JSON-able dict of a config (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


__all__ = ["DPClassifierConfig", "DPClassifierConfigError", "DPClassifierRun", "build_run", "config_dict",
           "per_example_loss", "predict", "train_dp_classifier"]
