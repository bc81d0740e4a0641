"""Evaluation: FID/KID with the TF-Inception-v3 port, downstream accuracy (DPDM protocol).

    from dpldm.eval import evaluate_synthetic
    report = evaluate_synthetic(samples, labels, real_train, (test_images, test_labels),
                                n_fid=500, cache_dir=".cache/dpldm-eval")

Submodules: `inception` (model file, preprocessing, cached features), `fid` (FID, KID, real
statistics), `classifier` (train_and_select / evaluate_once), `evaluate`, `cli`.
"""
from __future__ import annotations


def __getattr__(name):  # lazy: `import dpldm.eval` does not load torch or scipy
    if name in ("evaluate_synthetic", "subset_indices"):
        from dpldm.eval import evaluate

        return getattr(evaluate, name)
    raise AttributeError(f"module 'dpldm.eval' has no attribute {name!r}")


__all__ = ["evaluate_synthetic", "subset_indices"]
