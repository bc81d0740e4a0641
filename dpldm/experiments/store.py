"""One experiment folder's results.json: the settings fingerprint, every finished run, provenance.

    {"schema": 2, "experiment": NAME, "settings_sha256": ..., "settings": {...},
     "invocations": [{"command", "commit", "machine", "started"}, ...], "runs": {key: row}, ...}

A folder holds runs of ONE experiment made with ONE set of settings: another experiment or other
settings are refused with the first differing keys named, before anything is computed or written.
Every run is added under a lock (several invocations, e.g. one per core, may fill one folder) by
re-reading the file and replacing it atomically, so an interrupted experiment keeps every run it
finished and the next invocation computes only the missing ones. Written by hand: a dozen lines
of json + flock, nothing a library adds.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from dpldm.errors import UserError
from dpldm.utils.io import atomic_write_text

SCHEMA = 2
RunCheck = Callable[[str, Any, Path], None]  # (key, row, path) -> None or raise UserError


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def settings_diff(old: dict, new: dict) -> str:
    """The first three differing keys, 'a.b: old -> new; ...'."""
    a, b = flatten(old or {}), flatten(new)
    diff = [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}" for k in sorted(set(a) | set(b))
            if a.get(k, "(absent)") != b.get(k, "(absent)")]
    return "; ".join(diff[:3]) + (f"; and {len(diff) - 3} more" if len(diff) > 3 else "")


def check_out_dir(out: Path, flag: str = "--out") -> None:
    """The output folder can be created: no file on its path."""
    for anc in [out.absolute(), *out.absolute().parents]:
        if anc.exists() and not anc.is_dir():
            raise UserError(f"{flag} {out}: cannot use it as the output folder, {anc} is a file")


def empty(experiment: str | None = None) -> dict:
    return {"schema": SCHEMA, "experiment": experiment, "settings_sha256": None, "settings": None,
            "invocations": [], "runs": {}}


def read(path: Path, check_run: RunCheck | None = None, migrate: Callable[[dict, Path], dict] | None = None) -> dict:
    """results.json as a dict (an empty store when absent); a folder, unreadable JSON, an unknown
    schema or a malformed run is refused with the path and what is wrong."""
    if path.exists() and not path.is_file():
        raise UserError(f"{path}: is a folder, not a results file; move it away or use another --out")
    if not path.is_file():
        return empty()
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: not a readable results file ({type(e).__name__}: {e}); move it away or use "
                        "another --out") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a results file (expected a JSON object)")
    if "schema" not in data and migrate is not None:
        data = migrate(data, path)
    if data.get("schema") != SCHEMA or not isinstance(data.get("runs"), dict):
        raise UserError(f"{path}: results schema {data.get('schema')!r} is not understood (expected {SCHEMA} with "
                        "a 'runs' object)")
    data.setdefault("invocations", [])
    data.setdefault("experiment", None)
    for key, row in data["runs"].items():
        if not isinstance(row, dict):
            raise UserError(f"{path}: run {key!r} is not a run (expected a JSON object, got {type(row).__name__}); "
                            "fix or remove the run, or use another --out")
        if check_run is not None:
            check_run(key, row, path)
    return data


def check_compatible(data: dict, experiment: str | None, settings: dict, sha: str, path: Path) -> None:
    """A results file holds runs of one experiment and one settings fingerprint: refuse to mix."""
    held = data.get("experiment")
    if experiment is not None and held is not None and held != experiment:
        raise UserError(f"{path} holds the {held!r} experiment, not {experiment!r}; use another --out "
                        "(nothing was changed)")
    if data.get("settings_sha256") in (None, sha):
        return
    raise UserError(f"{path} holds runs made with other settings ({settings_diff(data.get('settings'), settings) or 'settings differ'}); "
                    "use another --out (nothing was changed)")


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    with open(folder / ".results.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def git_commit() -> str | None:
    """HEAD of the checkout dpldm runs from, '+dirty' when it has uncommitted changes; None outside git."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or ""
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def invocation(command: list[str] | None = None) -> dict[str, Any]:
    return {"command": " ".join(command if command is not None else [Path(sys.argv[0]).name, *sys.argv[1:]]),
            "commit": git_commit(), "machine": machine(),
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


class ResultStore:
    """results.json in `out` for one experiment and one set of settings.

    store = ResultStore(out, "mia", settings).open()   # refuses another experiment / other settings
    if key not in store.runs: store.record(key, row)
    """

    def __init__(self, out: str | Path, experiment: str, settings: dict, *, check_run: RunCheck | None = None,
                 migrate: Callable[[dict, Path], dict] | None = None, extra: dict | None = None) -> None:
        self.out = Path(out)
        self.path = self.out / "results.json"
        self.experiment = experiment
        self.settings = json.loads(json.dumps(settings))  # plain JSON values only
        self.sha = fingerprint(self.settings)
        self.check_run, self.migrate = check_run, migrate
        self.extra = dict(extra or {})  # top-level fields rewritten with every record (e.g. ablation_specs)
        self.data: dict = empty(experiment)

    @property
    def runs(self) -> dict[str, dict]:
        return self.data["runs"]

    def _read(self) -> dict:
        data = read(self.path, self.check_run, self.migrate)
        check_compatible(data, self.experiment, self.settings, self.sha, self.path)
        return data

    def check(self) -> "ResultStore":
        """Refuse a foreign folder (another experiment, other settings, a broken file); writes nothing."""
        check_out_dir(self.out)
        self._read()
        return self

    def open(self, command: list[str] | None = None) -> "ResultStore":
        """Refuse a foreign folder before anything is written; then create it and log this invocation."""
        self.check()
        self.out.mkdir(parents=True, exist_ok=True)
        self._update(None, None, invocation(command))
        return self

    def record(self, key: str, row: dict) -> dict:
        """Add one finished run (re-read under the lock, atomic replace); returns the whole store."""
        return self._update(key, row, None)

    def _update(self, key: str | None, row: dict | None, inv: dict | None) -> dict:
        with locked(self.out):
            data = self._read()
            data.update(schema=SCHEMA, experiment=self.experiment, settings_sha256=self.sha, settings=self.settings,
                        **self.extra)
            if inv is not None:
                data["invocations"].append(inv)
            if key is not None:
                data["runs"][key] = json.loads(json.dumps(row))
            atomic_write_text(self.path, json.dumps(data, indent=2) + "\n")
            self.data = data
            return data
