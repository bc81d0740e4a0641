"""The fixed rule of the linear norm method and the once-per-process fallback notice: shared by the
torch reference (kernels/linear.py) and the registry (kernels/registry.py), which imports the
reference lazily; kept here so that neither imports the other at the top of this dependency.
"""
from __future__ import annotations

import warnings

METHODS = ("auto", "ghost", "fused", "materialize")


def choose_method(T: int, d_in: int, d_out: int, backend: str = "torch") -> str:
    """Norm method of the fixed rule for a Linear layer.

    torch (the reference): ghost when its B*T^2 Gram memory is below materialising B*d_in*d_out
    (design rule 2*T^2 < d_in*d_out), else "materialize". The other backends never materialise,
    so they compare multiply-adds per example instead: their ghost kernels build only the upper
    triangle of the two symmetric T x T Grams, T^2*(d_in+d_out)/2, the fused kernels T*d_in*d_out;
    ghost when T*(d_in+d_out) < 2*d_in*d_out, else "fused" (this matches the CPU timings in
    docs/benchmarks.md)."""
    if backend in ("torch", "auto"):
        return "ghost" if 2 * T * T < d_in * d_out else "materialize"
    return "ghost" if T * (d_in + d_out) < 2 * d_in * d_out else "fused"


_warned: set[str] = set()


def say_once(key: str, msg: str) -> None:
    """State a fallback once per process (RuntimeWarning)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)
