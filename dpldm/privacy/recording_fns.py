"""The recording autograd Functions of the book-keeping clipping engine (written by hand for dpldm).

While the engine captures a forward pass, each trainable nn.Linear / nn.Conv2d / nn.LayerNorm /
nn.GroupNorm / nn.Embedding runs through one of these Functions instead of its usual forward: the
same output, and a backward that returns the gradient of the layer *input* only while recording,
in the call's `_Call`, the layer input A and the output gradient G. The per-layer rules
(`dpldm.privacy.layers`) turn those records into per-example norms and clipped sums.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

class _Call:
    """The record of one forward call: layer input(s) `a` and output gradient `g` (None until
    the backward reaches this call; stays None when the call's output did not affect the loss)."""

    __slots__ = ("a", "g")

    def __init__(self) -> None:
        self.a = None
        self.g = None


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


_PROBE_CACHE: dict[tuple, torch.dtype] = {}


def autocast_input_dtype(op: str, x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run `op` (layer_norm | group_norm) in for input `x`: the
    Functions below call the native ops directly (to keep mean and rstd), which autocast does not
    see, so they cast like F.layer_norm / F.group_norm would under the active autocast state
    (CUDA runs both in fp32; CPU in the input dtype). Probed once per state on a 1-element input."""
    dev = x.device.type
    if not torch.is_autocast_enabled(dev):
        return x.dtype
    key = (op, dev, x.dtype, torch.get_autocast_dtype(dev))
    if key not in _PROBE_CACHE:
        probe = torch.zeros(1, 2, 1, dtype=x.dtype, device=x.device)
        with torch.no_grad():
            y = F.layer_norm(probe, (1,)) if op == "layer_norm" else F.group_norm(probe, 1)
        _PROBE_CACHE[key] = y.dtype
    return _PROBE_CACHE[key]


class _LayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, normalized_shape, eps, call):
        x = x.to(autocast_input_dtype("layer_norm", x)).contiguous()
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
        x = x.to(autocast_input_dtype("group_norm", x)).contiguous()
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


def _conv_pads(module: nn.Conv2d) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) zero padding of a Conv2d, its string forms ('valid', 'same')
    resolved the way nn.Conv2d / F.conv2d do ('same': the odd extra row/column goes bottom/right)."""
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return (0, 0, 0, 0)
        out = []
        for d, k in zip(module.dilation, module.kernel_size):  # 'same'
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return tuple(out)  # type: ignore[return-value]
    ph, pw = module.padding
    return (ph, ph, pw, pw)


class _Conv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, pads, call):  # x: (R, C_in, H, W)
        ctx.save_for_backward(x, weight)
        ctx.conv, ctx.call = (stride, padding, dilation, pads), call
        return F.conv2d(x, weight, bias, stride, padding, dilation, 1)  # exactly nn.Conv2d's call

    @staticmethod
    def backward(ctx, g):  # g: (R, C_out, H_out, W_out)
        x, weight = ctx.saved_tensors
        ctx.call.a, ctx.call.g = x.detach(), g.detach()
        grad_x = None
        if ctx.needs_input_grad[0]:
            stride, padding, dilation, (top, bottom, left, right) = ctx.conv
            w = weight.detach().to(g.dtype)
            if top == bottom and left == right:
                xin = x.detach() if x.dtype == g.dtype else g.new_empty(1).expand(x.shape)
                grad_x = torch.ops.aten.convolution_backward(
                    g, xin, w, None, list(stride), [top, left], list(dilation), False, [0, 0], 1,
                    [True, False, False])[0]
            else:  # asymmetric padding='same' (even kernel): differentiate F.conv2d itself
                with torch.enable_grad():
                    xr = x.detach().to(g.dtype).requires_grad_(True)
                    y = F.conv2d(xr, w, None, stride, padding, dilation, 1)
                    (grad_x,) = torch.autograd.grad(y, xr, g)
        return grad_x, None, None, None, None, None, None, None


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
