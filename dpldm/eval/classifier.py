"""Downstream accuracy, the DPDM / DP-LDM protocol: train on synthetic, test on real, once.

1. `train_and_select(synthetic_images, synthetic_labels, ...)` splits the *synthetic* set into
   train / validation, trains a small CNN and keeps the epoch with the best validation accuracy
   (early stopping with patience). It has no parameter for real data: model selection cannot
   see the real test split (DPImageBench: selecting on it overstates utility and breaks DP).
2. `evaluate_once(selected, test_images, test_labels)` reports accuracy on the real test split
   (`evaluate_once_detailed`: the same, with the confusion matrix and each class's accuracy: the
   issue-16 class fidelity "read by the downstream CNN's real-test confusion"). A `SelectedClassifier` can be
   evaluated once; a second call is an error.

Images: uint8 (N, H, W) / (N, H, W, C) or float tensors (N, C, H, W) in [-1, 1]; 1 or 3
channels, any size >= 8 (28x28 MNIST, 32x32 padded MNIST, ...). Test images of another size are
centre-padded (background = the lowest value) or centre-cropped to the training size.
"""
from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dpldm.errors import UserError
from dpldm.eval.augment import random_affine
from dpldm.eval.runtime import ThreadTuner, restore_threads

ArrayLike = Union[np.ndarray, torch.Tensor]
# classes of the downstream task (labels 0..MAX_CLASSES-1): the CNN has one output per class up to the
# largest label, and the real-test confusion matrix (num_classes**2 counts, 10**6 here) goes into the
# JSON report. Not dpldm.config.MAX_CLASSES (10**6, an embedding table's rows): 10**12 counts.
MAX_CLASSES = 1_000


@dataclass
class ClassifierConfig:
    epochs: int = 8
    batch_size: int = 64
    lr: float = 5e-3  # peak of a one-cycle schedule (AdamW)
    weight_decay: float = 1e-4
    val_fraction: float = 0.1
    patience: int = 3  # epochs without a better validation accuracy before stopping
    channels: tuple[int, int] = (16, 32)
    hidden: int = 128
    dropout: float = 0.1
    augment: bool = True  # random affine jitter of every training batch (dpldm.eval.augment); chosen on the public proxy (docs/tuning.md)
    max_rotation_deg: float = 10.0
    max_scale: float = 0.1
    max_shift_px: float = 2.0
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        if self.epochs < 1:
            raise UserError(f"classifier epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise UserError(f"classifier batch size must be >= 1, got {self.batch_size}")
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"validation fraction must be in (0, 1), got {self.val_fraction}")
        if self.patience < 1:
            raise UserError(f"patience must be >= 1, got {self.patience}")
        if self.lr <= 0:
            raise UserError(f"learning rate must be > 0, got {self.lr}")
        if not (0 <= self.max_rotation_deg <= 180 and 0 <= self.max_scale < 1 and self.max_shift_px >= 0):
            raise UserError(f"classifier augmentation: need 0 <= max_rotation_deg <= 180, 0 <= max_scale < 1 and "
                            f"max_shift_px >= 0, got {self.max_rotation_deg}, {self.max_scale}, {self.max_shift_px}")


class SmallCNN(nn.Module):
    """conv3x3-ReLU-maxpool x2, then an MLP (~0.2 M parameters at 28-32 px, default widths)."""

    def __init__(self, in_channels: int, image_size: tuple[int, int], num_classes: int,
                 channels: tuple[int, int] = (16, 32), hidden: int = 128, dropout: float = 0.1):
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, c1, H/2, W/2)
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, c2, H/4, W/4)
        )
        h, w = image_size[0] // 4, image_size[1] // 4
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(c2 * h * w, hidden), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) in [-1, 1] -> (B, classes)
        return self.head(self.features(x))


@dataclass
class SelectedClassifier:
    """A CNN chosen on synthetic validation data; `evaluate_once` may use it one time."""

    model: SmallCNN
    num_classes: int
    image_size: tuple[int, int]
    in_channels: int
    selected_epoch: int
    val_accuracy: float
    n_train: int
    n_val: int
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    evaluated: bool = False


# ----------------------------------------------------------------------------- inputs


def to_float_nchw(images: ArrayLike, name: str = "images") -> torch.Tensor:
    """uint8 (N,H,W[,C]) or float tensor (N,C,H,W) in [-1,1] -> float32 (N, C, H, W), C in {1,3}."""
    if isinstance(images, torch.Tensor) and images.dtype != torch.uint8:
        x = images.detach().cpu().float()
        if x.ndim == 3:
            x = x[:, None]
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise UserError(f"{name}: float tensors must be (N, C, H, W) with C in {{1, 3}}, "
                            f"got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise UserError(f"{name}: contains NaN or infinite values")
        x = x.clamp(-1, 1)
    else:
        arr = images.cpu().numpy() if isinstance(images, torch.Tensor) else images
        if not isinstance(arr, np.ndarray):
            raise UserError(f"{name}: expected a numpy array or torch tensor, got {type(arr).__name__}")
        if arr.dtype != np.uint8:
            raise UserError(f"{name}: arrays must be uint8 (0..255), got {arr.dtype}; float data "
                            f"goes in as a torch tensor (N, C, H, W) in [-1, 1]")
        if arr.ndim == 3:
            arr = arr[..., None]
        if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4):
            raise UserError(f"{name}: expected shape (N, H, W) or (N, H, W, C) with C in 1/3/4, "
                            f"got {tuple(arr.shape)}")
        arr = arr[..., :3] if arr.shape[-1] == 4 else arr
        x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if len(x) == 0:
        raise UserError(f"{name}: no images")
    if min(x.shape[-2:]) < 8:
        raise UserError(f"{name}: images of {x.shape[-2]}x{x.shape[-1]} are too small (need >= 8)")
    return x.contiguous()


def to_labels(labels: ArrayLike, n: int, num_classes: Optional[int], name: str = "labels"
              ) -> torch.Tensor:
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if y.ndim != 1 or len(y) != n:
        raise UserError(f"{name}: expected {n} labels (one per image, shape ({n},)), got shape {y.shape}")
    if not (np.issubdtype(y.dtype, np.integer) or
            (np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)))):
        raise UserError(f"{name}: labels must be integers, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if len(y) and y.min() < 0:
        raise UserError(f"{name}: label out of range: {int(y.min())} < 0")
    if len(y) and y.max() >= MAX_CLASSES:
        raise UserError(f"{name}: label {int(y.max())} out of range: labels must lie in [0, {MAX_CLASSES:,}) "
                        "(the downstream classifier has one output per class up to the largest label)")
    if num_classes is not None and len(y) and y.max() >= num_classes:
        raise UserError(f"{name}: label out of range: {int(y.max())} >= num_classes={num_classes}")
    return torch.from_numpy(y)


def match_size(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Centre-pad (with -1, the background) or centre-crop (N, C, H, W) to `size`."""
    for axis, target in ((2, size[0]), (3, size[1])):
        cur = x.shape[axis]
        if cur < target:
            before = (target - cur) // 2
            pad = [0, 0, 0, 0]
            pad[(3 - axis) * 2] = before
            pad[(3 - axis) * 2 + 1] = target - cur - before
            x = F.pad(x, pad, value=-1.0)
        elif cur > target:
            start = (cur - target) // 2
            x = x.narrow(axis, start, target)
    return x.contiguous()


# ----------------------------------------------------------------------------- the protocol


def _predict(model: nn.Module, x: torch.Tensor, device: str, batch: int = 512) -> torch.Tensor:
    """(N, C, H, W) -> (N,) predicted classes (on the CPU)."""
    model.eval()
    with torch.inference_mode():
        return torch.cat([model(x[i:i + batch].to(device)).argmax(1).cpu() for i in range(0, len(x), batch)]
                         ) if len(x) else torch.zeros(0, dtype=torch.long)


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: str, batch: int = 512) -> float:
    return int((_predict(model, x, device, batch) == y).sum()) / max(1, len(x))


def confusion_matrix(true: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """(N,), (N,) -> (num_classes, num_classes) int64 counts: row = true class, column = predicted."""
    true, predicted = np.asarray(true, dtype=np.int64), np.asarray(predicted, dtype=np.int64)
    return np.bincount(true * num_classes + predicted, minlength=num_classes * num_classes
                       ).reshape(num_classes, num_classes)


@dataclass(frozen=True)
class RealTestResult:
    """One real-test evaluation: accuracy and the confusion matrix it comes from."""

    accuracy: float
    confusion: np.ndarray  # (num_classes, num_classes): row = true class, column = predicted

    @property
    def per_class_accuracy(self) -> list[Optional[float]]:
        """Recall of each class (the fraction of its test images read as it); None without test images."""
        totals = self.confusion.sum(1)
        return [float(self.confusion[c, c] / totals[c]) if totals[c] else None for c in range(len(totals))]

    @property
    def mean_per_class_accuracy(self) -> float:
        present = [a for a in self.per_class_accuracy if a is not None]
        return float(np.mean(present)) if present else float("nan")


def _stratified_split(y: np.ndarray, val_fraction: float, rng: np.random.Generator
                      ) -> tuple[np.ndarray, np.ndarray]:
    train_idx, val_idx = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(len(idx) * val_fraction))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        else:
            k = 0
        val_idx.append(idx[:k])
        train_idx.append(idx[k:])
    return rng.permutation(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))


def train_and_select(synthetic_images: ArrayLike, synthetic_labels: ArrayLike, *,
                     num_classes: Optional[int] = None,
                     config: Optional[ClassifierConfig] = None,
                     verbose: bool = False) -> SelectedClassifier:
    """Train a SmallCNN on synthetic data; select the epoch on a synthetic validation split.

    Takes no real data by design: the real test split is only seen by `evaluate_once`.
    """
    cfg = config or ClassifierConfig()
    x = to_float_nchw(synthetic_images, "synthetic images")
    y = to_labels(synthetic_labels, len(x), num_classes, "synthetic labels")
    if num_classes is None:
        num_classes = int(y.max()) + 1
    if not 2 <= num_classes <= MAX_CLASSES:
        raise UserError(f"need 2..{MAX_CLASSES:,} classes, got num_classes={num_classes}")
    if len(x) < 4:
        raise UserError(f"need at least 4 synthetic images to train and validate, got {len(x)}")
    rng = np.random.default_rng(cfg.seed)
    tr, va = _stratified_split(y.numpy(), cfg.val_fraction, rng)
    if len(va) == 0 or len(tr) == 0:
        raise UserError("synthetic set too small for a train/validation split: need >= 2 images "
                        "of some class")
    device = cfg.device
    torch.manual_seed(cfg.seed)
    model = SmallCNN(x.shape[1], (x.shape[2], x.shape[3]), num_classes, cfg.channels, cfg.hidden,
                     cfg.dropout).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = (len(tr) + cfg.batch_size - 1) // cfg.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    x_tr, y_tr, x_va, y_va = x[tr], y[tr], x[va], y[va]
    gen = torch.Generator().manual_seed(cfg.seed)
    aug_gen = torch.Generator().manual_seed(cfg.seed + 1)  # its own stream: the batch order does not depend on it
    best_acc, best_epoch, best_state, since_best = -1.0, 0, None, 0
    history = []
    t0 = time.perf_counter()
    tuner = ThreadTuner(window=5, reprobe=100) if str(device).startswith("cpu") else None
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        perm = torch.randperm(len(x_tr), generator=gen)
        total, loss_sum = 0, 0.0
        with restore_threads():
            for i in range(0, len(perm), cfg.batch_size):
                idx = perm[i:i + cfg.batch_size]
                xb, yb = x_tr[idx], y_tr[idx]  # (b, C, H, W), (b,)
                if cfg.augment:
                    xb = random_affine(xb, aug_gen, cfg.max_rotation_deg, cfg.max_scale, cfg.max_shift_px)
                xb, yb = xb.to(device), yb.to(device)
                with (tuner.unit(len(idx)) if tuner else contextlib.nullcontext()):
                    loss = F.cross_entropy(model(xb), yb)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                sched.step()
                loss_sum += loss.item() * len(idx)
                total += len(idx)
            if tuner is not None and tuner.best is not None:
                torch.set_num_threads(tuner.best)
            val_acc = _accuracy(model, x_va, y_va, device)
        history.append({"epoch": epoch, "train_loss": loss_sum / total, "val_accuracy": val_acc})
        if verbose:
            print(f"  classifier epoch {epoch}: train loss {loss_sum / total:.4f}, "
                  f"synthetic val acc {val_acc:.4f}", flush=True)
        if val_acc > best_acc:
            best_acc, best_epoch, since_best = val_acc, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            since_best += 1
            if since_best >= cfg.patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    return SelectedClassifier(model=model, num_classes=num_classes, image_size=(x.shape[2], x.shape[3]),
                              in_channels=x.shape[1], selected_epoch=best_epoch, val_accuracy=best_acc,
                              n_train=len(tr), n_val=len(va), history=history,
                              train_seconds=time.perf_counter() - t0)


def evaluate_once(selected: SelectedClassifier, test_images: ArrayLike, test_labels: ArrayLike,
                  device: Optional[str] = None) -> float:
    """Accuracy of the selected classifier on the real test split; allowed once per classifier."""
    return evaluate_once_detailed(selected, test_images, test_labels, device).accuracy


def evaluate_once_detailed(selected: SelectedClassifier, test_images: ArrayLike, test_labels: ArrayLike,
                           device: Optional[str] = None) -> RealTestResult:
    """`evaluate_once` with the confusion matrix; the same one-evaluation rule."""
    if not isinstance(selected, SelectedClassifier):
        raise TypeError("evaluate_once takes the SelectedClassifier returned by train_and_select")
    if selected.evaluated:
        raise RuntimeError("this classifier was already evaluated on the test split; the protocol "
                           "reports the test accuracy once (train and select a new one)")
    x = to_float_nchw(test_images, "real test images")
    y = to_labels(test_labels, len(x), selected.num_classes, "real test labels")
    if x.shape[1] != selected.in_channels:
        raise UserError(f"real test images have {x.shape[1]} channel(s), the synthetic ones "
                        f"{selected.in_channels}")
    x = match_size(x, selected.image_size)
    selected.evaluated = True
    dev = device or next(selected.model.parameters()).device.type
    predicted = _predict(selected.model, x, dev)  # (N,)
    return RealTestResult(accuracy=int((predicted == y).sum()) / max(1, len(x)),
                      confusion=confusion_matrix(y.numpy(), predicted.numpy(), selected.num_classes))


def downstream_accuracy(synthetic_images: ArrayLike, synthetic_labels: ArrayLike,
                        real_test_images: ArrayLike, real_test_labels: ArrayLike, *,
                        num_classes: Optional[int] = None, config: Optional[ClassifierConfig] = None,
                        verbose: bool = False) -> dict:
    """The whole protocol: `train_and_select` on synthetic data, then `evaluate_once` on real."""
    selected = train_and_select(synthetic_images, synthetic_labels, num_classes=num_classes,
                                config=config, verbose=verbose)
    result = evaluate_once_detailed(selected, real_test_images, real_test_labels)
    per_class = result.per_class_accuracy
    present = [c for c, a in enumerate(per_class) if a is not None]
    return {
        "accuracy": result.accuracy,
        "per_class_accuracy": per_class,  # recall per class on the real test split (None: no test image)
        "mean_per_class_accuracy": result.mean_per_class_accuracy,
        "worst_class": min(present, key=lambda c: per_class[c]) if present else None,
        "confusion": result.confusion.tolist(),  # row = true class, column = predicted
        "n_test_real": int(len(real_test_labels)),
        "n_train_synthetic": selected.n_train,
        "n_val_synthetic": selected.n_val,
        "selected_epoch": selected.selected_epoch,
        "epochs_run": len(selected.history),
        "synthetic_val_accuracy": selected.val_accuracy,
        "num_classes": selected.num_classes,
        "classifier_seconds": selected.train_seconds,
    }


__all__ = ["ClassifierConfig", "RealTestResult", "SelectedClassifier", "SmallCNN", "confusion_matrix",
           "downstream_accuracy", "evaluate_once", "evaluate_once_detailed", "match_size", "to_float_nchw",
           "to_labels", "train_and_select"]
