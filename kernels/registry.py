"""One registry of the DP kernels: ops x backends x (dtypes, device types), and ONE `select()`.

    impl, reason = select(op, device, dtype, backend="auto", method="auto", shape=..., selector=None)
    result = impl.fn(*normalised_args)

Ops and the arguments of `Impl.fn` (inputs already validated by kernels/__init__.py):
  linear_sqnorm          fn(A (B,T,d_in), G (B,T,d_out), mask (B,T)|None, bias) -> (B,)
  linear_clipped_sum     fn(A, G, coef (B,), mask, bias) -> (W (d_out,d_in), b (d_out,)|None)
  norm_affine_grads      fn(xhat (B,N,C), G (B,N,C)) -> (gw (B,C), gb (B,C))
  embedding_sqnorm       fn(idx (B,T), G (B,T,d)) -> (B,)
  embedding_clipped_sum  fn(idx, G, coef, num_embeddings) -> (num_embeddings, d)
`linear_sqnorm` has a method per implementation: ghost (T x T Grams), fused (d_out x d_in tiles
in registers), materialize (torch only: the per-example stack).

Where one backend's implementation of an op IS the torch code (an elementwise op or a
scatter-add that needs no kernel), the registry says so in `Impl.note`: it is that backend's
registered implementation, not a fallback.

Policy (the only place it lives):
  * an explicit backend (torch|cpp|triton|cuda) that cannot run on the device/dtype raises
    BackendUnavailableError (BackendDtypeError, also a TypeError, for a dtype) with the reason;
  * backend="auto" with a `selector` (kernels/selection.py): the candidates are timed once per
    public shape key and the fastest is kept;
  * backend="auto" without a selector: the FIXED RULE below (deterministic; tests rely on it):
      CPU   linear_sqnorm: ghost when T*(d_in + d_out) < d_in*d_out (cpu_method), on torch for
            T < 64 (MKL bmm wins small Grams) and cpp for T >= 64 (its upper-triangle Grams win),
            else cpp/fused; linear_clipped_sum and norm_affine_grads: cpp; embeddings: torch
            (from KernelSelector measurements, docs/benchmarks.md "Kernel selection"). Without
            the C++ extension: torch for all (said once).
      CUDA  triton, else the CUDA extension, else torch (said once), for every op that backend
            has; linear_sqnorm's method by choose_method(T, d_in, d_out, backend).
            fp64 tensors (tests only) -> torch.
      other devices: torch.
A fallback (the preferred backend is missing) is stated once, as a RuntimeWarning with its reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch

from .dispatch import BACKENDS, BackendUnavailableError, cpp_ext, cuda_ext, why_unavailable
from .rules import METHODS, choose_method, say_once

OPS = ("linear_sqnorm", "linear_clipped_sum", "norm_affine_grads", "embedding_sqnorm", "embedding_clipped_sum")

_HALF = (torch.float16, torch.bfloat16)
_ALL = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class BackendDtypeError(BackendUnavailableError, TypeError):
    """The requested backend exists here but does not take tensors of this dtype."""


class LinearShape(NamedTuple):
    """Public shape of one Linear-layer op: rows per example T, widths, bias flag."""

    T: int
    d_in: int
    d_out: int
    bias: bool = False


class NormShape(NamedTuple):
    """Public shape of one LayerNorm/GroupNorm affine op: positions N per example, channels C."""

    N: int
    C: int


@dataclass(frozen=True)
class Impl:
    """One implementation of one op on one backend."""

    op: str
    backend: str
    fn: Callable[..., Any] = field(compare=False, repr=False)
    method: str | None = None  # linear_sqnorm only
    dtypes: tuple[torch.dtype, ...] = _ALL
    devices: tuple[str, ...] = ("cpu", "cuda")
    note: str = ""  # e.g. "the torch code is this backend's implementation"

    @property
    def name(self) -> str:
        return f"{self.backend}/{self.method}" if self.method else self.backend

    def why_not(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """None when this implementation runs on tensors of (device, dtype), else the reason."""
        why = why_unavailable(self.backend, device)
        if why is not None:
            return why
        if device.type not in self.devices:
            return f"{self.op} on backend {self.backend!r} runs on {'/'.join(self.devices)} tensors, got {device.type}"
        if dtype not in self.dtypes:
            return f"backend {self.backend!r} takes {dtype_names(self.dtypes)} tensors for {self.op}, got {dtype}"
        return None


def dtype_names(dtypes) -> str:
    """(fp16, bf16, fp32) -> "fp16, bf16 or fp32"."""
    short = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
    names = [short.get(d, str(d)) for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


# ---- implementations (lazy imports: Triton modules load on first use) ------------------------------
def _lin_torch(method):
    def fn(A, G, mask, bias):
        from .linear import per_example_sqnorm_linear_torch
        return per_example_sqnorm_linear_torch(A, G, bias=bias, mask=mask, method=method)
    return fn


def _lin_ext(get_ext, method):
    def fn(A, G, mask, bias):
        from .linear import per_example_sqnorm_linear_ext
        return per_example_sqnorm_linear_ext(get_ext(), A, G, bias=bias, mask=mask, method=method)
    return fn


def _lin_triton(method):
    def fn(A, G, mask, bias):
        from . import linear_triton as lt
        return (lt.sqnorm_ghost if method == "ghost" else lt.sqnorm_fused)(A, G, mask, bias)
    return fn


def _csum_torch(A, G, coef, mask, bias):
    from .linear import clipped_sum_linear_torch
    return clipped_sum_linear_torch(A, G, coef, bias=bias, mask=mask)


def _csum_ext(get_ext):
    def fn(A, G, coef, mask, bias):
        from .linear import clipped_sum_linear_ext
        return clipped_sum_linear_ext(get_ext(), A, G, coef, bias=bias, mask=mask)
    return fn


def _csum_triton(A, G, coef, mask, bias):
    from . import linear_triton as lt
    return lt.clipped_sum(A, G, coef, mask, bias)


def _naff_torch(xhat, G):
    from .norms import norm_affine_grads_torch
    return norm_affine_grads_torch(xhat, G)


def _naff_cpp(xhat, G):
    return tuple(cpp_ext().norm_affine_grads(xhat, G))


def _naff_triton(xhat, G):
    from . import norms_triton
    return norms_triton.norm_affine_grads(xhat, G)


def _emb_torch(idx, G):
    from .embedding import embedding_sqnorm_torch
    return embedding_sqnorm_torch(idx, G)


def _emb_triton(idx, G):
    from . import embedding_triton
    return embedding_triton.embedding_sqnorm(idx, G)


def _embsum_torch(idx, G, coef, num_embeddings):
    from .embedding import embedding_clipped_sum_torch
    return embedding_clipped_sum_torch(idx, G, coef, num_embeddings)


_TORCH_SERVES = "the torch code is this backend's implementation"


def _build() -> tuple[Impl, ...]:
    cpu, cuda, both = ("cpu",), ("cuda",), ("cpu", "cuda")
    tri_dev = ("cuda", "cpu")  # CPU only under TRITON_INTERPRET=1 (why_unavailable says so)
    out: list[Impl] = []
    for m in ("ghost", "materialize", "fused"):
        out.append(Impl("linear_sqnorm", "torch", _lin_torch(m), m, _ALL, both))
    for m in ("ghost", "fused"):
        out.append(Impl("linear_sqnorm", "cpp", _lin_ext(cpp_ext, m), m, _ALL, cpu))
        out.append(Impl("linear_sqnorm", "triton", _lin_triton(m), m, _GPU_DTYPES, tri_dev))
        out.append(Impl("linear_sqnorm", "cuda", _lin_ext(cuda_ext, m), m, _GPU_DTYPES, cuda))
    out += [
        Impl("linear_clipped_sum", "torch", _csum_torch, None, _ALL, both),
        Impl("linear_clipped_sum", "cpp", _csum_ext(cpp_ext), None, _ALL, cpu),
        Impl("linear_clipped_sum", "triton", _csum_triton, None, _GPU_DTYPES, tri_dev),
        Impl("linear_clipped_sum", "cuda", _csum_ext(cuda_ext), None, _GPU_DTYPES, cuda),
        Impl("norm_affine_grads", "torch", _naff_torch, None, _ALL, both),
        Impl("norm_affine_grads", "cpp", _naff_cpp, None, _ALL, cpu),
        Impl("norm_affine_grads", "triton", _naff_triton, None, _GPU_DTYPES, tri_dev),
        Impl("norm_affine_grads", "cuda", _naff_torch, None, _GPU_DTYPES, cuda,
             note=f"{_TORCH_SERVES} (B*C elementwise work, no separate .cu op)"),
        Impl("embedding_sqnorm", "torch", _emb_torch, None, _ALL, both),
        Impl("embedding_sqnorm", "cpp", _emb_torch, None, _ALL, cpu,
             note=f"{_TORCH_SERVES} (the (B,T,T) Gram of a class embedder is tiny)"),
        Impl("embedding_sqnorm", "triton", _emb_triton, None, _GPU_DTYPES, tri_dev),
        Impl("embedding_sqnorm", "cuda", _emb_torch, None, _GPU_DTYPES, cuda,
             note=f"{_TORCH_SERVES} (the (B,T,T) Gram of a class embedder is tiny)"),
    ]
    for b, dts, devs in (("torch", _ALL, both), ("cpp", _ALL, cpu), ("triton", _GPU_DTYPES, tri_dev),
                         ("cuda", _GPU_DTYPES, cuda)):
        out.append(Impl("embedding_clipped_sum", b, _embsum_torch, None, dts, devs,
                        note="" if b == "torch" else f"{_TORCH_SERVES} (a scatter-add)"))
    return tuple(out)


REGISTRY: tuple[Impl, ...] = _build()


def impls(op: str, backend: str | None = None) -> list[Impl]:
    """Registered implementations of `op` (on `backend` if given), in registry order."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    return [i for i in REGISTRY if i.op == op and (backend is None or i.backend == backend)]


def table() -> list[dict[str, str]]:
    """The registry as rows (op, implementation, dtypes, devices, note) for docs and reports."""
    return [{"op": i.op, "impl": i.name, "dtypes": dtype_names(i.dtypes),
             "devices": ",".join(i.devices), "note": i.note} for i in REGISTRY]


# ---- the fixed rule --------------------------------------------------------------------------------
def cpu_method(T: int, d_in: int, d_out: int) -> str:
    """The fixed rule's norm method on CPU: ghost when its full T x T Grams cost fewer
    multiply-adds than the per-example product, T*(d_in + d_out) < d_in*d_out, else fused.
    Chosen from KernelSelector measurements of every layer shape of the demo UNet at P = 64 and
    256 (docs/benchmarks.md, "Kernel selection"): it picks the measured winner's method for all 7
    shapes, where the torch memory rule (2T^2 < d_in*d_out) sends T=64, 40->320 to ghost (2x slower)."""
    return "ghost" if T * (d_in + d_out) < d_in * d_out else "fused"


def _method_impl(op_impls: list[Impl], backend: str, method: str) -> Impl:
    if backend != "torch" and method == "materialize":
        method = "fused"  # same numbers; the accelerated backends never write the per-example stack
    for i in op_impls:
        if i.method == method:
            return i
    raise ValueError(f"no {method!r} method on backend {backend!r}")  # pragma: no cover - registry is complete


def require_available(backend: str, dev: torch.device) -> None:
    """Raise BackendUnavailableError (with the reason) when an explicit `backend` cannot run on `dev`."""
    why = why_unavailable(backend, dev)
    if why is not None:
        raise BackendUnavailableError(f"kernel backend {backend!r} is unavailable: {why}")


def resolve_backend(backend: str, device=None) -> str:
    """The backend family the fixed rule prefers on `device` (explicit ones are checked and
    returned). On CPU "auto" names cpp, but the fixed rule still sends ghost norms and every
    other op to torch (see the module docstring); `select()` is the full answer."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    dev = _device(device)
    if backend != "auto":
        require_available(backend, dev)
        return backend
    if dev.type == "cuda":
        for b in ("triton", "cuda"):
            if why_unavailable(b, dev) is None:
                return b
        say_once("cuda", "dpldm.kernels: neither Triton nor the CUDA extension is available for CUDA tensors "
                         f"({why_unavailable('triton', dev)}; {why_unavailable('cuda', dev)}); using the torch backend")
        return "torch"
    if dev.type == "cpu":
        why = why_unavailable("cpp", dev)
        if why is None:
            return "cpp"
        say_once("cpu", f"dpldm.kernels: {why}; using the torch backend")
    return "torch"


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cpu")
    return device if isinstance(device, torch.device) else torch.device(device)


def _fixed(op: str, dev: torch.device, dtype: torch.dtype, method: str, shape) -> tuple[Impl, str]:
    """The deterministic rule for backend="auto" without a selector (module docstring)."""
    if dev.type == "cuda" and dtype == torch.float64:
        return _with_method(op, "torch", method, shape), "fixed rule: fp64 runs on the torch backend (tests)"
    if dev.type == "cpu":
        if op in ("embedding_sqnorm", "embedding_clipped_sum"):
            return _with_method(op, "torch", method, shape), "fixed rule (cpu): torch"
        if op == "linear_sqnorm":
            if method == "auto":
                if shape is None:
                    raise ValueError("select('linear_sqnorm', method='auto') needs shape=LinearShape(T, d_in, d_out, bias)")
                method = cpu_method(shape.T, shape.d_in, shape.d_out)
            if method == "ghost" and (shape is None or shape.T < 64):
                return _with_method(op, "torch", "ghost", shape), "fixed rule (cpu): torch/ghost for T < 64"
        b = resolve_backend("auto", dev)  # cpp, or torch with the reason said once
        return _with_method(op, b, method, shape), f"fixed rule (cpu): {b}"
    if dev.type != "cuda":
        return _with_method(op, "torch", method, shape), f"fixed rule: torch on {dev.type}"
    b = resolve_backend("auto", dev)
    return _with_method(op, b, method, shape), f"fixed rule (cuda): {b}"


def _with_method(op: str, backend: str, method: str, shape) -> Impl:
    op_impls = impls(op, backend)
    if op != "linear_sqnorm":
        return op_impls[0]
    if method == "auto":
        if shape is None:
            raise ValueError("select('linear_sqnorm', method='auto') needs shape=LinearShape(T, d_in, d_out, bias)")
        method = choose_method(shape.T, shape.d_in, shape.d_out, backend)
    return _method_impl(op_impls, backend, method)


def select(op: str, device, dtype: torch.dtype, *, backend: str = "auto", method: str = "auto",
           shape: LinearShape | NormShape | None = None, selector=None) -> tuple[Impl, str]:
    """(implementation, reason) for `op` on tensors of (device, dtype).

    backend: auto|torch|triton|cpp|cuda; method (linear_sqnorm): auto|ghost|fused|materialize;
    shape: the op's public shape (LinearShape / NormShape; needed by method="auto" and by a
    selector); selector: a kernels.selection.KernelSelector that times the candidates."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    dev = _device(device)
    if backend != "auto":
        require_available(backend, dev)
        op_impls = impls(op, backend)
        why = op_impls[0].why_not(dev, dtype)
        if why is not None:
            raise BackendDtypeError(why)
        if op != "linear_sqnorm" or method != "auto":
            impl = _with_method(op, backend, method, shape)
            return impl, "requested" + (f" ({impl.note})" if impl.note else "")
        if selector is not None:
            return selector.choose(op, dev, dtype, shape, op_impls, restrict=f"backend={backend}")
        return _with_method(op, backend, method, shape), f"fixed rule: method of {backend} for {shape}"
    if selector is not None:
        # the Triton interpreter (CPU) is a test tool, never an "auto" candidate
        cands = [i for i in impls(op) if not i.note and i.why_not(dev, dtype) is None
                 and not (i.backend == "triton" and dev.type != "cuda")]
        if op == "linear_sqnorm" and method != "auto":
            cands = [i for i in cands if i.method == method or (method == "materialize" and i.method == "fused"
                                                                 and i.backend != "torch")]
        if len(cands) == 1:
            return cands[0], "the only candidate"
        return selector.choose(op, dev, dtype, shape, cands, restrict=f"method={method}" if method != "auto" else "")
    return _fixed(op, dev, dtype, method, shape)


def bytes_estimate(impl: Impl, P: int, shape) -> int:
    """Largest intermediate of `impl` on P examples of `shape` (bytes, fp32), for the selector's
    memory guard: the torch materialise path holds P*d_out*d_in, the torch ghost path two
    P*256*T Gram slabs, the torch clipped sum a scaled copy of G."""
    if impl.backend != "torch" or not isinstance(shape, LinearShape):
        return 0
    if impl.op == "linear_sqnorm" and impl.method == "materialize":
        return 4 * P * shape.d_out * shape.d_in
    if impl.op == "linear_sqnorm" and impl.method == "ghost":
        return 8 * P * min(shape.T, 256) * shape.T
    if impl.op == "linear_clipped_sum":
        return 4 * P * shape.T * shape.d_out
    return 0


def flops(op: str, P: int, shape) -> float:
    """Multiply-adds x2 of the op (materialised form) for reports."""
    if isinstance(shape, LinearShape):
        return 2.0 * P * shape.T * shape.d_in * shape.d_out
    if isinstance(shape, NormShape):
        return 3.0 * P * shape.N * shape.C
    return math.nan
