"""What every bad-input table shares: run a CLI entry point in-process as the interpreter would
(an escaping exception becomes its traceback on stderr and exit code 1), and hash a file or folder
tree so a row can assert that nothing was created, changed or removed."""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import traceback
from pathlib import Path
from typing import Callable

import torch


def run_in_process(fn: Callable[[list[str]], int], argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `fn(argv)`; torch's thread count is put back afterwards."""
    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = fn(argv)
    except SystemExit as e:  # argparse
        code = e.code
    except Exception:  # noqa: BLE001 - what the interpreter would print
        err.write(traceback.format_exc())
        code = 1
    finally:
        torch.set_num_threads(threads)
    return code, out.getvalue(), err.getvalue()


def tree_hash(path: str | Path) -> str:
    """sha256 over the names (relative to the parent of `path`), link targets and bytes of `path`
    and everything below it."""
    path = Path(path)
    h = hashlib.sha256()
    for p in [path, *sorted(path.rglob("*"))] if path.is_dir() else [path]:
        h.update(str(p.relative_to(path.parent)).encode() + b"\0")
        if p.is_symlink():
            h.update(b"->" + os.readlink(p).encode())
        elif p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()
