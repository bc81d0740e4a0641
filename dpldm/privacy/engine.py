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

from dpldm.errors import InputError
from dpldm.privacy.groups import LinearGroup, group_shared_inputs
from dpldm.privacy.batches import batch_size_of
from dpldm.privacy.independence import check_independence
from dpldm.privacy.layers import LayerRule, RowMismatchError, UnsupportedLayerError, rule_for

__all__ = ["BookKeepingEngine", "ChunkResult", "NonFiniteGradientError", "UnsupportedLayerError",
           "RowMismatchError", "clipped_gradient_sum", "NORM_METHODS", "NONFINITE_RULES", "RANDOM_MODULES",
           "global_rng_use"]

NORM_METHODS = ("auto", "ghost", "materialize")
NONFINITE_RULES = ("raise", "drop")
CLIP_EPS = 1e-6  # c_i = min(1, C / (||g_i|| + 1e-6)), as Opacus

PerExampleLossFn = Callable[[nn.Module, Any], torch.Tensor]


class NonFiniteGradientError(InputError, FloatingPointError):
    """A per-example loss or gradient is NaN/inf and the engine's rule is "raise": one line, exit 2
    (a diverging lr, bad data or a broken model). The message names the step, never how many
    examples of the chunk were affected nor the chunk's size (both private counts)."""


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
    shared between two modules is refused. Also refused at set-up (the statistics and randomness
    checks again at every chunk): an nn.Embedding or nn.EmbeddingBag with max_norm, trainable or
    frozen (renorms its weight rows in place from the batch); any module, trainable or frozen,
    that updates running statistics from the batch in train mode or normalises with batch
    statistics (BatchNorm/InstanceNorm; see _check_running_stats); any module in TRAINING mode
    whose forward draws from torch's global random generator (dropout with p > 0, RReLU,
    nn.MultiheadAttention with dropout; see _check_randomness). `probe(loss_fn, public_batch)`
    is the generic check a trainer runs once at set-up: one forward+backward of a public batch
    that must change no parameter or buffer and draw nothing from the global generators, and,
    for a batch of two or more, per-example independence (no op may mix examples).

    backend / norm_method "auto": with `selector` (a dpldm.kernels.selection.KernelSelector) each
    distinct public layer shape is timed once and the fastest kernel kept; with selector=None a
    fixed deterministic rule (kernels/registry.py). `kernels_used` names what ran per layer.
    group_shared_inputs (default True): Linear layers that read the same input tensor (q, k, v)
    share one norm kernel and one clipped-sum GEMM (groups.LinearGroup; exact, fewer launches).

    Mixed precision: run the forward of `per_example_loss_fn` under torch.autocast (bf16) with
    fp32 parameters; the rules then record bf16 A and G (fp32 where the layer's input was fp32),
    and the kernels accumulate the norms and clipped sums in fp32 from those same tensors, so
    each example's clipped contribution has norm <= C up to fp32 rounding. Clipping factors,
    accumulators and results are fp32 (fp64 for fp64 models)."""

    def __init__(self, model: nn.Module, max_grad_norm: float, *, norm_method: str = "auto",
                 backend: str = "auto", nonfinite: str = "raise", selector=None,
                 group_shared_inputs: bool = True) -> None:
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
        if selector is not None and not callable(getattr(selector, "choose", None)):
            raise TypeError(f"selector must be a dpldm.kernels.selection.KernelSelector (or None), got "
                            f"{type(selector).__name__}")
        self.selector = selector  # KernelSelector: "auto" measured per public layer shape; None: the fixed rule
        self.group_shared_inputs = bool(group_shared_inputs)  # q/k/v reading one input: one kernel each phase
        self.rules: list[LayerRule] = []
        self.param_names: dict[int, str] = {}  # id(param) -> name
        self._stat_modules: list[tuple[str, nn.Module]] = []  # modules that may update running stats
        self._build()
        if backend != "auto":  # an explicit backend that cannot run on the parameters' device: say so now
            from dpldm.kernels import BackendUnavailableError
            from dpldm.kernels.dispatch import why_unavailable

            dev = next(iter(self.trainable.values())).device
            why = why_unavailable(backend, dev)
            if why is not None:
                raise BackendUnavailableError(f"kernel backend {backend!r} is unavailable for the model's trainable "
                                              f"parameters on {dev}: {why}")
        self.methods: dict[str, str] = {}  # layer name -> norm method used in the last chunk
        self.kernels_used: dict[str, dict[str, str]] = {}  # layer name -> {op: implementation} (last chunk)
        self.total_dropped = 0  # private: never log

    # -- set-up ------------------------------------------------------------------------------
    def _build(self) -> None:
        names = {id(p): n for n, p in self.model.named_parameters()}
        owner: dict[int, str] = {}
        self._stat_modules = [(n, m) for n, m in self.model.named_modules()
                              if isinstance(m, nn.modules.batchnorm._NormBase)]
        self._random_modules = [(n, m) for n, m in self.model.named_modules() if isinstance(m, RANDOM_MODULES)]
        self._check_running_stats("at engine set-up")
        self._check_randomness("at engine set-up")
        for mname, module in self.model.named_modules():
            if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.max_norm is not None:
                state = "trainable" if module.weight.requires_grad else "frozen"
                raise UnsupportedLayerError(
                    f"{'embedding bag' if isinstance(module, nn.EmbeddingBag) else 'embedding'} '{mname or '<root>'}' "
                    f"({state}) has max_norm={module.max_norm}: its forward "
                    "renormalises the weight rows the batch looks up, in place, so the weights would change with the "
                    "private batch outside the clipped, noised update (a privacy leak); construct it with max_norm=None")
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

    def _check_running_stats(self, when: str) -> None:
        """Refuse, trainable or frozen: (1) modules that update running statistics from the batch
        in train mode (BatchNorm/InstanceNorm with track_running_stats=True): those buffers would
        carry private data out of the step without clipping or noise; (2) BatchNorm normalising
        with batch statistics (train mode, or no running stats at all): each example's output,
        hence its gradient, would depend on the other examples, so clipping per example would not
        bound one example's influence."""
        for n, m in self._stat_modules:
            where = f"module '{n or '<root>'}' ({type(m).__name__})"
            if m.training and m.track_running_stats:
                raise UnsupportedLayerError(
                    f"{where} updates its running statistics from the batch in train mode ({when}); under DP "
                    "those buffers would carry private data out without noise. Put it in eval mode "
                    "(module.eval(): it then uses the stored statistics) or replace it by GroupNorm/LayerNorm")
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None):
                raise UnsupportedLayerError(
                    f"{where} normalises with batch statistics ({when}): each example's gradient would depend on "
                    "the other examples of the batch, which per-example clipping cannot bound. Use stored running "
                    "statistics in eval mode, or GroupNorm/LayerNorm")

    def _check_randomness(self, when: str) -> None:
        """Refuse, trainable or frozen, a module in training mode whose forward draws from torch's
        global random generator (dropout masks, RReLU slopes): the draws are consumed row by row,
        so an example's mask depends on its position in the batch and on the other examples, and
        adding one example changes the others' gradients: the neighbouring-dataset bound (one
        example moves the clipped sum by at most C) no longer holds. Cheap: a loop over the few
        such modules found at set-up."""
        for n, m in self._random_modules:
            why = global_rng_use(m)
            if why is not None:
                raise UnsupportedLayerError(
                    f"module '{n or '<root>'}' ({type(m).__name__}, {why}) is in training mode ({when}): its forward "
                    "draws from torch's global random generator row by row, so an example's mask depends on the "
                    "other examples of the batch and adding one example can move the clipped sum by more than C "
                    "(the DP bound fails); put the model in eval mode (model.eval(): dropout off, GroupNorm/"
                    "LayerNorm unchanged) or make the module deterministic (dropout p = 0)")

    def probe(self, per_example_loss_fn: PerExampleLossFn, batch: Any, *, where: str = "set-up probe",
              low_precision: bool = False) -> None:
        """The generic set-up check: one forward+backward of a PUBLIC `batch` (its result is thrown
        away) must change no parameter or buffer of the model (a forward that writes state --
        running statistics, in-place renormalisation, a cache, a counter -- would carry private
        data out of the step without clipping or noise) and draw nothing from torch's global
        random generators (CPU, and the CUDA devices of the parameters; randomness must be keyed
        on (secret seed, step, example), as dpldm's diffusion draws are). On refusal the changed
        tensors and the generators are put back as they were. With a kernel selector, this pass
        also measures every public layer shape before any private chunk exists. With two or more
        examples in `batch`, each example's loss must also depend on that example alone: the
        batch's clipped sum must equal the sum of its examples' clipped sums computed one at a
        time (dpldm.privacy.independence; `low_precision`: the forward runs under bf16/fp16
        autocast, a looser rounding tolerance)."""
        devices = sorted({t.device for t in self.model.parameters() if t.device.type == "cuda"}, key=str)
        before = _state_copy(self.model)
        rng = _global_rng_states(devices)
        self.clipped_sums(per_example_loss_fn, batch, where=where)
        self._reset()
        after = dict(_named_state(self.model))
        changed = [n for n, t in before.items() if n not in after or not _same(t, after[n])]
        rng_after = _global_rng_states(devices)
        moved = [name for name, state in rng.items() if not torch.equal(state, rng_after[name])]
        if changed or moved:  # refused below: first put back what the pass changed (nothing is lost)
            with torch.no_grad():
                for n in changed:
                    if n in after and after[n].shape == before[n].shape:
                        after[n].copy_(before[n].to(device=after[n].device, dtype=after[n].dtype))
            _set_global_rng_states(rng, devices)
        if changed:
            more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
            raise UnsupportedLayerError(
                f"one forward+backward of a public batch ({where}) changed the model's tensor '{changed[0]}'{more}: a "
                "module that writes state in forward (running statistics, in-place renormalisation, a cache or "
                "counter) would carry private data out of the step without clipping or noise; make that module "
                "stateless, or put it in a mode in which it does not update")
        if moved:
            raise UnsupportedLayerError(
                f"one forward+backward of a public batch ({where}) drew from torch's global random generator "
                f"({', '.join(moved)}): such draws are consumed row by row, so one example's randomness depends on "
                "the other examples and the DP bound fails; key every draw on (secret seed, step, example) as "
                "dpldm.train.draws does, or remove it (eval mode turns dropout off)")
        if (batch_size_of(batch) or 0) >= 2:
            def sums(b: Any) -> dict[str, torch.Tensor]:
                return self.clipped_sums(per_example_loss_fn, b, acc_dtype=torch.float64, where=where).sums
            check_independence(sums, batch, self.max_grad_norm, low_precision=low_precision, where=where)

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
                     out: dict[str, torch.Tensor] | None = None,
                     example_mask: torch.Tensor | None = None) -> ChunkResult:
        """Clipped per-example gradient sums of one physical chunk (no noise, no scaling).

        With `out` (name -> accumulator), the sums are added into it in place and returned.
        `example_mask` (B,) bool: rows with False are padding (fixed-shape steps): they run through
        the model like the others but get clipping factor 0 and are not counted."""
        params = self.trainable
        acc = acc_dtype or _acc_dtype(params.values())
        at = f" ({where})" if where else ""
        self._check_running_stats(f"when computing clipped sums{at}")
        self._check_randomness(f"when computing clipped sums{at}")
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
            real = torch.ones(B, dtype=torch.bool, device=loss.device) if example_mask is None \
                else example_mask.to(device=loss.device, dtype=torch.bool)
            if real.shape != (B,):
                raise ValueError(f"example_mask must have shape ({B},), got {tuple(real.shape)}{at}")
            finite = torch.isfinite(loss.detach()) | ~real  # padding rows never count as non-finite
            n_bad = int((~finite).sum())
            if n_bad and self.nonfinite == "raise":
                raise NonFiniteGradientError(
                    f"per-example losses are NaN/inf{at}; refusing to build an update from them (fix the data, "
                    "the model or a diverging lr, or construct the engine with nonfinite='drop' to drop such examples)")
            if n_bad:
                loss = torch.where(finite, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
            if not real.all():
                loss = torch.where(real, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
            if not loss.requires_grad:  # no trainable layer reached the loss: all gradients are 0
                self._reset()
                return ChunkResult(self._zeros(params, acc, out), int(real.sum()), n_bad)
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
            return self._clip_and_sum(params, B, finite, acc, at, out, real)
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

    def _clip_and_sum(self, params, B, finite, acc, at, out=None, real=None) -> ChunkResult:
        sq = torch.zeros(B, dtype=torch.float64 if acc == torch.float64 else torch.float32,
                         device=next(iter(params.values())).device)
        self.methods, self.kernels_used = {}, {}
        units = group_shared_inputs(self.rules) if self.group_shared_inputs else list(self.rules)
        for unit in units:
            unit.used = {}
            s = unit.sqnorm(B, method=self.norm_method, backend=self.backend, selector=self.selector)
            if s is not None:
                sq = sq + s.to(sq.dtype)
        real = torch.ones_like(finite) if real is None else real
        keep = finite & (torch.isfinite(sq) | ~real)  # (B,) padding rows: finite by definition, then masked
        n_drop = int((~keep).sum())
        keep = keep & real
        if n_drop and self.nonfinite == "raise":
            self._reset()
            raise NonFiniteGradientError(
                f"per-example gradients are NaN/inf although their losses are finite{at}; "
                "refusing to build an update from them (or use nonfinite='drop')")
        norms = torch.where(keep, sq, torch.zeros((), dtype=sq.dtype, device=sq.device)).sqrt()  # (B,)
        coef = (self.max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)
        coef = torch.where(keep, coef, torch.zeros((), dtype=coef.dtype, device=coef.device))  # (B,)
        keep_rows = keep if n_drop or not bool(real.all()) else None
        by_id = {id(p): n for n, p in params.items()}
        sums = self._zeros(params, acc, out)
        for unit in units:
            res = unit.clipped_sums(coef, keep_rows, backend=self.backend, selector=self.selector)
            by_rule = res if isinstance(unit, LinearGroup) else {unit: res}
            for rule, part in by_rule.items():
                for attr, s in part.items():
                    if s is not None:
                        sums[by_id[id(rule.trainable[attr])]] += s.to(acc)
                if unit.used:
                    self.kernels_used[rule.name] = dict(unit.used, **({"group": unit.name}
                                                                       if isinstance(unit, LinearGroup) else {}))
                    if "linear_sqnorm" in unit.used:
                        self.methods[rule.name] = unit.used["linear_sqnorm"].split("/")[1]
            unit.reset()  # free A and G as soon as the layer (group) is done
        self.total_dropped += n_drop
        return ChunkResult(sums, int(real.sum()), n_drop)


RANDOM_MODULES = (nn.modules.dropout._DropoutNd, nn.RReLU, nn.MultiheadAttention)


def global_rng_use(m: nn.Module) -> str | None:
    """Why `m`'s forward, in its current mode, draws from torch's global random generator (None: it
    does not). Dropout/Dropout1d/2d/3d/AlphaDropout/FeatureAlphaDropout with p > 0, RReLU with
    lower != upper, nn.MultiheadAttention with dropout > 0 -- each only in training mode."""
    if not m.training:
        return None
    if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
        return f"p={m.p:g}"
    if isinstance(m, nn.RReLU) and m.lower != m.upper:
        return f"random slopes in [{m.lower:g}, {m.upper:g}]"
    if isinstance(m, nn.MultiheadAttention) and m.dropout > 0:
        return f"attention dropout={m.dropout:g}"
    return None


def _named_state(model: nn.Module):
    """(name, tensor) of every parameter and buffer (ZeRO-3 partitioned parameters: their local shard)."""
    for n, p in model.named_parameters():
        yield n, getattr(p, "ds_tensor", p)
    for n, b in model.named_buffers():
        if b is not None:
            yield n, b


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().to("cpu", copy=True) for n, t in _named_state(model)}


def _same(saved: torch.Tensor, now: torch.Tensor) -> bool:
    now = now.detach().cpu()
    return saved.shape == now.shape and saved.dtype == now.dtype and torch.equal(saved, now)


def _global_rng_states(devices) -> dict[str, torch.Tensor]:
    states = {"CPU generator": torch.get_rng_state()}
    for d in devices:
        states[f"CUDA generator of {d}"] = torch.cuda.get_rng_state(d)
    return states


def _set_global_rng_states(states: dict[str, torch.Tensor], devices) -> None:
    torch.set_rng_state(states["CPU generator"])
    for d in devices:
        torch.cuda.set_rng_state(states[f"CUDA generator of {d}"], d)


def _acc_dtype(params) -> torch.dtype:
    """fp64 accumulators for fp64 models (tests), fp32 otherwise (fp16/bf16 models included)."""
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


def clipped_gradient_sum(model: nn.Module, per_example_loss_fn: PerExampleLossFn, batch: Any,
                         max_grad_norm: float, *, norm_method: str = "auto", backend: str = "auto",
                         nonfinite: str = "raise", selector=None) -> dict[str, torch.Tensor]:
    """Noise-free sum over the examples of `batch` of their clipped gradients, for every
    trainable parameter of `model`, by parameter name. `per_example_loss_fn(model, batch)`
    returns (B,); B = 0 gives zeros. Does not modify `param.grad`."""
    engine = BookKeepingEngine(model, max_grad_norm, norm_method=norm_method, backend=backend, nonfinite=nonfinite,
                               selector=selector)
    return engine.clipped_sums(per_example_loss_fn, batch).sums
