"""Per-layer rules of the book-keeping clipping engine (written by hand for dpldm).

While the engine captures a forward pass, every trainable nn.Linear / nn.LayerNorm /
nn.GroupNorm / nn.Embedding runs through a small autograd Function instead of its usual
forward. The Function computes the same output, and in the backward pass:
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
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dpldm import kernels


class UnsupportedLayerError(TypeError):
    """A trainable parameter lives in a layer without a per-example clipping rule."""


class RowMismatchError(ValueError):
    """A layer saw a number of rows that is not a multiple of the number of examples B."""


class _Call:
    """The record of one forward call: layer input(s) `a` and output gradient `g` (None until
    the backward reaches this call; stays None when the call's output did not affect the loss)."""

    __slots__ = ("a", "g")

    def __init__(self) -> None:
        self.a = None
        self.g = None


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


def _cat_rows(ts: list[torch.Tensor]) -> torch.Tensor:
    return ts[0] if len(ts) == 1 else torch.cat(ts, dim=1)


def _mask_rows(t: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Zero the rows of dropped examples with `where` (0 * NaN would still be NaN)."""
    if keep is None:
        return t
    shape = (t.shape[0],) + (1,) * (t.dim() - 1)
    return torch.where(keep.view(shape), t, torch.zeros((), dtype=t.dtype, device=t.device))


# --- autograd Functions: same forward as the layer; backward gives the input gradient only -----

class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, call):  # x: (R, ..., d_in) -> (R, ..., d_out)
        ctx.save_for_backward(x, weight)
        ctx.call = call
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):  # g: (R, ..., d_out)
        x, weight = ctx.saved_tensors
        ctx.call.a, ctx.call.g = x.detach(), g.detach()
        grad_x = g.matmul(weight.to(g.dtype)) if ctx.needs_input_grad[0] else None  # (R, ..., d_in)
        return grad_x, None, None, None


class _LayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, normalized_shape, eps, call):
        x = x.contiguous()
        y, mean, rstd = torch.ops.aten.native_layer_norm(x, normalized_shape, weight, bias, eps)
        ctx.save_for_backward(x, mean, rstd, weight, bias)
        ctx.normalized_shape, ctx.call = normalized_shape, call
        return y

    @staticmethod
    def backward(ctx, g):
        x, mean, rstd, weight, bias = ctx.saved_tensors
        g = g.contiguous()
        ctx.call.a, ctx.call.g = (x.detach(), mean.detach(), rstd.detach()), g.detach()
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x, _, _ = torch.ops.aten.native_layer_norm_backward(
                g, x, ctx.normalized_shape, mean, rstd, weight, bias, [True, False, False])
        return grad_x, None, None, None, None, None


class _GroupNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps, call):  # x: (R, C, *spatial)
        x = x.contiguous()
        R, C = x.shape[0], x.shape[1]
        hw = math.prod(x.shape[2:])
        y, mean, rstd = torch.ops.aten.native_group_norm(x, weight, bias, R, C, hw, num_groups, eps)
        ctx.save_for_backward(x, mean, rstd, weight)
        ctx.dims, ctx.call = (R, C, hw, num_groups), call
        return y

    @staticmethod
    def backward(ctx, g):
        x, mean, rstd, weight = ctx.saved_tensors
        g = g.contiguous()
        ctx.call.a, ctx.call.g = (x.detach(), mean.detach(), rstd.detach()), g.detach()
        grad_x = None
        if ctx.needs_input_grad[0]:
            R, C, hw, groups = ctx.dims
            grad_x, _, _ = torch.ops.aten.native_group_norm_backward(
                g, x, mean, rstd, weight, R, C, hw, groups, [True, False, False])
        return grad_x, None, None, None, None, None


class _EmbeddingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx, weight, padding_idx, max_norm, norm_type, call):
        ctx.save_for_backward(idx)
        ctx.call = call
        return F.embedding(idx, weight, padding_idx, max_norm, norm_type, False, False)

    @staticmethod
    def backward(ctx, g):  # g: (R, ..., d)
        (idx,) = ctx.saved_tensors
        ctx.call.a, ctx.call.g = idx, g.detach()
        return None, None, None, None, None, None


# --- rules ----------------------------------------------------------------------------------------

class LayerRule:
    """Base: one trainable module, its trainable params by attribute name, its call records."""

    module_type: type[nn.Module] = nn.Module

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name, self.module = name, module
        self.trainable = {attr: p for attr, p in module.named_parameters(recurse=False) if p.requires_grad}
        self.calls: list[_Call] = []
        self._prep = None  # per-step cache filled by sqnorm(), used by clipped_sums()

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

    def sqnorm(self, B: int, *, method: str, backend: str) -> torch.Tensor | None:
        """(B,) per-example squared norm of this layer's trainable gradient (None: no calls)."""
        raise NotImplementedError

    def clipped_sums(self, coef: torch.Tensor, keep: torch.Tensor | None, *, backend: str) -> dict[str, torch.Tensor]:
        """{attr: sum_i coef_i * grad_i(attr)}; `keep` (B,) bool zeroes dropped examples."""
        raise NotImplementedError


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
        return A, G.to(A.dtype)

    def sqnorm(self, B, *, method, backend):
        self._prep = self._gather(B)
        if self._prep is None:
            return None
        A, G = self._prep
        has_b = "bias" in self.trainable
        if "weight" in self.trainable:
            return kernels.per_example_sqnorm_linear(A, G, bias=has_b, method=method, backend=backend)
        return G.sum(dim=1).pow(2).sum(dim=1)  # bias only: (B,)

    def clipped_sums(self, coef, keep, *, backend):
        if self._prep is None:
            return {}
        A, G = self._prep
        A, G = _mask_rows(A, keep), _mask_rows(G, keep)
        has_b = "bias" in self.trainable
        if "weight" in self.trainable:
            w, b = kernels.clipped_sum_linear(A, G, coef, bias=has_b, backend=backend)
            return {"weight": w, "bias": b} if has_b else {"weight": w}
        return {"bias": (G * coef.to(G.dtype).view(-1, 1, 1)).sum(dim=(0, 1))}


class _NormRuleBase(LayerRule):
    """LayerNorm / GroupNorm affine params: the per-example grads are (B, C) each, summed over
    calls; xhat is recomputed from the saved input with the forward's own mean and rstd."""

    def _xhat_and_g(self, call: _Call, B: int):  # -> xhat (B, N, C), G (B, N, C)
        raise NotImplementedError

    def sqnorm(self, B, *, method, backend):
        calls = self.done_calls()
        if not calls:
            self._prep = None
            return None
        gw = gb = None
        for call in calls:
            xhat, G = self._xhat_and_g(call, B)
            w_i, b_i = kernels.norm_affine_grads(xhat, G, backend=backend)  # (B, C), (B, C)
            gw = w_i if gw is None else gw + w_i
            gb = b_i if gb is None else gb + b_i
        self._prep = (gw, gb)
        out = torch.zeros(B, dtype=gw.dtype, device=gw.device)
        if "weight" in self.trainable:
            out = out + gw.pow(2).sum(dim=1)
        if "bias" in self.trainable:
            out = out + gb.pow(2).sum(dim=1)
        return out

    def clipped_sums(self, coef, keep, *, backend):
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

    def sqnorm(self, B, *, method, backend):
        self._prep = self._gather(B)
        if self._prep is None:
            return None
        idx, G = self._prep
        return kernels.embedding_sqnorm(idx, G, backend=backend)

    def clipped_sums(self, coef, keep, *, backend):
        if self._prep is None:
            return {}
        idx, G = self._prep
        G = _mask_rows(G, keep)
        return {"weight": kernels.embedding_clipped_sum(idx, G, coef, self.module.num_embeddings, backend=backend)}


RULES: tuple[type[LayerRule], ...] = (LinearRule, LayerNormRule, GroupNormRule, EmbeddingRule)


def rule_for(module: nn.Module) -> type[LayerRule] | None:
    """The rule for `module`: its class, or a subclass that keeps the base class's forward
    (a subclass with its own forward may compute anything, so it gets no rule)."""
    for rule in RULES:
        base = rule.module_type
        if isinstance(module, base) and type(module).forward is base.forward:
            return rule
    return None
