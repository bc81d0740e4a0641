"""The grammar of a `train.finetune` spec, without a model (dpldm.config checks specs at parse
time with it; dpldm.models.selection applies them to a UNet).

    "all" | "attention:all" | "attention:A-B[,C,...]"   (1-based module numbers, forward order)
"""
from __future__ import annotations

from dpldm.errors import InputError

SPEC_FORMS = "all | attention:all | attention:A-B[,C,...] (1-based module numbers)"


class SelectionError(InputError, ValueError):
    """A `train.finetune` spec that is malformed or names modules the UNet does not have."""


def _ranges(spec: str) -> list[tuple[int, int]]:
    """(lo, hi) pairs of the part after "attention:" (not "all"); SelectionError when malformed."""
    where = f"finetune spec 'attention:{spec}'"
    if not spec.strip():
        raise SelectionError(f"{where}: no module numbers after 'attention:' (expected {SPEC_FORMS})")
    out = []
    for part in spec.split(","):
        part = part.strip()
        bounds = part.split("-", 1) if "-" in part[1:] else [part]
        if not all(b.strip().isdigit() for b in bounds):  # no signs, no decimals, no empty parts
            raise SelectionError(f"{where}: {part!r} is not a module number or a range A-B (expected {SPEC_FORMS})")
        lo, hi = int(bounds[0]), int(bounds[-1])
        if lo > hi:
            raise SelectionError(f"{where}: empty range {lo}-{hi} (the first number must not exceed the second)")
        if lo < 1:
            raise SelectionError(f"{where}: module numbers start at 1, got {lo}")
        out.append((lo, hi))
    return out


def check_finetune_spec(spec: str) -> None:
    """Syntax of a `train.finetune` spec, without a model (the module count is checked later)."""
    if spec == "all":
        return
    if not spec.startswith("attention:"):
        raise SelectionError(f"expected {SPEC_FORMS}, got {spec!r}")
    if spec != "attention:all":
        _ranges(spec[len("attention:"):])


def parse_attention_range(spec: str, n_modules: int) -> list[int]:
    """1-based module numbers named by the part after "attention:"; SelectionError outside 1..N."""
    if spec == "all":
        return list(range(1, n_modules + 1))
    chosen: set[int] = set()
    for lo, hi in _ranges(spec):
        if hi > n_modules:
            raise SelectionError(f"finetune spec 'attention:{spec}': range {lo}-{hi} lies outside 1..{n_modules} "
                                 f"(this UNet has {n_modules} attention modules)")
        chosen.update(range(lo, hi + 1))
    return sorted(chosen)
