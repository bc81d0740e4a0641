"""The append-only privacy journal of a DP run: every executed noisy step, fsynced before anything
from that step is released (hand-written: no library keeps one).

    <out>/privacy_journal.jsonl    one line per EXECUTED logical step, in execution order:
        {"step": s, "execution": e, "noise_multiplier": sigma, "sample_rate": q}

A checkpoint records the state after step k; the journal records what was spent. When a run resumes
from an older checkpoint (its newest one was corrupt, or the process died between a released step
and its checkpoint), the steps after k are executed again, and the journal keeps both executions.
Each executed step index s is then accounted with its execution count r_s: the r_s releases all use
the same Poisson sample (a pure function of the secret seed and s) and each has sensitivity C, so
together they are one subsampled Gaussian mechanism with noise multiplier sigma / sqrt(r_s) (Gaussian
mechanisms compose exactly in quadrature, and Poisson subsampling acts once on the composed
mechanism). `PrivacyLedger.extra_executions` carries the executions beyond one per step, so the
epsilon reported covers every step ever executed.

Nothing here depends on the realised batch: the lines hold public numbers only (no time, no size).
A line cut short by a crash is the last one and its step released nothing (the append is fsynced
before any release), so it is dropped with a warning; any other bad line is an error naming the
file and the line.
"""
from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from pathlib import Path

from dpldm.errors import RunFolderError

JOURNAL = "privacy_journal.jsonl"


class JournalError(RunFolderError):
    """The privacy journal cannot be read or does not match the run."""


class PrivacyJournal:
    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / JOURNAL

    def exists(self) -> bool:
        return self.path.is_file()

    def append(self, step: int, execution: int, noise_multiplier: float, sample_rate: float) -> None:
        """Record one executed step; returns only once the line is on disk (fsync)."""
        line = json.dumps({"step": int(step), "execution": int(execution), "noise_multiplier": float(noise_multiplier),
                           "sample_rate": float(sample_rate)}, sort_keys=True) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def records(self) -> list[dict]:
        """Every complete record, validated (JournalError naming the line otherwise)."""
        if not self.exists():
            return []
        raw = self.path.read_bytes().decode("utf-8", errors="replace")
        lines = raw.split("\n")
        torn = lines.pop() if lines else ""  # text after the last newline: a write cut short
        if torn.strip():
            warnings.warn(f"{self.path}: dropping an incomplete last line ({torn[:60]!r}): a crash during its write, "
                          "before anything from that step was released", stacklevel=2)
        out = []
        for no, text in enumerate(lines, 1):
            try:
                rec = json.loads(text)
                ok = (isinstance(rec, dict) and set(rec) == {"step", "execution", "noise_multiplier", "sample_rate"}
                      and all(isinstance(rec[k], int) and not isinstance(rec[k], bool) and rec[k] >= 1
                              for k in ("step", "execution"))
                      and all(isinstance(rec[k], (int, float)) and rec[k] > 0
                              for k in ("noise_multiplier", "sample_rate")))
            except json.JSONDecodeError:
                ok = False
            if not ok:
                raise JournalError(f"{self.path}, line {no}: not a privacy journal record ({text[:80]!r}); the journal "
                                   "is append-only and written by dpldm alone: restore it, or start a new run")
            out.append(rec)
        return out

    def executions(self, noise_multiplier: float, sample_rate: float) -> Counter:
        """Executions per step index; refuses records of another mechanism (sigma, q)."""
        counts: Counter = Counter()
        for rec in self.records():
            if (abs(rec["noise_multiplier"] - noise_multiplier) > 1e-12 * noise_multiplier
                    or abs(rec["sample_rate"] - sample_rate) > 1e-12 * sample_rate):
                raise JournalError(f"{self.path}: step {rec['step']} was executed with sigma {rec['noise_multiplier']}, "
                                   f"q {rec['sample_rate']}, but this run has sigma {noise_multiplier}, q {sample_rate}")
            counts[rec["step"]] += 1
        return counts


def extra_executions(counts: Counter, steps_done: int) -> dict[int, int]:
    """Executions beyond one per step 1..steps_done (the checkpoint's own) and beyond zero after it:
    what a resume from a checkpoint at `steps_done` must add to its ledger. Refuses a journal that
    lacks a step the checkpoint has done (it would under-count)."""
    missing = [s for s in range(1, steps_done + 1) if counts.get(s, 0) < 1]
    if missing:
        raise JournalError(f"the privacy journal lacks step(s) {missing[:5]}{'...' if len(missing) > 5 else ''} that "
                           f"the checkpoint (step {steps_done}) has done: it is not this run's journal")
    extra = {s: n - (1 if s <= steps_done else 0) for s, n in counts.items()}
    return {s: n for s, n in sorted(extra.items()) if n > 0}
