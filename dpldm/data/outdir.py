"""What an output shard folder (`--out` of `dpldm data import|encode`) may be, checked before any
work starts, and one-line errors for failures while writing.

`check_output_folder(out, inputs)` refuses, without touching anything:
  * `out` that is an existing file (or lies under one);
  * `out` equal to, inside, or containing one of the inputs (`--source`, `--shards`, ...):
    `--overwrite` there would delete the input;
  * an existing, non-empty `out` that dpldm did not write (no dpldm manifest.json or
    .progress.json): dpldm only ever deletes what its own records list;
  * `out` (or, when it does not exist yet, the folder it would be created in) where a file
    cannot be created: a probe file is created and removed (this works for root too, where
    permission bits say nothing, and on read-only file systems).

`writing(path)` turns an OSError (ENOSPC, EDQUOT, EFBIG, EACCES, EROFS, ...) into an OutputError
naming the path; the folder stays unmarked (no manifest.json), finished shards stay as progress.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

from dpldm.data.errors import OutputError

MANIFEST = "manifest.json"
PROGRESS = ".progress.json"
# temporary files of our own atomic writes (dpldm.utils.io.atomic_path: ".<name>.<random>.tmp")
_OUR_TMP = re.compile(r"^\.(shard-\d{6}\.tar|manifest\.json|index\.json|\.progress\.json)\..+\.tmp$")

Inputs = Sequence[tuple[str, "str | Path | None"]]  # (flag, path) pairs; None entries are skipped


def is_our_tmp(name: str) -> bool:
    return bool(_OUR_TMP.match(name))


def read_record(out: Path) -> dict[str, Any] | None:
    """The dpldm record of a folder: manifest.json, else .progress.json (None when neither exists).
    A manifest.json that dpldm did not write is refused."""
    for name in (MANIFEST, PROGRESS):
        path = out / name
        if not path.is_file():
            continue
        try:
            rec = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            rec = None
        if not isinstance(rec, dict) or not isinstance(rec.get("fingerprint"), dict):
            raise OutputError(f"{path}: not a manifest written by dpldm; choose a new or empty folder for --out "
                              "(dpldm does not replace files it did not write)")
        return rec
    return None


def owned_names(record: dict[str, Any] | None) -> set[str]:
    """The shard files a dpldm record says dpldm wrote (or was about to write) in its folder."""
    if not record:
        return set()
    names = {str(s.get("name")) for s in record.get("shards", []) if isinstance(s, dict) and s.get("name")}
    return names | {str(n) for n in record.get("reserved", [])}


def _relation(out: Path, inp: Path, flag: str = "--out", what: str = "the input") -> str | None:
    from dpldm.utils.io import resolve_path

    o, i = resolve_path(out, flag), resolve_path(inp, what)
    if o == i:
        return "is"
    if i in o.parents:
        return "inside"
    if o in i.parents:
        return "contains"
    return None


def check_not_input(out: str | Path, inputs: Inputs, flag: str = "--out") -> None:
    out = Path(out)
    for what, inp in inputs:
        if inp is None or not Path(inp).exists():
            continue
        rel = _relation(out, Path(inp), flag, what)
        if rel == "is":
            raise OutputError(f"{flag} {out} is the input {what} itself: refusing to write into (or --overwrite) "
                              "the input; choose another folder")
        if rel == "inside":
            raise OutputError(f"{flag} {out} lies inside the input {what} {inp}: choose a folder outside it")
        if rel == "contains":
            raise OutputError(f"{flag} {out} contains the input {what} {inp}: choose a folder that does not "
                              "hold the input")


def check_writable(out: Path, flag: str = "--out") -> None:
    """Create and remove a probe file in `out`, or in the nearest existing folder above it."""
    where = out
    while not where.exists():
        if where.parent == where:
            break
        where = where.parent
    if not where.is_dir():
        raise OutputError(f"{flag} {out}: cannot create it, {where} is a file")
    try:
        fd, probe = tempfile.mkstemp(prefix=".dpldm-write-probe-", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{flag} {out}: cannot write in {where} ({e.strerror or e})") from None


def check_output_folder(out: str | Path, inputs: Inputs = (), flag: str = "--out") -> dict[str, Any] | None:
    """Every check of the module doc; returns the folder's dpldm record (None for a new folder)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{flag} {out} is a file, not a folder: choose a folder path")
    check_not_input(out, inputs, flag)
    record = None
    if out.is_dir():
        record = read_record(out)
        if record is None:
            try:
                foreign = sorted(p.name for p in out.iterdir() if not is_our_tmp(p.name))
            except OSError as e:
                raise OutputError(f"{flag} {out}: cannot list it ({e.strerror or e})") from None
            if foreign:
                raise OutputError(f"{flag} {out} is not empty and was not written by dpldm (it holds {foreign[0]!r}"
                                  f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}); choose a new "
                                  "or empty folder (--overwrite only replaces dpldm's own shard folders)")
    check_writable(out, flag)
    return record


_WHY = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file size limit reached",
        errno.EACCES: "permission denied", errno.EROFS: "read-only file system", errno.EPERM: "not permitted"}


@contextlib.contextmanager
def writing(path: str | Path, folder: str | Path | None = None) -> Iterator[None]:
    """OSError while writing `path` -> one-line OutputError naming it (the folder stays incomplete)."""
    try:
        yield
    except OSError as e:
        why = _WHY.get(e.errno, "")
        detail = f"{why}: {e.strerror}" if why and e.strerror else (e.strerror or str(e))
        keep = f"; {folder} is left incomplete (no manifest.json): free space or fix permissions, then " \
               "rerun the same command to continue" if folder is not None else ""
        raise OutputError(f"{path}: cannot write ({detail}){keep}") from None
