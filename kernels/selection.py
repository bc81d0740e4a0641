"""Kernel selection by measurement: the `selector=` of registry.select and of the DP engine.

    sel = KernelSelector(physical_batch_size=256, cache_path=run_dir / "kernels.json")
    engine = BookKeepingEngine(model, C, backend="auto", selector=sel)
    ...first chunk...
    print(sel.summary())          # once: one line per layer shape, the choice and every time

For each distinct key (op, public layer shape (T, d_in, d_out, bias) or (N, C), the CONFIGURED
physical batch size P -- capped at the number of private examples N by `cap_rows(N)`: a chunk never
holds more --, dtype, device type, restriction) the candidates that can run are timed
on synthetic random tensors of that shape (P examples; never the private batch, and never the
realised chunk size, which is private), after `warmup` untimed calls, `repeats` times,
synchronised on CUDA; the median is kept and the fastest candidate wins. The choice is kept in
memory and in `cache_path` (JSON, written atomically after each new key) and reloaded from it:
a resumed run keeps the choices it made (different implementations agree only up to rounding,
so a choice never changes within a run). A cached choice that cannot run on this machine is an
error naming the file, not a silent re-measurement.

Candidates that would allocate more than `max_bytes` (the torch materialise path holds
P*d_out*d_in floats; default: half the free GPU memory, 1 GiB on CPU) are skipped, and a
candidate that raises (e.g. out of memory) is skipped; both are stated in the summary.

Private runs (dpldm.train.dp_finetune): free GPU memory and kernel times must not depend on
private data, so the trainer calls `pin_budget(device)` before any private data exists (free
memory read once, then reused), measures every key in one discarded pass of a PUBLIC batch at
set-up (`DPStep.probe`), and then `freeze()`s the selector: a key first asked for after that
raises SelectionFrozenError instead of timing kernels while a private chunk is on the device.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from dpldm.errors import InputError

from .dispatch import BackendUnavailableError
from .registry import Impl, LinearShape, NormShape, bytes_estimate, impls

CACHE_VERSION = 1


class KernelCacheError(InputError, ValueError):
    """The kernel-selection cache file of a run cannot be read (one line, names the file)."""


class SelectionFrozenError(RuntimeError):
    """A kernel choice was asked for a key not measured at set-up, after `freeze()` (a bug: the
    public set-up pass must meet every layer shape that private chunks meet)."""


@dataclass
class Choice:
    """One measured key: the winner and every candidate's median time (ms) or why it was skipped."""

    key: str
    choice: str
    times_ms: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    device_name: str = ""

    def line(self) -> str:
        times = ", ".join(f"{n} {t:.3g} ms" for n, t in sorted(self.times_ms.items(), key=lambda kv: kv[1]))
        skip = "".join(f"; {n} skipped: {why}" for n, why in self.skipped.items())
        return f"{self.key}: {self.choice} ({times or 'chosen elsewhere, loaded'}{skip})"


class KernelSelector:
    """Times the candidate implementations once per public shape key and keeps the fastest.

    physical_batch_size: the configured physical batch P (public); the synthetic tensors have P
    examples whatever the realised chunk size is. cache_path: JSON file (atomic writes), or None
    (memory only). repeats / warmup: timed and untimed calls per candidate. log: called with one
    line per newly measured key (e.g. print); `summary()` gives all of them."""

    def __init__(self, physical_batch_size: int, *, cache_path: str | Path | None = None, repeats: int = 3,
                 warmup: int = 1, max_bytes: int | None = None, log: Callable[[str], None] | None = None,
                 seed: int = 0) -> None:
        if not (isinstance(physical_batch_size, int) and physical_batch_size > 0):
            raise ValueError(f"physical_batch_size must be a positive int, got {physical_batch_size!r}")
        if not (isinstance(repeats, int) and repeats >= 1) or not (isinstance(warmup, int) and warmup >= 0):
            raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats!r}, {warmup!r}")
        self.P = physical_batch_size
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self.repeats, self.warmup, self.max_bytes, self.log, self.seed = repeats, warmup, max_bytes, log, seed
        self.choices: dict[str, Choice] = {}
        self._impl_cache: dict[str, Impl] = {}
        self._pinned: dict[str, int] = {}  # device -> memory budget read once by pin_budget()
        self.frozen: str | None = None  # why no new key may be measured (set by freeze())
        if self.cache_path is not None and self.cache_path.exists():
            self._load()

    # -- cache ---------------------------------------------------------------------------------------
    def _load(self) -> None:
        path = self.cache_path
        try:
            data = json.loads(path.read_text())
            if data.get("version") != CACHE_VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {CACHE_VERSION}")
            for key, e in data["choices"].items():
                self.choices[key] = Choice(key, e["choice"], dict(e.get("times_ms", {})), dict(e.get("skipped", {})),
                                           e.get("device_name", ""))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise KernelCacheError(f"kernel selection cache {path} is unreadable ({type(e).__name__}: {e}); "
                                   "delete it to measure again") from None

    def _save(self) -> None:
        if self.cache_path is None:
            return
        from dpldm.utils.io import atomic_write_text

        data = {"version": CACHE_VERSION, "physical_batch_size": self.P,
                "choices": {k: {"choice": c.choice, "times_ms": c.times_ms, "skipped": c.skipped,
                                "device_name": c.device_name} for k, c in self.choices.items()}}
        atomic_write_text(self.cache_path, json.dumps(data, indent=1, sort_keys=True) + "\n")

    # -- keys ----------------------------------------------------------------------------------------
    def key(self, op: str, device: torch.device, dtype: torch.dtype, shape, restrict: str = "") -> str:
        """Public-only key: op, layer shape, configured P, dtype, device type, restriction."""
        if isinstance(shape, LinearShape):
            s = f"T={shape.T} d_in={shape.d_in} d_out={shape.d_out} bias={int(shape.bias)}"
        elif isinstance(shape, NormShape):
            s = f"N={shape.N} C={shape.C}"
        else:
            raise ValueError(f"the selector needs a LinearShape or NormShape for {op}, got {shape!r}")
        dt = str(dtype).replace("torch.", "")
        return f"{op} {s} P={self.P} {dt} {device.type}" + (f" {restrict}" if restrict else "")

    # -- the choice ----------------------------------------------------------------------------------
    def choose(self, op: str, device: torch.device, dtype: torch.dtype, shape, candidates: list[Impl],
               restrict: str = "") -> tuple[Impl, str]:
        """(fastest candidate, reason); measured on the first call for a key, then cached."""
        key = self.key(op, device, dtype, shape, restrict)
        if key in self._impl_cache:
            return self._impl_cache[key], f"measured: {self.choices[key].line()}"
        by_name = {c.name: c for c in candidates}
        if key in self.choices:  # from the cache file (a resumed run) or an earlier engine
            name = self.choices[key].choice
            impl = by_name.get(name) or next((i for i in impls(op) if i.name == name), None)
            why = "not a registered implementation" if impl is None else impl.why_not(device, dtype)
            if why is not None:
                where = f" cached in {self.cache_path}" if self.cache_path else ""
                raise BackendUnavailableError(
                    f"kernel choice {name!r} for '{key}'{where} cannot run here ({why}); the run must keep its "
                    "kernel choices (results differ by rounding between implementations): run it where that "
                    "backend exists, or delete the cache file to measure again")
            self._impl_cache[key] = impl
            return impl, f"cached: {self.choices[key].line()}"
        if self.frozen is not None:
            raise SelectionFrozenError(
                f"kernel selection for '{key}' asked after the selector was frozen ({self.frozen}): measuring now "
                "would time kernels and read free GPU memory beside private data; every public layer shape must "
                "be measured at set-up (a dpldm bug: please report it)")
        choice = self._measure(key, op, device, dtype, shape, candidates)
        self.choices[key] = choice
        self._impl_cache[key] = by_name[choice.choice]
        self._save()
        if self.log is not None:
            self.log(f"kernel selection: {choice.line()}")
        return by_name[choice.choice], f"measured: {choice.line()}"

    def cap_rows(self, num_examples: int) -> int:
        """Measure at P = min(P, num_examples) rows from now on, and return that P. A physical chunk never
        holds more than the N private examples (N is public: the accountant and the run's log use it), so
        timing more rows only costs time and memory: privacy.physical_batch_size=200000 on N = 40 timed
        every candidate at 200,000 rows (2.6-10 s and 6-12 GB each). The trainer calls it once N is known,
        before the set-up probe measures anything; the keys then name the capped P (the same on a resume,
        which must read the same data)."""
        if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
            raise ValueError(f"num_examples must be a positive int, got {num_examples!r}")
        self.P = min(self.P, num_examples)
        return self.P

    def pin_budget(self, device: torch.device) -> int:
        """Read the memory budget of `device` now (free GPU memory: call it before any private data
        is on the device) and use that number for every later measurement on it."""
        device = torch.device(device)
        self._pinned.pop(_dev_key(device), None)
        self._pinned[_dev_key(device)] = self._budget(device)
        return self._pinned[_dev_key(device)]

    def freeze(self, why: str = "set-up is over") -> None:
        """No new key may be measured from now on (cached and measured keys keep working)."""
        self.frozen = why

    def _budget(self, device: torch.device) -> int:
        if self.max_bytes is not None:
            return self.max_bytes
        if _dev_key(device) in self._pinned:
            return self._pinned[_dev_key(device)]
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return free // 2
        return 1 << 30

    def _measure(self, key, op, device, dtype, shape, candidates) -> Choice:
        args = synthetic_inputs(op, self.P, shape, dtype, device, self.seed)
        budget = self._budget(device)
        times, skipped = {}, {}
        for impl in candidates:
            need = bytes_estimate(impl, self.P, shape)
            if need > budget:
                skipped[impl.name] = f"needs ~{need / 2**20:.0f} MiB > budget {budget / 2**20:.0f} MiB"
                continue
            try:
                times[impl.name] = 1e3 * time_call(impl.fn, args, device, self.repeats, self.warmup)
            except Exception as e:  # noqa: BLE001 - a candidate that cannot run is skipped, with the reason
                skipped[impl.name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if not times:
            raise RuntimeError(f"kernel selection for '{key}': no candidate ran ({skipped})")
        best = min(times, key=times.get)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        return Choice(key, best, times, skipped, name)

    # -- report --------------------------------------------------------------------------------------
    def summary(self) -> str:
        """One line per key: the choice and the candidates' median times (ms)."""
        if not self.choices:
            return "kernel selection: nothing measured yet"
        return "\n".join(f"kernel selection: {c.line()}" for c in self.choices.values())

    def state_dict(self) -> dict[str, str]:
        """{key: chosen implementation}: what another rank needs to make the same choices."""
        return {k: c.choice for k, c in self.choices.items()}

    def load_state_dict(self, state: dict[str, str], replace: bool = False) -> None:
        """Adopt choices made elsewhere (e.g. rank 0's, broadcast), so every rank runs the same
        kernels; keys already chosen here must agree, unless `replace` (set-up, before anything was
        computed with them: the other choice wins). Saved to cache_path like measured ones."""
        for key, name in state.items():
            if replace and key in self.choices and self.choices[key].choice != name:
                self.choices[key] = Choice(key, name)
                self._impl_cache.pop(key, None)
            if key in self.choices and self.choices[key].choice != name:
                raise ValueError(f"kernel choice for '{key}' is {self.choices[key].choice!r} here, {name!r} in the "
                                 "state to load: a run keeps its kernel choices")
            if key not in self.choices:
                self.choices[key] = Choice(key, name)
        self._save()


def _dev_key(device: torch.device) -> str:
    """'cuda:N' for a CUDA device (the current one when no index is given), else the type."""
    if device.type == "cuda":
        return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    return device.type


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, args, device: torch.device, repeats: int, warmup: int, min_group_s: float = 1e-3) -> float:
    """Median seconds per call of fn(*args): `warmup` untimed calls, then `repeats` timed groups,
    each of n back-to-back calls closed by one synchronisation, n chosen (<= 100) so that a group
    lasts >= min_group_s: kernels of a few microseconds are not timed by the launch and sync cost."""
    for _ in range(warmup):
        fn(*args)
    _sync(device)
    t0 = time.perf_counter()
    fn(*args)
    _sync(device)
    one = time.perf_counter() - t0
    n = max(1, min(100, int(min_group_s / max(one, 1e-7))))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn(*args)
        _sync(device)
        ts.append((time.perf_counter() - t0) / n)
    return statistics.median(ts)


def synthetic_inputs(op: str, P: int, shape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> tuple:
    """Random inputs of the public shape (P examples); never private data."""
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype)

    if op in ("linear_sqnorm", "linear_clipped_sum"):
        A, G = r(P, shape.T, shape.d_in), r(P, shape.T, shape.d_out)
        if op == "linear_sqnorm":
            return A, G, None, shape.bias
        coef = torch.rand(P, generator=g).to(device=device, dtype=torch.float32)
        return A, G, coef, None, shape.bias
    if op == "norm_affine_grads":
        return r(P, shape.N, shape.C), r(P, shape.N, shape.C)
    raise ValueError(f"no synthetic inputs for op {op!r}")
