"""Book-keeping per-example clipping (Bu et al., ICML'23), written by hand for dpldm.

One forward, one backward, no per-example gradient stored for the batch, no second backward:

    loss = per_example_loss_fn(model, batch)        # (B,)  K copies averaged inside
    loss.sum().backward()                           # rules record (A, G) per trainable layer
    n_i^2 = sum_layers ||grad_i(layer)||^2          # ghost or materialised per layer (kernels)
    c_i   = min(1, C / (n_i + 1e-6))                # the same factor as Opacus' flat clipping
    S     = sum_i c_i grad_i                        # one weighted GEMM per layer (kernels)

`BookKeepingEngine.clipped_sums(loss_fn, batch)` returns S per trainable parameter name; it
never touches `param.grad` (trainable parameters get no gradient from autograd at all, and a
parameter that does get one was used outside a rule: that is refused, since its per-example
contribution would escape clipping).

Non-finite values (`nonfinite=`):
  "raise" (default): a NaN/inf per-example loss (checked before the backward) or per-example
      gradient norm raises NonFiniteGradientError; nothing is added to any sum. This is a stop
      for a bug or bad data: the operator fixes it and resumes from the last checkpoint. (That a
      run stopped is itself a data-dependent event outside the DP guarantee, like any crash.)
  "drop": that example contributes exactly zero to S (its rows are zeroed with `where`, since
      0 * NaN = NaN would otherwise poison the GEMM). This keeps the DP guarantee: an example's
      contribution is either clip_C(grad_i) or 0, a function of that example alone (the engine's
      layers never mix examples), so its norm is still <= C and the sensitivity of S under
      adding/removing one example stays C. The decision is made per example *before* the sum
      and noise; the denominator is the public q*N, so a dropped example changes nothing else.
      Dropping at the batch level instead (e.g. skipping a step whose noisy sum is non-finite,
      as AMP loss scalers do) would make the released update depend on all examples at once
      and is NOT covered by the analysis; never do that. The count of dropped examples is
      private data: it is kept on the engine for debugging but must not be logged or published.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from dpldm.kernels import choose_method, resolve_backend
from dpldm.privacy.layers import (Conv2dRule, LayerRule, LinearRule, RowMismatchError, UnsupportedLayerError,
                                  rule_for)

__all__ = ["BookKeepingEngine", "ChunkResult", "NonFiniteGradientError", "UnsupportedLayerError",
           "RowMismatchError", "clipped_gradient_sum", "NORM_METHODS", "NONFINITE_RULES"]

NORM_METHODS = ("auto", "ghost", "materialize")
NONFINITE_RULES = ("raise", "drop")
CLIP_EPS = 1e-6  # c_i = min(1, C / (||g_i|| + 1e-6)), as Opacus

PerExampleLossFn = Callable[[nn.Module, Any], torch.Tensor]


class NonFiniteGradientError(FloatingPointError):
    """A per-example loss or gradient is NaN/inf and the engine's rule is "raise"."""


@dataclass
class ChunkResult:
    sums: dict[str, torch.Tensor]  # clipped sums by parameter name (accumulation dtype)
    num_examples: int  # B of this chunk
    num_dropped: int  # examples dropped as non-finite (private: never log)


class BookKeepingEngine:
    """Per-example clipping for `model`'s trainable parameters (see module docstring).

    Supported trainable layers: nn.Linear (on (B, d) vectors or (B, ..., d) sequences),
    nn.Conv2d (groups=1, padding_mode='zeros'; any kernel, stride, padding, dilation; bias
    optional; computed as a Linear on the unfolded input), nn.LayerNorm and nn.GroupNorm affine
    parameters, nn.Embedding. Any other trainable parameter (e.g. nn.Conv1d/Conv3d,
    nn.ConvTranspose2d, a grouped or depthwise Conv2d) is refused here, at set-up, with an error
    naming it. `norm_method` applies to the Linear and Conv2d rules. A module called several
    times in one forward is handled (its calls are rows of the same example); one Parameter
    shared between two modules is refused."""

    def __init__(self, model: nn.Module, max_grad_norm: float, *, norm_method: str = "auto",
                 backend: str = "auto", nonfinite: str = "raise") -> None:
        if not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
            raise ValueError(f"max_grad_norm (clip norm C) must be > 0, got {max_grad_norm!r}")
        if norm_method not in NORM_METHODS:
            raise ValueError(f"norm_method must be one of {NORM_METHODS}, got {norm_method!r}")
        if nonfinite not in NONFINITE_RULES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_RULES}, got {nonfinite!r}")
        from dpldm.kernels import BACKENDS

        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.model = model
        self.max_grad_norm = float(max_grad_norm)
        self.norm_method, self.backend, self.nonfinite = norm_method, backend, nonfinite
        self.rules: list[LayerRule] = []
        self.param_names: dict[int, str] = {}  # id(param) -> name
        self._build()
        self.methods: dict[str, str] = {}  # layer name -> norm method used in the last chunk
        self.total_dropped = 0  # private: never log

    # -- set-up ------------------------------------------------------------------------------
    def _build(self) -> None:
        names = {id(p): n for n, p in self.model.named_parameters()}
        owner: dict[int, str] = {}
        for mname, module in self.model.named_modules():
            own = [(attr, p) for attr, p in module.named_parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            for attr, p in own:
                full = f"{mname}.{attr}" if mname else attr
                if id(p) in owner:
                    raise UnsupportedLayerError(
                        f"trainable parameter '{names[id(p)]}' is shared by modules '{owner[id(p)]}' and "
                        f"'{mname or type(module).__name__}'; the DP engine needs each trainable parameter "
                        "in one module (call that one module twice instead)")
                owner[id(p)] = mname or type(module).__name__
            rule_cls = rule_for(module)
            if rule_cls is None:
                attr, _ = own[0]
                full = f"{mname}.{attr}" if mname else attr
                raise UnsupportedLayerError(
                    f"trainable parameter '{full}' belongs to a {type(module).__name__} ('{mname or '<root>'}'), "
                    "which has no per-example clipping rule (supported: nn.Linear, nn.Conv2d with groups=1, "
                    "nn.LayerNorm, nn.GroupNorm affine, nn.Embedding, or subclasses that keep their forward); freeze it "
                    "(requires_grad_(False)) or move it into a supported layer")
            rule_cls.check(mname, module)
            self.rules.append(rule_cls(mname, module))
        if not self.rules:
            raise ValueError("the model has no trainable parameters: nothing to clip")
        self.param_names = {id(p): names[id(p)] for r in self.rules for p in r.trainable.values()}

    @property
    def trainable(self) -> dict[str, nn.Parameter]:
        """Trainable parameters by name, in model order."""
        return {n: p for n, p in self.model.named_parameters() if id(p) in self.param_names}

    @contextmanager
    def _capture(self):
        """Swap the forward of every trainable layer for its rule's recording forward."""
        patched = []
        try:
            for rule in self.rules:
                rule.reset()
                m = rule.module
                had_own = "forward" in m.__dict__
                previous = m.__dict__.get("forward")
                m.forward = rule.make_forward(m.forward)
                patched.append((m, had_own, previous))
            yield
        finally:
            for m, had_own, previous in reversed(patched):
                if had_own:
                    m.forward = previous
                else:
                    del m.forward

    # -- one physical chunk --------------------------------------------------------------------
    def clipped_sums(self, per_example_loss_fn: PerExampleLossFn, batch: Any, *,
                     acc_dtype: torch.dtype | None = None, where: str = "",
                     out: dict[str, torch.Tensor] | None = None) -> ChunkResult:
        """Clipped per-example gradient sums of one physical chunk (no noise, no scaling).

        With `out` (name -> accumulator), the sums are added into it in place and returned."""
        params = self.trainable
        acc = acc_dtype or _acc_dtype(params.values())
        at = f" ({where})" if where else ""
        stash = {n: p.grad for n, p in params.items()}
        for p in params.values():
            p.grad = None
        try:
            with self._capture():
                loss = per_example_loss_fn(self.model, batch)  # (B,)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 1:
                raise ValueError(f"per_example_loss_fn must return a 1-D tensor of shape (B,), got "
                                 f"{getattr(loss, 'shape', type(loss).__name__)}{at}")
            B = loss.shape[0]
            if B == 0:
                self._reset()
                return ChunkResult(self._zeros(params, acc, out), 0, 0)
            finite = torch.isfinite(loss.detach())
            n_bad = int((~finite).sum())
            if n_bad and self.nonfinite == "raise":
                raise NonFiniteGradientError(
                    f"{n_bad} of {B} per-example losses are NaN/inf{at}; refusing to build an update from them "
                    "(fix the data/model, or construct the engine with nonfinite='drop' to drop such examples)")
            if n_bad:
                loss = torch.where(finite, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
            if not loss.requires_grad:  # no trainable layer reached the loss: all gradients are 0
                self._reset()
                return ChunkResult(self._zeros(params, acc, out), B, n_bad)
            loss.sum().backward()
            escaped = [n for n, p in params.items() if p.grad is not None]
            if escaped:
                raise UnsupportedLayerError(
                    f"trainable parameter(s) {escaped} received a gradient outside the engine's layer rules "
                    "(used functionally, e.g. tied weights or F.linear(x, module.weight), or inside "
                    "nn.MultiheadAttention); their per-example gradients would escape clipping")
        except BaseException:
            self._reset()  # free the recorded activations and gradients
            raise
        finally:
            for n, p in params.items():
                p.grad = stash[n]
        try:
            return self._clip_and_sum(params, B, finite, acc, at, out)
        except BaseException:
            self._reset()
            raise

    def _reset(self) -> None:
        for rule in self.rules:
            rule.reset()

    @staticmethod
    def _zeros(params, acc, out):
        if out is not None:
            return out
        return {n: torch.zeros(p.shape, dtype=acc, device=p.device) for n, p in params.items()}

    def _clip_and_sum(self, params, B, finite, acc, at, out=None) -> ChunkResult:
        sq = torch.zeros(B, dtype=torch.float64 if acc == torch.float64 else torch.float32,
                         device=next(iter(params.values())).device)
        self.methods = {}
        for rule in self.rules:
            method = self._method(rule, B)
            s = rule.sqnorm(B, method=method, backend=self.backend)
            if s is not None:
                sq = sq + s.to(sq.dtype)
        keep = finite & torch.isfinite(sq)
        n_drop = int((~keep).sum())
        if n_drop and self.nonfinite == "raise":
            self._reset()
            raise NonFiniteGradientError(
                f"{n_drop} of {B} per-example gradients are NaN/inf although their losses are finite{at}; "
                "refusing to build an update from them (or use nonfinite='drop')")
        norms = torch.where(keep, sq, torch.zeros((), dtype=sq.dtype, device=sq.device)).sqrt()  # (B,)
        coef = (self.max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)
        coef = torch.where(keep, coef, torch.zeros((), dtype=coef.dtype, device=coef.device))  # (B,)
        keep_rows = keep if n_drop else None
        by_id = {id(p): n for n, p in params.items()}
        sums = self._zeros(params, acc, out)
        for rule in self.rules:
            for attr, s in rule.clipped_sums(coef, keep_rows, backend=self.backend).items():
                if s is not None:
                    sums[by_id[id(rule.trainable[attr])]] += s.to(acc)
            rule.reset()  # free A and G as soon as the layer is done
        self.total_dropped += n_drop
        return ChunkResult(sums, B, n_drop)

    def _method(self, rule: LayerRule, B: int) -> str:
        if not isinstance(rule, (LinearRule, Conv2dRule)):
            return "auto"
        if self.norm_method != "auto":
            self.methods[rule.name] = self.norm_method
            return self.norm_method
        calls = rule.done_calls()
        if calls and B:  # record what the kernels' "auto" picks (for reports; the kernels decide)
            if isinstance(rule, Conv2dRule):  # the Linear view: T' = K*L*calls rows, d_in = C_in*kh*kw
                T, d_in, d_out = rule.dims(B)
            else:  # T' = rows per example over all calls: (B*K, T, d) counts as K*T rows
                T = sum(c.a.numel() // c.a.shape[-1] for c in calls) // B
                d_in, d_out = rule.module.in_features, rule.module.out_features
            try:
                backend = resolve_backend(self.backend, calls[0].a.device)
                self.methods[rule.name] = choose_method(max(T, 1), d_in, d_out, backend)
            except TypeError:  # kernels without the backend argument
                self.methods[rule.name] = choose_method(max(T, 1), d_in, d_out)
        return "auto"


def _acc_dtype(params) -> torch.dtype:
    """fp64 accumulators for fp64 models (tests), fp32 otherwise (fp16/bf16 models included)."""
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


def clipped_gradient_sum(model: nn.Module, per_example_loss_fn: PerExampleLossFn, batch: Any,
                         max_grad_norm: float, *, norm_method: str = "auto", backend: str = "auto",
                         nonfinite: str = "raise") -> dict[str, torch.Tensor]:
    """Noise-free sum over the examples of `batch` of their clipped gradients, for every
    trainable parameter of `model`, by parameter name. `per_example_loss_fn(model, batch)`
    returns (B,); B = 0 gives zeros. Does not modify `param.grad`."""
    engine = BookKeepingEngine(model, max_grad_norm, norm_method=norm_method, backend=backend, nonfinite=nonfinite)
    return engine.clipped_sums(per_example_loss_fn, batch).sums
