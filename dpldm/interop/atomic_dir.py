"""A folder written atomically: built under a hidden temporary name beside it, renamed into place.

(Belongs with the file version in dpldm.utils.io; kept here until that module takes it.)
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from dpldm.errors import UserError


@contextlib.contextmanager
def atomic_dir(dest: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces `dest` (which must not exist unless
    `overwrite`; a file there is never replaced). On error the temporary folder is removed and
    `dest` is untouched."""
    dest = Path(dest).absolute()
    if dest.exists() and not dest.is_dir():
        raise UserError(f"{dest}: is a file, not a folder")
    if dest.exists() and not overwrite:
        raise UserError(f"{dest}: already exists; pass --overwrite to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        old = None
        if dest.exists():  # move the old folder aside first: a crash leaves it whole, under .NAME.*.old
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
            os.replace(dest, old / dest.name)
        os.replace(tmp, dest)
        from dpldm.utils.io import fsync_dir

        fsync_dir(dest.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
