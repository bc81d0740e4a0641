"""CPU thread count for the evaluation's long CPU loops (Inception features, the small CNN).

On a CPU that other processes keep busy, torch's OpenMP threads wait on each other: on the
shared 2-core machines (load average ~7) one thread ran Inception at 2.9 images/s and two at
0.9; an epoch of the small CNN took 2.9 s with one thread and 13.4 s with two. On an idle
machine two threads win. So we time the real work: after one warm-up unit (a batch), a few
units run with torch's thread setting and a few with one thread, the faster rate wins, and the
choice is re-checked every `reprobe` units. `DPLDM_EVAL_THREADS=N` forces N threads. Only CPU
work is tuned; the user's thread setting is restored when the loop ends.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Iterator, Optional

import torch


class ThreadTuner:
    """Chooses between torch's thread count and 1 thread by measured items per second."""

    def __init__(self, window: int = 1, reprobe: int = 40, base: Optional[int] = None):
        self.window, self.reprobe = window, reprobe
        self.base = base if base is not None else torch.get_num_threads()
        forced = os.environ.get("DPLDM_EVAL_THREADS")
        self.forced = max(1, int(forced)) if forced else None
        self.candidates = [self.base, 1] if self.base > 1 else [self.base]
        self.warm = False
        self._reset()

    def _reset(self) -> None:
        self.stats = {c: [0.0, 0] for c in self.candidates}  # seconds, items
        self.units = {c: 0 for c in self.candidates}
        self.best: Optional[int] = None
        self.since = 0

    def choose(self) -> int:
        if self.forced is not None:
            return self.forced
        if len(self.candidates) == 1:
            return self.candidates[0]
        if not self.warm:
            return self.base
        if self.best is not None:
            if self.since < self.reprobe:
                return self.best
            self._reset()
        for c in self.candidates:
            if self.units[c] < self.window:
                return c
        return self.base  # unreachable: `record` sets best once all windows are full

    def record(self, threads: int, seconds: float, items: int) -> None:
        if self.forced is not None or len(self.candidates) == 1:
            return
        if not self.warm:
            self.warm = True
            return
        if self.best is not None:
            self.since += 1
            return
        if threads in self.stats:
            self.stats[threads][0] += seconds
            self.stats[threads][1] += items
            self.units[threads] += 1
        if all(self.units[c] >= self.window for c in self.candidates):
            rate = {c: s[1] / max(s[0], 1e-9) for c, s in self.stats.items()}
            self.best = max(self.candidates, key=lambda c: rate[c])

    @contextlib.contextmanager
    def unit(self, items: int) -> Iterator[int]:
        """Run one unit of work with the chosen thread count and time it."""
        n = self.choose()
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        t0 = time.perf_counter()
        yield n
        self.record(n, time.perf_counter() - t0, items)


@contextlib.contextmanager
def restore_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


_TUNERS: dict[str, ThreadTuner] = {}


def shared_tuner(key: str, **kwargs) -> ThreadTuner:
    """A process-wide tuner (e.g. one for Inception on CPU), so short calls still get tuned."""
    base = torch.get_num_threads()
    tuner = _TUNERS.get(key)
    if tuner is None or tuner.base != base:
        tuner = _TUNERS[key] = ThreadTuner(base=base, **kwargs)
    return tuner
