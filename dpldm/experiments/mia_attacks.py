"""Membership-inference attacks on a latent diffusion model and the metrics that judge them (pure:
no files, no experiment state; `dpldm experiment mia` in dpldm/experiments/mia.py runs them).

Scores (higher = "more likely a non-member"; `membership = -score` for the metrics):
  loss        the per-example diffusion loss ||eps - eps_theta(x_t, t, y)||^2 / D at a FIXED set of
              (timestep, noise) draws, seeded, identical for every example and every model, averaged
              over the draws, conditional on the true label: the LOSS attack of Yeom et al. (CSF 2018)
              as applied to diffusion models by Matsumoto et al. (2023) and Carlini et al. (2023).
  calibrated  the loss minus the loss of a REFERENCE model (the public pre-fine-tuning model) on the
              same x, t and noise: the difficulty calibration of Watson et al. (ICLR 2022) / the
              offline reference idea of Carlini et al., "Membership inference attacks from first
              principles" (LiRA, S&P 2022) and "Extracting training data from diffusion models"
              (USENIX Security 2023). An example that is easy for every model is no longer
              mistaken for a member.
  pia         PIA, Kong et al., "An efficient membership inference attack for the diffusion model
              by proximal initialization" (ICLR 2024): eps0 = eps_theta(x_0, 0, y);
              x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps0; score = mean |eps_theta(x_t, t, y) - eps0|^p
              (p = 4, the paper's choice; a monotone function of its l_p norm).

Metrics over membership scores (higher = member): ROC AUC (ties count one half, the Mann-Whitney
statistic), the ROC curve, TPR at a target FPR (the largest TPR over thresholds whose FPR <= the
target), percentile bootstrap confidence intervals (members and non-members resampled
independently, seeded), and the trade-off bound of (epsilon, delta)-DP (Kairouz, Oh and
Viswanath, ICML 2015): every membership test of a DP mechanism has
TPR <= min(1, e^eps FPR + delta, 1 - e^-eps (1 - delta - FPR)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from dpldm.diffusion.schedule import DiffusionSchedule

PIA_P = 4.0


# -- model inputs -------------------------------------------------------------------------------------

@torch.no_grad()
def encode_examples(ldm, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    """uint8 images (N, H, W) -> SCALED latents (N, Z, h, w), exactly as the trainer sees them
    (dpldm.data.codec.images_to_tensor: [-1, 1]; the frozen encoder's posterior mean,
    dpldm.train.private_data.encode_images; times the model's scale factor, DiffusionDPLoss)."""
    from dpldm.data.codec import images_to_tensor
    from dpldm.train.private_data import encode_images

    x = images_to_tensor(np.asarray(images))  # (N, C, H, W) in [-1, 1]
    return encode_images(ldm.ae, x, torch.device("cpu"), batch) * float(ldm.scale_factor)  # (N, Z, h, w)


@dataclass(frozen=True)
class Draws:
    """M fixed (timestep, noise) pairs shared by every example and every model."""

    t: torch.Tensor  # (M,) int64
    noise: torch.Tensor  # (M, Z, h, w) float32

    def __len__(self) -> int:
        return int(self.t.shape[0])

    def at(self, timestep: int) -> "Draws":
        """The draws whose timestep is `timestep`."""
        keep = self.t == int(timestep)  # (M,)
        if not bool(keep.any()):
            raise ValueError(f"no draw at timestep {timestep} (have {sorted(set(self.t.tolist()))})")
        return Draws(self.t[keep], self.noise[keep])


def fixed_draws(timesteps: Sequence[int], noises: int, latent_shape: Sequence[int], seed: int) -> Draws:
    """len(timesteps) * noises draws: the SAME `noises` noise tensors (seeded CPU generator) at every
    timestep, so the draws at one timestep do not depend on which others are in the grid."""
    if noises < 1 or not timesteps:
        raise ValueError("fixed_draws: need >= 1 timestep and >= 1 noise")
    g = torch.Generator().manual_seed(int(seed))
    noise = torch.randn((noises, *latent_shape), generator=g)  # (noises, Z, h, w)
    t = torch.tensor([int(s) for s in timesteps for _ in range(noises)], dtype=torch.int64)  # (M,)
    return Draws(t, noise.repeat(len(timesteps), 1, 1, 1))  # noise (M, Z, h, w), row k*noises+j = noise j


# -- scores ---------------------------------------------------------------------------------------------

def _chunks(n: int, size: int):
    for s in range(0, n, max(1, size)):
        yield slice(s, min(n, s + max(1, size)))


@torch.no_grad()
def loss_matrix(unet: nn.Module, schedule: DiffusionSchedule, z0: torch.Tensor, y: torch.Tensor, draws: Draws,
                batch: int = 512) -> torch.Tensor:
    """Per-example, per-draw eps-prediction MSE: (N, M). z0 (N, Z, h, w) scaled latents, y (N,) labels
    (conditional on the true label; no label dropout). `batch` bounds the UNet rows per call."""
    unet.eval()
    N, M = z0.shape[0], len(draws)
    a = schedule.alphas_cumprod.sqrt()[draws.t].float().view(1, M, 1, 1, 1)  # (1, M, 1, 1, 1)
    s = (1 - schedule.alphas_cumprod).sqrt()[draws.t].float().view(1, M, 1, 1, 1)
    out = torch.empty(N, M)
    for rows in _chunks(N, batch // M if M <= batch else 1):
        z = z0[rows].float()  # (b, Z, h, w)
        b = z.shape[0]
        for cols in _chunks(M, batch):
            m = cols.stop - cols.start
            noise = draws.noise[cols].unsqueeze(0)  # (1, m, Z, h, w)
            x_t = a[:, cols] * z.unsqueeze(1) + s[:, cols] * noise  # (b, m, Z, h, w)
            t = draws.t[cols].repeat(b)  # (b*m,)
            eps = unet(x_t.flatten(0, 1), t, y[rows].repeat_interleave(m))  # (b*m, Z, h, w)
            out[rows, cols] = (eps.view(b, m, *z.shape[1:]) - noise).pow(2).flatten(2).mean(dim=2)  # (b, m)
    return out


def loss_scores(unet: nn.Module, schedule: DiffusionSchedule, z0: torch.Tensor, y: torch.Tensor, draws: Draws,
                batch: int = 512) -> torch.Tensor:
    """The loss attack: mean over the fixed draws of the per-example loss, (N,); higher = non-member."""
    return loss_matrix(unet, schedule, z0, y, draws, batch).mean(dim=1)


@torch.no_grad()
def pia_matrix(unet: nn.Module, schedule: DiffusionSchedule, z0: torch.Tensor, y: torch.Tensor,
               timesteps: Sequence[int], p: float = PIA_P, batch: int = 512) -> torch.Tensor:
    """PIA (Kong et al., ICLR 2024) at each timestep: (N, len(timesteps)); higher = non-member.
    eps0 = eps_theta(x_0, 0, y) is computed once per example and reused at every t."""
    unet.eval()
    N = z0.shape[0]
    out = torch.empty(N, len(timesteps))
    for rows in _chunks(N, batch):
        z = z0[rows].float()  # (b, Z, h, w)
        lab = y[rows]
        eps0 = unet(z, torch.zeros(z.shape[0], dtype=torch.int64), lab)  # (b, Z, h, w)
        for k, t in enumerate(timesteps):
            ab = float(schedule.alphas_cumprod[int(t)])
            x_t = math.sqrt(ab) * z + math.sqrt(1 - ab) * eps0  # (b, Z, h, w): the proximal initialisation
            eps_t = unet(x_t, torch.full((z.shape[0],), int(t), dtype=torch.int64), lab)  # (b, Z, h, w)
            out[rows, k] = (eps_t - eps0).abs().pow(p).flatten(1).mean(dim=1)  # (b,)
    return out


# -- metrics (membership scores: higher = member) --------------------------------------------------

def _ranks(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x, method="average")


def auc(member: np.ndarray, nonmember: np.ndarray) -> float:
    """ROC AUC = P(member score > non-member score) + P(tie) / 2 (Mann-Whitney U / (n1 n0))."""
    m, n = np.asarray(member, np.float64), np.asarray(nonmember, np.float64)
    if m.size == 0 or n.size == 0:
        raise ValueError("auc: need at least one member and one non-member")
    r = _ranks(np.concatenate([m, n]))[: m.size]  # (n1,) average ranks of the members
    return float((r.sum() - m.size * (m.size + 1) / 2) / (m.size * n.size))


def roc_curve(member: np.ndarray, nonmember: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr), each (K+1,), for the rule "member iff score >= thr" over the K distinct scores
    (descending), starting at (0, 0) (threshold +inf) and ending at (1, 1)."""
    m, n = np.asarray(member, np.float64), np.asarray(nonmember, np.float64)
    s = np.concatenate([m, n])  # (n1+n0,)
    is_m = np.concatenate([np.ones(m.size), np.zeros(n.size)])
    order = np.argsort(-s, kind="mergesort")
    s, is_m = s[order], is_m[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]  # last index of each tie group
    tp, fp = np.cumsum(is_m)[last], np.cumsum(1 - is_m)[last]
    return np.r_[0.0, fp / n.size], np.r_[0.0, tp / m.size]


def tpr_at_fpr(member: np.ndarray, nonmember: np.ndarray, fpr: float) -> float:
    """The largest TPR over thresholds whose FPR <= `fpr` (rule: member iff score >= thr). At most
    k = floor(fpr * n0) non-members may pass, so the best threshold lies just above the (k+1)-th
    largest non-member score."""
    m, n = np.asarray(member, np.float64), np.sort(np.asarray(nonmember, np.float64))[::-1]
    k = int(math.floor(fpr * n.size + 1e-9))
    if k >= n.size:
        return 1.0
    return float(np.mean(m > n[k]))


def bootstrap_ci(member: np.ndarray, nonmember: np.ndarray, statistic: Callable[[np.ndarray, np.ndarray], float],
                 n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of statistic(member, nonmember): both groups resampled with
    replacement, independently, from a seeded generator."""
    rng = np.random.default_rng(seed)
    m, n = np.asarray(member, np.float64), np.asarray(nonmember, np.float64)
    vals = np.array([statistic(m[rng.integers(0, m.size, m.size)], n[rng.integers(0, n.size, n.size)])
                     for _ in range(n_boot)])
    lo, hi = np.quantile(vals, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def dp_tpr_bound(fpr, epsilon: float, delta: float):
    """The largest TPR any membership test can reach at `fpr` against an (epsilon, delta)-DP
    mechanism (Kairouz et al. 2015): min(1, e^eps fpr + delta, 1 - e^-eps (1 - delta - fpr));
    1 for epsilon = inf. Scalar in, float out; array in, array out."""
    f = np.asarray(fpr, np.float64)
    if epsilon == math.inf:
        b = np.ones_like(f)
    else:
        b = np.minimum.reduce([np.ones_like(f), math.exp(epsilon) * f + delta,
                               1 - math.exp(-epsilon) * (1 - delta - f)])
        b = np.maximum(b, 0.0)
    return float(b) if b.ndim == 0 else b


def dp_auc_bound(epsilon: float, delta: float) -> float:
    """The area under the (epsilon, delta)-DP trade-off bound: the largest AUC any test can reach.
    The bound is piecewise linear with kinks at (1 - delta) / (e^eps + 1) and 1 - delta, so the
    trapezoid rule on those points is exact."""
    if epsilon == math.inf:
        return 1.0
    xs = np.unique(np.clip([0.0, (1 - delta) / (math.exp(epsilon) + 1), 1 - delta, 1.0], 0.0, 1.0))
    ys = dp_tpr_bound(xs, epsilon, delta)
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2))


WITHIN = "yes (within CI)"


def verdict(value: float, ci_low: float, bound: float) -> str:
    """'yes' (the estimate is under the bound), 'yes (within CI)' (the estimate is above it but the
    95% interval reaches below it: consistent with the bound, not a significant violation; e.g. at
    FPR 0.1% of 1000 non-members a chance-level attack scatters around e^1 * 0.001), 'NO' (the
    whole interval lies above the bound: the release does not behave as (epsilon, delta)-DP)."""
    return "yes" if value <= bound + 1e-12 else WITHIN if ci_low <= bound + 1e-12 else "NO"


def evaluate(member: np.ndarray, nonmember: np.ndarray, epsilon: float, delta: float, fprs: Sequence[float],
             n_boot: int = 1000, seed: int = 0) -> dict:
    """AUC and TPR at each FPR with 95% bootstrap intervals beside the (epsilon, delta)-DP bounds,
    and the verdict (the worst of the AUC's and the TPRs'). JSON-ready; FPR keys as '%g'."""
    row = {"auc": auc(member, nonmember), "auc_ci": bootstrap_ci(member, nonmember, auc, n_boot, seed),
           "auc_bound": dp_auc_bound(epsilon, delta), "epsilon": epsilon, "delta": delta, "tpr": {}, "tpr_ci": {},
           "bound": {}, "members": int(np.size(member)), "nonmembers": int(np.size(nonmember))}
    checks = [verdict(row["auc"], row["auc_ci"][0], row["auc_bound"])]
    for f in fprs:
        k = f"{f:g}"
        row["tpr"][k] = tpr_at_fpr(member, nonmember, f)
        row["tpr_ci"][k] = bootstrap_ci(member, nonmember, lambda m, n: tpr_at_fpr(m, n, f), n_boot, seed)
        row["bound"][k] = dp_tpr_bound(f, epsilon, delta)
        checks.append(verdict(row["tpr"][k], row["tpr_ci"][k][0], row["bound"][k]))
    row["under_bound"] = "NO" if "NO" in checks else WITHIN if WITHIN in checks else "yes"
    return row
