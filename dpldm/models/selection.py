"""Choose the part of the UNet that (DP) fine-tuning trains: `train.finetune` spec.

    "all"            every UNet parameter
    "attention:all"  every SpatialTransformer + the class embedder
    "attention:9-16" SpatialTransformers 9..16 (1-based, forward order, as in the DP-LDM paper)
                     + the class embedder; ranges and single numbers can be comma-joined
                     ("attention:1-3,7").

With a one-token class context the cross-attention softmax runs over a single key, so its
weights are exactly 1 whatever q and k are: `attn2.to_q` and `attn2.to_k` get exactly zero
gradient. Attention selections therefore leave them frozen (training them would only spend
compute and DP noise); "all" trains them anyway.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from dpldm.models.finetune_spec import (SPEC_FORMS, SelectionError, check_finetune_spec,
                                        parse_attention_range)

if TYPE_CHECKING:  # no torch import for checking a spec (dpldm.config does that at parse time)
    from torch import nn

    from dpldm.models.unet import UNet

__all__ = ["SPEC_FORMS", "SelectionError", "ZERO_GRAD_SUFFIXES", "apply_finetune", "check_finetune_spec",
           "count_parameters", "finetune_summary", "parse_attention_range"]

ZERO_GRAD_SUFFIXES = ("attn2.to_q.weight", "attn2.to_k.weight")


def apply_finetune(unet: UNet, spec: str) -> list[str]:
    """Set requires_grad for `spec` and return the names of the trainable parameters (model order)."""
    if spec == "all":
        for p in unet.parameters():
            p.requires_grad_(True)
        return [name for name, _ in unet.named_parameters()]
    if not spec.startswith("attention:"):
        raise SelectionError(f"finetune spec {spec!r}: expected {SPEC_FORMS}")
    modules = unet.attention_modules()
    numbers = parse_attention_range(spec[len("attention:"):], len(modules))
    unet.requires_grad_(False)
    for k in numbers:
        modules[k - 1].requires_grad_(True)
    unet.label_embedder.requires_grad_(True)
    for name, p in unet.named_parameters():
        if name.endswith(ZERO_GRAD_SUFFIXES):
            p.requires_grad_(False)
    return [name for name, p in unet.named_parameters() if p.requires_grad]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts (full sizes, also for ZeRO-3-partitioned parameters)."""
    def numel(p: nn.Parameter) -> int:
        return int(getattr(p, "ds_numel", p.numel()))

    total = sum(numel(p) for p in model.parameters())
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    return total, trainable


def finetune_summary(unet: UNet, spec: str) -> str:
    """One paragraph describing what `spec` trains (call after apply_finetune)."""
    total, trainable = count_parameters(unet)
    n = len(unet.attention_modules())
    lines = [f"finetune {spec!r}: {trainable:,} of {total:,} UNet parameters trainable "
             f"({100.0 * trainable / max(total, 1):.2f}%); the UNet has {n} attention modules (1..{n})"]
    if spec != "all":
        lines.append("  cross-attention to_q/to_k stay frozen: with a one-token class context their gradient is exactly 0")
    return "\n".join(lines)
