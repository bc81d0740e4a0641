"""Linear layers of the DP engine that read the same input tensor share their kernels.

Self-attention's q, k, v (and cross-attention's k, v) are three Linear layers applied to one
tensor. Their per-example norms and clipped sums are computed as ONE Linear with the output
gradients concatenated, G = [G_q | G_k | G_v] (B, T', sum d_out): one norm kernel and one
clipped-sum GEMM per phase instead of three (fewer launches; ghost norms build A's T x T Gram
once). Exact: ||[G_q|G_k|G_v]_i^T A_i||^2 is the sum of the layers' squared norms, and the rows of
the (sum d_out, d_in) clipped sum are the layers' own sums.
"""
from __future__ import annotations

import torch

from dpldm import kernels
from dpldm.privacy.layers import LayerRule, LinearRule, _mask_rows, _same_dtype


class LinearGroup:
    """Linear layers that read the very same input tensor(s) in this forward (self-attention's
    q, k, v; cross-attention's k, v): one norm kernel and one clipped-sum GEMM on the
    concatenated output gradients, G = [G_q | G_k | G_v] (B, T', sum d_out), instead of one
    each. Exact: ||[G_q|G_k|G_v]_i^T A_i||^2 = sum over the layers of ||G_l,i^T A_i||^2 (bias
    norms too), and the rows of the clipped sum (sum d_out, d_in) are the layers' sums. Ghost
    norms build A's T x T Gram once instead of once per layer; every method saves launches."""

    def __init__(self, rules: list[LinearRule]) -> None:
        self.rules = rules
        self.name = "+".join(r.name for r in rules)
        self.has_b = "bias" in rules[0].trainable
        self._prep = None
        self.used: dict[str, str] = {}

    @staticmethod
    def signature(rule: LayerRule):
        """Hashable identity of a Linear rule's recorded inputs, or None when it cannot join a group."""
        if not isinstance(rule, LinearRule) or "weight" not in rule.trainable:
            return None
        calls = rule.done_calls()
        if not calls:
            return None
        return (tuple((c.a.data_ptr(), tuple(c.a.shape), c.a.stride(), c.a.dtype, c.a.device) for c in calls),
                "bias" in rule.trainable)

    def sqnorm(self, B, *, method, backend, selector=None):
        parts = [r._gather(B) for r in self.rules]  # [(A (B,T',d_in), G_l (B,T',d_out_l))]
        A = parts[0][0]
        G = torch.cat([g for _, g in parts], dim=-1)  # (B, T', sum d_out)
        A, G = _same_dtype(A, G)
        for r in self.rules:
            r.reset()  # the group holds what it needs; the members' own records are freed now
        self._prep = (A, G)
        shape = kernels.LinearShape(A.shape[1], A.shape[2], G.shape[2], self.has_b)
        impl, _ = kernels.select("linear_sqnorm", A.device, A.dtype, backend=backend, method=method, shape=shape,
                                 selector=selector)
        self.used = {"linear_sqnorm": impl.name}
        return kernels.per_example_sqnorm_linear(A, G, bias=self.has_b, impl=impl)

    def clipped_sums(self, coef, keep, *, backend, selector=None) -> dict[LinearRule, dict[str, torch.Tensor]]:
        A, G = self._prep
        A, G = _mask_rows(A, keep), _mask_rows(G, keep)
        shape = kernels.LinearShape(A.shape[1], A.shape[2], G.shape[2], self.has_b)
        impl, _ = kernels.select("linear_clipped_sum", A.device, A.dtype, backend=backend, shape=shape,
                                 selector=selector)
        self.used["linear_clipped_sum"] = impl.name
        w, b = kernels.clipped_sum_linear(A, G, coef, bias=self.has_b, impl=impl)  # (sum d_out, d_in), (sum d_out,)
        out, o = {}, 0
        for r in self.rules:
            d = r.module.out_features
            out[r] = {"weight": w[o:o + d]} | ({"bias": b[o:o + d]} if self.has_b else {})
            o += d
        self._prep = None
        return out

    def reset(self) -> None:
        self._prep = None
        for r in self.rules:
            r.reset()


def group_shared_inputs(rules: list[LayerRule]) -> list[LayerRule | LinearGroup]:
    """The rules in model order, with Linear rules that read the same recorded input tensor(s)
    (and agree on having a trainable bias) merged into one LinearGroup at the first member's place."""
    sigs = {id(r): LinearGroup.signature(r) for r in rules}
    members: dict = {}
    for r in rules:
        if sigs[id(r)] is not None:
            members.setdefault(sigs[id(r)], []).append(r)
    units: list[LayerRule | LinearGroup] = []
    placed: set = set()
    for r in rules:
        sig = sigs[id(r)]
        if sig is None or len(members[sig]) == 1:
            units.append(r)
        elif sig not in placed:
            placed.add(sig)
            units.append(LinearGroup(members[sig]))
    return units
