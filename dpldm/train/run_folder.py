"""The run folder of a DP fine-tuning run: one owner at a time, writable, and how a run is asked to stop.

* `RunFolderLock`: an exclusive `flock` on `<out>/.lock` (held by rank 0 for the whole run; the
  kernel drops it when the process dies, so a killed run never leaves a stale lock). A second
  trainer on the same folder exits at once with a RunFolderError naming the holder's pid.
* `check_writable`: `--out` that is a file, or a folder that cannot be written, is refused before
  anything is computed.
* `check_resumable`: an explicit `--resume` (`dpldm finetune --resume`, `launch/train.py --resume`)
  on a folder that does not exist or holds no step checkpoint is refused, before the folder is
  touched: silently starting a new run there would begin again with a full privacy budget.
  (`launch/train.py --resume auto`, its default, continues when there is a checkpoint and starts a
  new run otherwise.)
* `StopRequest`: SIGTERM / SIGUSR1 (SLURM preemption) / SIGINT (Ctrl-C), or a file named STOP in
  the run folder: finish the current logical step, write a checkpoint, exit 0 and say how to
  resume. A second SIGINT/SIGTERM stops at once (a launcher tearing down ranks whose peer died
  must not wait for a collective), unless it comes within COALESCE_S of the first: `scancel`
  reaches a rank both from slurmstepd (every process of the job) and from torchrun / DeepSpeed's
  launcher forwarding its own SIGTERM, milliseconds apart; that is one request, not two.
"""
from __future__ import annotations

import errno
import fcntl
import os
import signal
import time
from pathlib import Path

from dpldm.errors import RunFolderError

STOP_FILE = "STOP"
LOCK_FILE = ".lock"


def check_writable(run_dir: Path) -> None:
    """Create `run_dir` if needed and prove it can be written (a file, then removed)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"--out {run_dir}: exists and is not a folder")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise RunFolderError(f"--out {run_dir}: cannot write there ({os.strerror(e.errno or errno.EIO)})") from None


def check_resumable(run_dir: Path) -> None:
    """An explicit resume: `run_dir` must be a folder holding at least one step checkpoint."""
    from dpldm.checkpoint import list_step_checkpoints

    if not run_dir.exists():
        raise RunFolderError(f"--resume: {run_dir} does not exist, so there is no run to continue (a new run would start "
                             "with a full privacy budget); check --out, or drop --resume to start a new run")
    if not run_dir.is_dir():
        raise RunFolderError(f"--resume: {run_dir} exists and is not a folder")
    if not list_step_checkpoints(run_dir):
        raise RunFolderError(f"--resume: {run_dir} holds no step checkpoint (checkpoints/step_*), so there is no run to "
                             "continue; check --out, or drop --resume to start a new run there")


class RunFolderLock:
    """Exclusive, non-blocking lock on `<run_dir>/.lock`, which exists only while a run holds it:
    `release()` unlinks it, then unlocks (so a finished or failed run leaves the folder as it
    was). A process that locked a file another one had just unlinked notices (the path no longer
    names its inode) and tries again, so two runs can never both hold the folder."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "RunFolderLock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise RunFolderError(f"--out {self.path.parent}: in use by another dpldm run ({holder}); wait for it, "
                                     "stop it (a STOP file or SIGTERM checkpoints it), or pick another --out") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # locked a file its holder had just removed: try the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class StopRequest:
    """Signals that ask the run to stop after the current logical step (see module docstring)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    COALESCE_S = 3.0  # a repeat within this many seconds is the same request delivered twice

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._first_at: float | None = None
        self._old: dict[int, object] = {}
        for sig in self.SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except (ValueError, OSError):  # not the main thread (tests): stop by STOP file only
                pass

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        now = time.monotonic()
        if self.signal_name is not None and signum in (signal.SIGINT, signal.SIGTERM):
            if now - self._first_at < self.COALESCE_S:
                return  # the same stop, delivered by two launchers
            self.restore()  # the second one: default behaviour, now
            signal.raise_signal(signum)
            return
        self.signal_name = signal.Signals(signum).name
        self._first_at = now

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
