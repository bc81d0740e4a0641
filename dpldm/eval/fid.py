"""FID and KID from Inception features, and cached statistics of the real training split.

FID (Heusel et al. 2017): ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}), float64. From
statistics alone, the matrix square root is `scipy.linalg.sqrtm` with the usual fix (pytorch-fid
/ StyleGAN): when the product is singular enough that the root is not finite, add eps*I to both
covariances; a small imaginary part from round-off is dropped, a large one is an error. sqrtm of
a 2048x2048 matrix takes 15-60 s on 2 shared CPU cores, so from features with n <= 2048 we use
the exact sample-space identity Tr((S1 S2)^{1/2}) = sum(svdvals(X1c X2c^T)) / sqrt((n1-1)(n2-1))
(an n1 x n2 SVD); the tests check it against sqrtm.

KID (Binkowski et al. 2018, as in clean-fid / StyleGAN3): unbiased MMD^2 with the cubic
polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets of size
min(n1, n2, max_subset_size); we also return the std over subsets.

FID is biased upwards at small sample counts (it depends on n), so every FID carries its sample
counts: `FIDResult.n_samples`, `FIDResult.n_real`, and its `str()` prints them.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import scipy.linalg

from dpldm.errors import UserError
from dpldm.utils.io import atomic_path


@dataclass(frozen=True)
class FeatureStats:
    """Mean and covariance (float64) of n feature vectors."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    @classmethod
    def from_features(cls, features: np.ndarray) -> "FeatureStats":
        f = _check_features(features, "features")
        if len(f) < 2:
            raise UserError(f"FID statistics need at least 2 samples, got {len(f)}")
        f = f.astype(np.float64)
        return cls(mu=f.mean(axis=0), sigma=np.cov(f, rowvar=False), n=len(f))

    def save(self, path: Union[str, Path], **meta: str) -> None:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, mu=self.mu, sigma=self.sigma, n=np.array(self.n),
                         **{k: np.array(v) for k, v in meta.items()})

    @classmethod
    def load(cls, path: Union[str, Path]) -> "FeatureStats":
        with np.load(path) as z:
            return cls(mu=z["mu"].astype(np.float64), sigma=z["sigma"].astype(np.float64),
                       n=int(z["n"]))


@dataclass(frozen=True)
class FIDResult:
    value: float
    n_samples: int  # synthetic (evaluated) feature vectors
    n_real: int  # reference feature vectors

    def __str__(self) -> str:
        return f"FID {self.value:.2f} (n={self.n_samples} samples vs {self.n_real} real)"

    def as_dict(self) -> dict:
        return {"fid": self.value, "fid_n_samples": self.n_samples, "fid_n_real": self.n_real}


@dataclass(frozen=True)
class KIDResult:
    mean: float
    std: float
    subset_size: int
    num_subsets: int

    def __str__(self) -> str:
        return (f"KID {self.mean:.5f} +- {self.std:.5f} ({self.num_subsets} subsets of "
                f"{self.subset_size})")

    def as_dict(self) -> dict:
        return {"kid": self.mean, "kid_std": self.std, "kid_subset_size": self.subset_size,
                "kid_num_subsets": self.num_subsets}


def _check_features(f: np.ndarray, name: str) -> np.ndarray:
    f = np.asarray(f)
    if f.ndim != 2 or f.shape[0] == 0:
        raise UserError(f"{name}: expected features of shape (N, D) with N >= 1, got {f.shape}")
    if not np.isfinite(f).all():
        raise UserError(f"{name}: features contain NaN or infinite values")
    return f


# ----------------------------------------------------------------------------- FID


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    """Tr((S1 S2)^{1/2}) with scipy.linalg.sqrtm and the standard fix (pytorch-fid, StyleGAN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "singular matrix" notes; we check the result ourselves
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        diag = np.diagonal(covmean)
        imag = np.abs(diag.imag).max()
        if imag > 1e-3 * max(1.0, np.abs(diag.real).max()):
            raise ValueError(f"FID: matrix square root has a large imaginary component ({imag:.3g})")
        covmean = covmean.real
    return float(np.trace(covmean))


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((S1 S2)^{1/2}) = Tr((A S2 A)^{1/2}) with A = S1^{1/2}: two symmetric eigensolves."""
    w, v = np.linalg.eigh(sigma1)
    a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    lam = np.linalg.eigvalsh(a @ sigma2 @ a)
    return float(np.sqrt(np.clip(lam, 0.0, None)).sum())


def _trace_sqrt_product_svd(x1: np.ndarray, x2: np.ndarray) -> float:
    """Tr((S1 S2)^{1/2}) from features, exactly, in sample space.

    With centred features X_k (n_k x d) and S_k = X_k^T X_k / (n_k - 1), the non-zero
    eigenvalues of S1 S2 are those of X1 X2^T X2 X1^T / c, c = (n1 - 1)(n2 - 1), i.e. the squared
    singular values of X1 X2^T / sqrt(c). So the trace is sum(svdvals(X1 X2^T)) / sqrt(c): an
    n1 x n2 SVD instead of a d x d matrix root (d = 2048), exact and fast when n is small.
    """
    c = (len(x1) - 1) * (len(x2) - 1)
    s = scipy.linalg.svdvals(x1 @ x2.T)
    return float(s.sum() / np.sqrt(c))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6, method: str = "sqrtm") -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    method "sqrtm": scipy.linalg.sqrtm with the standard fix (the reference; ~15-60 s for
    d = 2048 on 2 CPU cores); "eigh": the same trace from two symmetric eigensolves (faster).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise UserError(f"FID: mismatched statistics shapes mu {mu1.shape}/{mu2.shape}, "
                        f"sigma {sigma1.shape}/{sigma2.shape}")
    if method == "sqrtm":
        tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
    elif method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
    else:
        raise UserError(f"FID: unknown method {method!r} for statistics (sqrtm or eigh)")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def fid_from_stats(samples: FeatureStats, real: FeatureStats, method: str = "sqrtm") -> FIDResult:
    value = frechet_distance(samples.mu, samples.sigma, real.mu, real.sigma, method=method)
    return FIDResult(value=value, n_samples=samples.n, n_real=real.n)


def fid_from_features(sample_features: np.ndarray, real_features: np.ndarray,
                      method: str = "auto", real_stats: Optional[FeatureStats] = None) -> FIDResult:
    """FID of two feature sets (N, D); float64 throughout.

    method "auto": the exact sample-space form ("svd") when min(n1, n2) <= D, else "sqrtm";
    "svd" | "sqrtm" | "eigh" force one. All give the same number up to round-off (tested).
    `real_stats`, when given, must be the statistics of `real_features` (saves recomputing).
    """
    x1 = _check_features(sample_features, "sample features").astype(np.float64)
    x2 = _check_features(real_features, "real features").astype(np.float64)
    if x1.shape[1] != x2.shape[1]:
        raise UserError(f"FID: feature sizes differ ({x1.shape[1]} vs {x2.shape[1]})")
    if min(len(x1), len(x2)) < 2:
        raise UserError(f"FID needs at least 2 samples in each set, got {len(x1)} and {len(x2)}")
    if method == "auto":
        method = "svd" if min(len(x1), len(x2)) <= x1.shape[1] else "sqrtm"
    if method != "svd":
        s1 = FeatureStats.from_features(x1)
        s2 = real_stats if real_stats is not None else FeatureStats.from_features(x2)
        return fid_from_stats(s1, s2, method=method)
    mu1, mu2 = x1.mean(axis=0), x2.mean(axis=0)
    c1, c2 = x1 - mu1, x2 - mu2
    tr1 = float((c1 * c1).sum() / (len(x1) - 1))
    tr2 = float((c2 * c2).sum() / (len(x2) - 1))
    diff = mu1 - mu2
    value = float(diff @ diff + tr1 + tr2 - 2.0 * _trace_sqrt_product_svd(c1, c2))
    return FIDResult(value=value, n_samples=len(x1), n_real=len(x2))


# ----------------------------------------------------------------------------- KID


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    d = x.shape[1]
    return (x @ y.T / d + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of two equal-size sets with the cubic polynomial kernel."""
    return _mmd2_from_kernels(_poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y))


def _mmd2_from_kernels(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    m = len(kxx)
    return float((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                 - 2.0 * kxy.sum() / (m * m))


# Kernel matrices of the full sets are computed once when they fit (entries, float64).
_KID_GRAM_LIMIT = 25_000_000


def kernel_inception_distance(sample_features: np.ndarray, real_features: np.ndarray,
                              num_subsets: int = 100, max_subset_size: int = 1000,
                              seed: int = 0) -> KIDResult:
    """KID: mean and std over `num_subsets` random subsets of size min(n1, n2, max_subset_size),
    halved when that is the whole smaller set and several subsets are asked for (every subset
    would then hold the same points, so the spread over subsets would read 0 and say nothing).

    Same subsets and estimator as clean-fid's `kernel_distance`; when the full kernel matrices
    fit in memory they are computed once and each subset only sums a block of them.
    """
    x_all = _check_features(sample_features, "sample features").astype(np.float64)
    y_all = _check_features(real_features, "real features").astype(np.float64)
    if x_all.shape[1] != y_all.shape[1]:
        raise UserError(f"KID: feature sizes differ ({x_all.shape[1]} vs {y_all.shape[1]})")
    m = min(len(x_all), len(y_all), max_subset_size)
    if m < 2:
        raise UserError(f"KID needs at least 2 samples in each set, got {len(x_all)} and {len(y_all)}")
    if num_subsets < 1:
        raise UserError(f"KID: num_subsets must be >= 1, got {num_subsets}")
    n1, n2 = len(x_all), len(y_all)
    if num_subsets > 1 and m == min(n1, n2) and m >= 4:
        m //= 2  # subsets smaller than the set, so that they differ
    gram = max(n1, n2) ** 2 <= _KID_GRAM_LIMIT
    if gram:
        kxx_all, kyy_all = _poly_kernel(x_all, x_all), _poly_kernel(y_all, y_all)
        kxy_all = _poly_kernel(x_all, y_all)
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets)
    for s in range(num_subsets):
        ix = rng.choice(n1, m, replace=False)
        iy = rng.choice(n2, m, replace=False)
        if gram:
            values[s] = _mmd2_from_kernels(kxx_all[np.ix_(ix, ix)], kyy_all[np.ix_(iy, iy)],
                                           kxy_all[np.ix_(ix, iy)])
        else:
            values[s] = mmd2_unbiased(x_all[ix], y_all[iy])
    return KIDResult(mean=float(values.mean()), std=float(values.std()), subset_size=m,
                     num_subsets=num_subsets)


# ----------------------------------------------------------------------------- real statistics


def real_statistics(real_images, cache_dir: Optional[Union[str, Path]] = None, *,
                    device: str = "cpu", batch_size: int = 32, progress: bool = False
                    ) -> tuple[FeatureStats, np.ndarray]:
    """(stats, features) of the real *training* split; both cached under `cache_dir`.

    Features are cached per chunk by `extract_features`; the statistics file
    `fid_stats_<hash>.npz` is keyed by the same hash of image bytes + model sha1.
    """
    from dpldm.eval import inception

    imgs = inception.to_uint8_nhwc(real_images, name="real training images")
    feats = inception.extract_features(imgs, device=device, batch_size=batch_size,
                                       cache_dir=cache_dir, progress=progress, desc="real features")
    if cache_dir is None:
        return FeatureStats.from_features(feats), feats
    path = Path(cache_dir) / f"fid_stats_{inception.images_key(imgs)[:40]}.npz"
    if path.is_file():
        try:
            stats = FeatureStats.load(path)
            if stats.n == len(imgs) and stats.mu.shape == (feats.shape[1],):
                return stats, feats
        except Exception:
            pass  # unreadable: recompute and overwrite
    stats = FeatureStats.from_features(feats)
    stats.save(path, model_sha1=inception.MODEL_SHA1)
    return stats, feats


__all__ = ["FIDResult", "FeatureStats", "KIDResult", "fid_from_features", "fid_from_stats",
           "frechet_distance", "kernel_inception_distance", "mmd2_unbiased", "real_statistics"]
