"""The privacy section of a model card, one wording for every card dpldm writes (the native model
folder's README.md, dpldm.models.ldm, and the diffusers export's, dpldm.interop.diffusers_folder)."""
from __future__ import annotations

import math
from typing import Any


def _fmt(v: Any) -> str:
    if v is None:
        return "not recorded"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def is_private(privacy: dict[str, Any] | None) -> bool:
    """A DP record that claims a guarantee: present, not declared not-private, finite epsilon."""
    if not privacy or privacy.get("private") is False:
        return False
    eps = privacy.get("epsilon")
    return isinstance(eps, (int, float)) and math.isfinite(eps)


def privacy_table(privacy: dict[str, Any] | None) -> str:
    if privacy and not is_private(privacy):
        return ("**No differential-privacy guarantee.** This model was fine-tuned by dpldm in a run declared not "
                f"private (train.not_private; epsilon {_fmt(privacy.get('epsilon'))}): nothing is claimed about "
                "the data it was trained on.\n")
    if not privacy:
        return ("**No differential-privacy guarantee.** This model carries no DP fine-tuning record from dpldm "
                "(a public pretrained model, or one trained without privacy): nothing is claimed about the data "
                "it was trained on.\n")
    rows = [("epsilon", privacy.get("epsilon")), ("delta", privacy.get("delta")),
            ("noise multiplier sigma", privacy.get("noise_multiplier")),
            ("Poisson sample rate q", privacy.get("sample_rate")),
            ("private examples N", privacy.get("num_examples")),
            ("expected batch size q*N", privacy.get("expected_batch_size")),
            ("noisy steps", privacy.get("steps")), ("accountant", privacy.get("accountant")),
            ("per-example clip norm C", privacy.get("max_grad_norm")),
            ("sampling", privacy.get("sampling", "poisson")), ("trained modules", privacy.get("finetune"))]
    lines = ["| quantity | value |", "| --- | --- |"] + [f"| {k} | {_fmt(v)} |" for k, v in rows]
    return ("(epsilon, delta)-differential privacy with respect to the private fine-tuning set, from DP-SGD "
            "(per-example clipping, one Gaussian noise draw per step, Poisson sampling) as accounted by "
            "Opacus. The public pretraining data is not protected.\n\n" + "\n".join(lines) + "\n")
