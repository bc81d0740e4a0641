"""Per-layer rules of the book-keeping clipping engine (written by hand for dpldm).

While the engine captures a forward pass, every trainable nn.Linear / nn.Conv2d /
nn.LayerNorm / nn.GroupNorm / nn.Embedding runs through a small autograd Function (`recording_fns`) instead of
its usual forward. The Function computes the same output, and in the backward pass:
  * returns the gradient of the layer *input* only (so autograd never forms the batch-summed
    weight gradient: no wasted GEMM, and `param.grad` stays untouched);
  * records, per call, the layer input A (already kept alive for the backward anyway) and the
    gradient G of the layer output.
After the single backward, each rule turns its (A, G) records into per-example squared
gradient norms and, given clipping factors c_i, into clipped sums sum_i c_i * grad_i, all
through `dpldm.kernels`. No per-example gradient of a Linear is stored by the ghost path.

Rows vs examples: a layer may see R = B*K rows when the loss repeats each example K times
contiguously (`repeat_interleave`). `regroup` views those rows as one sequence per example,
(B*K, T, d) -> (B, K*T, d), so the norm is the exact norm of the example's whole gradient
(cross terms between its K copies included). A layer called several times in one forward
(weight sharing) keeps one record per call; the calls are concatenated as extra sequence rows
of the same example, which again gives the exact per-example gradient.

Conv2d (groups=1, zero padding) is a Linear on the unfolded input: A = unfold(x) as
(R, L, C_in*kh*kw) with L output positions, G = grad_output as (R, L, C_out); the Linear kernels
then give the per-example norms (ghost or materialised) and the clipped weight sum, reshaped to
(C_out, C_in, kh, kw); the bias gradient is the sum of G over positions. The unfolded A is
kh*kw times the layer input, so it is built per layer when needed and dropped right after
(once for the norm, once for the sum), never held for all layers at once.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dpldm import kernels
from dpldm.errors import InputError
from dpldm.privacy.recording_fns import (_Call, _Conv2dFn, _conv_pads, _EmbeddingFn, _GroupNormFn, _LayerNormFn,
                                         _LinearFn)


class UnsupportedLayerError(InputError, TypeError):
    """A model the DP engine refuses: a trainable parameter in a layer without a per-example
    clipping rule, or a module whose forward changes state or draws from a global RNG (one line,
    exit 2 via the CLI)."""


class RowMismatchError(ValueError):
    """A layer saw a number of rows that is not a multiple of the number of examples B."""


def regroup(t: torch.Tensor, B: int, where: str, keep_last: bool = True) -> torch.Tensor:
    """(R, *mid, d) -> (B, (R // B) * prod(mid), d) (or (R, *mid) -> (B, -1) if not keep_last).

    The K = R // B rows of one example must be contiguous (repeat_interleave order)."""
    R = t.shape[0]
    if B == 0 or R % B != 0:
        raise RowMismatchError(
            f"{where}: saw {R} rows for a batch of {B} examples; the rows must be the B examples, "
            f"each repeated K times contiguously (repeat_interleave), batch dimension first")
    if keep_last:
        return t.reshape(B, -1, t.shape[-1])
    return t.reshape(B, -1)


def _same_dtype(a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both in their promoted dtype (never rounds either): under bf16 autocast a layer whose input
    is fp32 gets bf16 output grads, so A stays fp32 and G is upcast exactly. The norm and the
    clipped sum then read the very same tensors."""
    dt = torch.promote_types(a.dtype, g.dtype)
    return a.to(dt), g.to(dt)


def _bias_sqnorm(G: torch.Tensor) -> torch.Tensor:  # G (B, T, d_out) -> (B,), fp32 for fp16/bf16
    acc = torch.float64 if G.dtype == torch.float64 else torch.float32
    return G.sum(dim=1, dtype=acc).pow(2).sum(dim=1)


def _bias_sum(G: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:  # sum_i coef_i sum_t G_it -> (d_out,)
    acc = torch.float64 if G.dtype == torch.float64 else torch.float32
    return coef.to(acc) @ G.sum(dim=1, dtype=acc)


def _cat_rows(ts: list[torch.Tensor]) -> torch.Tensor:
    return ts[0] if len(ts) == 1 else torch.cat(ts, dim=1)


def _mask_rows(t: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Zero the rows of dropped examples with `where` (0 * NaN would still be NaN)."""
    if keep is None:
        return t
    shape = (t.shape[0],) + (1,) * (t.dim() - 1)
    return torch.where(keep.view(shape), t, torch.zeros((), dtype=t.dtype, device=t.device))


# --- rules ----------------------------------------------------------------------------------------

class LayerRule:
    """Base: one trainable module, its trainable params by attribute name, its call records."""

    module_type: type[nn.Module] = nn.Module

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name, self.module = name, module
        self.trainable = {attr: p for attr, p in module.named_parameters(recurse=False) if p.requires_grad}
        self.calls: list[_Call] = []
        self._prep = None  # per-step cache filled by sqnorm(), used by clipped_sums()
        self.used: dict[str, str] = {}  # op -> implementation used in the last chunk (e.g. "cpp/fused")

    @classmethod
    def check(cls, name: str, module: nn.Module) -> None:
        """Raise UnsupportedLayerError for configurations the rule cannot handle."""

    def reset(self) -> None:
        self.calls, self._prep = [], None

    def make_forward(self, original: Callable) -> Callable:
        def forward(*args, **kwargs):
            if not torch.is_grad_enabled() or not self.trainable:
                return original(*args, **kwargs)
            call = _Call()
            self.calls.append(call)
            return self._apply(call, *args, **kwargs)

        return forward

    def _apply(self, call: _Call, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    def done_calls(self) -> list[_Call]:
        return [c for c in self.calls if c.g is not None]

    def sqnorm(self, B: int, *, method: str, backend: str, selector=None) -> torch.Tensor | None:
        """(B,) per-example squared norm of this layer's trainable gradient (None: no calls).
        The kernel comes from dpldm.kernels.select(backend, method, selector)."""
        raise NotImplementedError

    def clipped_sums(self, coef: torch.Tensor, keep: torch.Tensor | None, *, backend: str,
                     selector=None) -> dict[str, torch.Tensor]:
        """{attr: sum_i coef_i * grad_i(attr)}; `keep` (B,) bool zeroes dropped examples."""
        raise NotImplementedError

    def _select(self, op: str, t: torch.Tensor, shape, backend: str, selector, method: str = "auto"):
        impl, _ = kernels.select(op, t.device, t.dtype, backend=backend, method=method, shape=shape,
                                 selector=selector)
        self.used[op] = impl.name
        return impl


class LinearRule(LayerRule):
    module_type = nn.Linear

    def _apply(self, call, input):  # noqa: A002 - nn.Linear.forward's own argument name
        m = self.module
        return _LinearFn.apply(input, m.weight, m.bias, call)

    def _gather(self, B: int):
        calls = self.done_calls()
        if not calls:
            return None
        A = _cat_rows([regroup(c.a, B, f"layer '{self.name}' (Linear) input") for c in calls])  # (B, T', d_in)
        G = _cat_rows([regroup(c.g, B, f"layer '{self.name}' (Linear) output grad") for c in calls])  # (B, T', d_out)
        return _same_dtype(A, G)

    def sqnorm(self, B, *, method, backend, selector=None):
        self._prep = self._gather(B)
        if self._prep is None:
            return None
        A, G = self._prep
        has_b = "bias" in self.trainable
        if "weight" in self.trainable:
            shape = kernels.LinearShape(A.shape[1], A.shape[2], G.shape[2], has_b)
            impl = self._select("linear_sqnorm", A, shape, backend, selector, method)
            return kernels.per_example_sqnorm_linear(A, G, bias=has_b, impl=impl)
        return _bias_sqnorm(G)

    def clipped_sums(self, coef, keep, *, backend, selector=None):
        if self._prep is None:
            return {}
        A, G = self._prep
        A, G = _mask_rows(A, keep), _mask_rows(G, keep)
        has_b = "bias" in self.trainable
        if "weight" in self.trainable:
            shape = kernels.LinearShape(A.shape[1], A.shape[2], G.shape[2], has_b)
            impl = self._select("linear_clipped_sum", A, shape, backend, selector)
            w, b = kernels.clipped_sum_linear(A, G, coef, bias=has_b, impl=impl)
            return {"weight": w, "bias": b} if has_b else {"weight": w}
        return {"bias": _bias_sum(G, coef)}


class Conv2dRule(LayerRule):
    """nn.Conv2d with groups=1 and padding_mode='zeros' (any kernel, stride, padding, dilation;
    bias optional) as a Linear on the unfolded input (see the module docstring)."""

    module_type = nn.Conv2d

    @classmethod
    def check(cls, name, module):
        where = f"conv layer '{name or '<root>'}' ({type(module).__name__})"
        if module.groups != 1:
            raise UnsupportedLayerError(
                f"{where}: groups={module.groups} is not supported by the DP engine (only groups=1); "
                "freeze it (requires_grad_(False)) or use a groups=1 convolution")
        if module.padding_mode != "zeros":
            raise UnsupportedLayerError(
                f"{where}: padding_mode={module.padding_mode!r} is not supported by the DP engine "
                "(only 'zeros'); freeze it (requires_grad_(False)) or pad explicitly before the conv")
        if type(module)._conv_forward is not nn.Conv2d._conv_forward:
            raise UnsupportedLayerError(
                f"{where}: overrides _conv_forward, so its output is not a plain convolution; "
                "the DP engine has no per-example rule for it")

    def __init__(self, name, module):
        super().__init__(name, module)
        self._pads = _conv_pads(module)

    def _apply(self, call, input):  # noqa: A002 - nn.Conv2d.forward's own argument name
        m = self.module
        if input.dim() != 4:
            raise ValueError(f"layer '{self.name}' (Conv2d): the DP engine needs batched input (R, C, H, W), "
                             f"got shape {tuple(input.shape)}")
        return _Conv2dFn.apply(input, m.weight, m.bias, m.stride, m.padding, m.dilation, self._pads, call)

    def dims(self, B: int) -> tuple[int, int, int] | None:
        """(rows T per example over all calls, d_in = C_in*kh*kw, d_out = C_out) of the Linear view."""
        calls = self.done_calls()
        if not calls or not B:
            return None
        m = self.module
        T = sum(c.g.numel() // m.out_channels for c in calls) // B
        return max(T, 1), m.in_channels * math.prod(m.kernel_size), m.out_channels

    def _unfold(self, x: torch.Tensor) -> torch.Tensor:  # (R, C_in, H, W) -> (R, L, C_in*kh*kw)
        m = self.module
        top, bottom, left, right = self._pads
        if top == bottom and left == right:
            cols = F.unfold(x, m.kernel_size, m.dilation, (top, left), m.stride)
        else:
            cols = F.unfold(F.pad(x, (left, right, top, bottom)), m.kernel_size, m.dilation, 0, m.stride)
        return cols.transpose(1, 2)

    def _grads(self, B: int, calls: list[_Call]) -> torch.Tensor:  # G (B, T', C_out)
        where = f"layer '{self.name}' (Conv2d) output grad"
        C_out = self.module.out_channels
        return _cat_rows([regroup(c.g.reshape(c.g.shape[0], C_out, -1).transpose(1, 2), B, where) for c in calls])

    def _inputs(self, B: int, calls: list[_Call], dtype: torch.dtype) -> torch.Tensor:  # A (B, T', D)
        where = f"layer '{self.name}' (Conv2d) input"
        return _cat_rows([regroup(self._unfold(c.a.to(dtype)), B, where) for c in calls])

    def _dtype(self, calls) -> torch.dtype:
        return torch.promote_types(calls[0].a.dtype, calls[0].g.dtype)

    def sqnorm(self, B, *, method, backend, selector=None):
        calls = self.done_calls()
        if not calls:
            self._prep = None
            return None
        self._prep = calls  # the raw records: A is unfolded again for the sum (memory, see above)
        dt = self._dtype(calls)
        G = self._grads(B, calls).to(dt)  # checks the rows before the (kh*kw times larger) unfold
        has_b = "bias" in self.trainable
        if "weight" not in self.trainable:
            return _bias_sqnorm(G)
        A = self._inputs(B, calls, dt)
        shape = kernels.LinearShape(A.shape[1], A.shape[2], G.shape[2], has_b)
        impl = self._select("linear_sqnorm", A, shape, backend, selector, method)
        return kernels.per_example_sqnorm_linear(A, G, bias=has_b, impl=impl)

    def clipped_sums(self, coef, keep, *, backend, selector=None):
        if self._prep is None:
            return {}
        calls = self._prep
        dt = self._dtype(calls)
        B = coef.shape[0]
        G = _mask_rows(self._grads(B, calls).to(dt), keep)
        has_b = "bias" in self.trainable
        if "weight" not in self.trainable:
            return {"bias": _bias_sum(G, coef)}
        A = _mask_rows(self._inputs(B, calls, dt), keep)
        shape = kernels.LinearShape(A.shape[1], A.shape[2], G.shape[2], has_b)
        impl = self._select("linear_clipped_sum", A, shape, backend, selector)
        w, b = kernels.clipped_sum_linear(A, G, coef, bias=has_b, impl=impl)
        w = w.reshape(self.module.weight.shape)
        return {"weight": w, "bias": b} if has_b else {"weight": w}


class _NormRuleBase(LayerRule):
    """LayerNorm / GroupNorm affine params: the per-example grads are (B, C) each, summed over
    calls; xhat is recomputed from the saved input with the forward's own mean and rstd."""

    def _xhat_and_g(self, call: _Call, B: int):  # -> xhat (B, N, C), G (B, N, C)
        raise NotImplementedError

    def sqnorm(self, B, *, method, backend, selector=None):
        calls = self.done_calls()
        if not calls:
            self._prep = None
            return None
        gw = gb = None
        for call in calls:
            xhat, G = self._xhat_and_g(call, B)
            xhat, G = _same_dtype(xhat, G)
            impl = self._select("norm_affine_grads", xhat, kernels.NormShape(xhat.shape[1], xhat.shape[2]), backend,
                                selector)
            w_i, b_i = kernels.norm_affine_grads(xhat, G, impl=impl)  # (B, C), (B, C) in fp32 (fp64 models: fp64)
            gw = w_i if gw is None else gw + w_i
            gb = b_i if gb is None else gb + b_i
        self._prep = (gw, gb)
        out = torch.zeros(B, dtype=gw.dtype, device=gw.device)
        if "weight" in self.trainable:
            out = out + gw.pow(2).sum(dim=1)
        if "bias" in self.trainable:
            out = out + gb.pow(2).sum(dim=1)
        return out

    def clipped_sums(self, coef, keep, *, backend, selector=None):
        if self._prep is None:
            return {}
        out = {}
        for attr, per_example in zip(("weight", "bias"), self._prep):
            if attr in self.trainable:
                pe = _mask_rows(per_example, keep)  # (B, C)
                out[attr] = (coef.to(pe.dtype) @ pe).reshape(self.trainable[attr].shape)
        return out


class LayerNormRule(_NormRuleBase):
    module_type = nn.LayerNorm

    def _apply(self, call, input):  # noqa: A002
        m = self.module
        return _LayerNormFn.apply(input, m.weight, m.bias, list(m.normalized_shape), m.eps, call)

    def _xhat_and_g(self, call, B):
        x, mean, rstd = call.a
        C = math.prod(self.module.normalized_shape)
        R = x.shape[0]
        xhat = (x.reshape(-1, C) - mean.reshape(-1, 1)) * rstd.reshape(-1, 1)  # (R*N, C)
        where = f"layer '{self.name}' (LayerNorm)"
        return (regroup(xhat.reshape(R, -1, C), B, where),
                regroup(call.g.reshape(R, -1, C).to(x.dtype), B, where))


class GroupNormRule(_NormRuleBase):
    module_type = nn.GroupNorm

    def _apply(self, call, input):  # noqa: A002
        m = self.module
        return _GroupNormFn.apply(input, m.weight, m.bias, m.num_groups, m.eps, call)

    def _xhat_and_g(self, call, B):
        x, mean, rstd = call.a  # x (R, C, *spatial), mean/rstd (R, groups)
        R, C = x.shape[0], x.shape[1]
        groups = self.module.num_groups
        xg = x.reshape(R, groups, -1)
        xhat = ((xg - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)).reshape(R, C, -1).transpose(1, 2)  # (R, HW, C)
        G = call.g.reshape(R, C, -1).transpose(1, 2).to(x.dtype)  # (R, HW, C)
        where = f"layer '{self.name}' (GroupNorm)"
        return regroup(xhat, B, where), regroup(G, B, where)


class EmbeddingRule(LayerRule):
    module_type = nn.Embedding

    @classmethod
    def check(cls, name, module):
        if module.sparse:
            raise UnsupportedLayerError(f"embedding '{name}': sparse=True is not supported by the DP engine")
        if module.scale_grad_by_freq:
            raise UnsupportedLayerError(
                f"embedding '{name}': scale_grad_by_freq couples the examples of a batch (the gradient "
                "depends on token counts over the whole batch), which breaks per-example clipping")

    def _apply(self, call, input):  # noqa: A002
        m = self.module
        return _EmbeddingFn.apply(input, m.weight, m.padding_idx, m.max_norm, m.norm_type, call)

    def _gather(self, B):
        calls = self.done_calls()
        if not calls:
            return None
        where = f"layer '{self.name}' (Embedding)"
        idx = _cat_rows([regroup(c.a, B, where, keep_last=False) for c in calls])  # (B, T')
        G = _cat_rows([regroup(c.g, B, where) for c in calls])  # (B, T', d)
        pad = self.module.padding_idx
        if pad is not None:  # the padding row never receives a gradient
            G = G.masked_fill((idx == pad).unsqueeze(-1), 0)
        return idx, G

    def sqnorm(self, B, *, method, backend, selector=None):
        self._prep = self._gather(B)
        if self._prep is None:
            return None
        idx, G = self._prep
        self.used["embedding_sqnorm"] = kernels.select("embedding_sqnorm", G.device, G.dtype, backend=backend)[0].name
        return kernels.embedding_sqnorm(idx, G, backend=backend)

    def clipped_sums(self, coef, keep, *, backend, selector=None):
        if self._prep is None:
            return {}
        idx, G = self._prep
        G = _mask_rows(G, keep)
        return {"weight": kernels.embedding_clipped_sum(idx, G, coef, self.module.num_embeddings, backend=backend)}


RULES: tuple[type[LayerRule], ...] = (LinearRule, Conv2dRule, LayerNormRule, GroupNormRule, EmbeddingRule)


def rule_for(module: nn.Module) -> type[LayerRule] | None:
    """The rule for `module`: its class, or a subclass that keeps the base class's forward
    (a subclass with its own forward may compute anything, so it gets no rule)."""
    for rule in RULES:
        base = rule.module_type
        if isinstance(module, base) and type(module).forward is base.forward:
            return rule
    return None
