"""`evaluate_synthetic`: FID, KID and downstream accuracy of a set of synthetic samples.

The demo and `dpldm evaluate` both call this. FID/KID use n_fid synthetic samples and n_real
real *training* images (a fixed seeded random subset of each, so a cached run reuses features);
the downstream accuracy trains on all synthetic samples (selection on a synthetic validation
split) and reports once on the real test split.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from dpldm.errors import UserError



def subset_indices(n_total: int, n: Optional[int], seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded random subset of size n (all, in order, when n is None or >= total).

    Sorted, so the subset keeps the input order and "all" is the input itself: features cached
    for an array are reused whenever the same array (or subset) is evaluated again.
    """
    if n is None or n >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).permutation(n_total)[:n])


def _split_pair(value, name: str):
    if value is None:
        return None, None
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise UserError(f"{name}: expected images or (images, labels), got a {len(value)}-tuple")
        return value[0], value[1]
    return value, None


def evaluate_synthetic(samples, labels=None, real_train=None, real_test=None,
                       n_fid: Optional[int] = 1000, cache_dir: Optional[Union[str, Path]] = None, *,
                       n_real: Optional[int] = None, device: str = "auto",
                       batch_size: Optional[int] = None, compute_fid: bool = True,
                       kid_subsets: int = 100, kid_subset_size: int = 1000,
                       classifier_config=None, num_classes: Optional[int] = None,
                       seed: int = 0, progress: bool = False,
                       log: Optional[Callable[[str], None]] = print) -> dict:
    """Evaluate synthetic samples; returns a flat dict (JSON-ready).

    samples:    uint8 (N, H, W[, C]) or a float tensor (N, C, H, W) in [-1, 1]
    labels:     (N,) ints, needed for the downstream accuracy
    real_train: real *training* images (or (images, labels); labels unused): FID/KID reference
    real_test:  (images, labels) of the real test split: only used for the final accuracy
    n_fid:      synthetic samples used for FID/KID (None = all); n_real real ones (default n_fid)
    cache_dir:  where Inception features and real statistics are cached (None = no cache)
    Keys: fid, fid_n_samples, fid_n_real, kid, kid_std, kid_subset_size, kid_num_subsets,
    accuracy, n_test_real, n_train_synthetic, n_val_synthetic, selected_epoch, ... and timings.
    """
    from dpldm.eval import fid as fidlib
    from dpldm.eval import inception

    say = log or (lambda _msg: None)
    out: dict = {}
    t_start = time.perf_counter()
    real_train_images, _ = _split_pair(real_train, "real_train")
    real_test_images, real_test_labels = _split_pair(real_test, "real_test")
    if real_test_images is not None and real_test_labels is None:
        raise UserError("real_test: labels are needed for the downstream accuracy; pass (images, labels)")

    if real_test_images is not None:  # check labels before the slow part
        if labels is None:
            raise UserError("downstream accuracy needs labels for the synthetic samples")
        from dpldm.eval.classifier import to_labels

        y = to_labels(labels, len(samples), num_classes, "synthetic labels")
        k = num_classes if num_classes is not None else int(y.max()) + 1
        try:
            to_labels(real_test_labels, len(real_test_images), k, "real test labels")
        except UserError as e:
            hint = "" if num_classes is not None else " (pass num_classes if the synthetic set lacks classes)"
            raise UserError(f"{e}{hint}") from None

    if compute_fid:
        if real_train_images is None:
            raise UserError("FID needs real training images (real_train); or turn FID off")
        for name, n in (("n_fid", n_fid), ("n_real", n_real)):
            if n is not None and n < 2:
                raise UserError(f"{name} must be >= 2 (or None for all), got {n}")
        dev = inception.resolve_device(device)
        bs = batch_size or (200 if dev.startswith("cuda") else 32)
        fake = inception.to_uint8_nhwc(samples, name="synthetic samples")
        real = inception.to_uint8_nhwc(real_train_images, name="real training images")
        n_real_eff = n_real if n_real is not None else n_fid
        fake = fake[subset_indices(len(fake), n_fid, seed)]
        real = real[subset_indices(len(real), n_real_eff, seed + 1)]
        say(f"FID/KID: {len(fake)} synthetic vs {len(real)} real training images "
            f"(TF-Inception-v3, 2048-d pool features, device {dev}, batch {bs}"
            f"{', cache ' + str(cache_dir) if cache_dir else ''})")
        t0 = time.perf_counter()
        real_stats, real_feats = fidlib.real_statistics(real, cache_dir, device=dev, batch_size=bs,
                                                        progress=progress)
        t1 = time.perf_counter()
        fake_feats = inception.extract_features(fake, device=dev, batch_size=bs, cache_dir=cache_dir,
                                                progress=progress, desc="sample features",
                                                name="synthetic samples")
        t2 = time.perf_counter()
        fid = fidlib.fid_from_features(fake_feats, real_feats, real_stats=real_stats)
        kid = fidlib.kernel_inception_distance(fake_feats, real_feats, num_subsets=kid_subsets,
                                               max_subset_size=kid_subset_size, seed=seed)
        t3 = time.perf_counter()
        out.update(fid.as_dict())
        out.update(kid.as_dict())
        out.update({"fid_device": dev, "inception_model_sha1": inception.MODEL_SHA1,
                    "seconds_real_features": t1 - t0, "seconds_sample_features": t2 - t1,
                    "seconds_fid_kid": t3 - t2})
        say(f"  {fid}")
        say(f"  {kid}")

    if real_test_images is not None:
        from dpldm.eval.classifier import downstream_accuracy

        say("downstream: CNN trained on synthetic samples, selected on a synthetic validation "
            "split, evaluated once on the real test split")
        res = downstream_accuracy(samples, labels, real_test_images, real_test_labels,
                                  num_classes=num_classes, config=classifier_config)
        out.update(res)
        say(f"  accuracy {100 * res['accuracy']:.2f}% on {res['n_test_real']} real test images "
            f"(trained on {res['n_train_synthetic']} synthetic, selected epoch "
            f"{res['selected_epoch']}/{res['epochs_run']} on {res['n_val_synthetic']} synthetic "
            f"validation images, val acc {100 * res['synthetic_val_accuracy']:.2f}%)")
        say("  per class (real test, recall): " + ", ".join(
            f"{c}: {'—' if a is None else f'{100 * a:.1f}%'}" for c, a in enumerate(res["per_class_accuracy"])))
    out["seconds_total"] = time.perf_counter() - t_start
    return out


__all__ = ["evaluate_synthetic", "subset_indices"]
