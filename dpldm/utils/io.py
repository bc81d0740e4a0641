"""Atomic writes: a temporary file (or folder) in the same folder, fsync, then rename.

A reader never sees a half-written checkpoint, shard, report or exported model; a crash leaves
the old one.

Modes: released files follow the user's umask (the temporary is created with 0666 / 0777 and the
kernel applies the umask, as for any `open`), so a shared model folder is as readable as the
user's other files. Only files that hold secrets pass `mode=0o600` (a private run's step
checkpoints, with its sampling and diffusion seeds: dpldm.checkpoint).

Output folders (`atomic_dir`): every folder dpldm writes through it gets a marker file
`.dpldm-output.json` naming its kind ("diffusers-export", "png-samples", "dpldm-model") and the
files it holds. `--overwrite` replaces only such a folder, of the same kind, holding nothing
else; never a folder without the marker (the user's own files), an input of the command or a
folder that contains one, the working directory or a folder above it, `/` or `$HOME` (or a
folder above it). Each refusal is one line naming the path and why, before anything is written.
An output FILE (`check_output_file`) never lands on an input or on a file inside an input folder.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

from dpldm.errors import UserError

MARKER = ".dpldm-output.json"
FILE_MODE = 0o666  # before the umask
DIR_MODE = 0o777
Inputs = Sequence[tuple[str, "str | Path | None"]]  # (flag, path) pairs of what the command reads


def _unique(parent: Path, prefix: str, suffix: str, make: Callable[[Path], None]) -> Path:
    """Create a new entry `parent/prefix<random>suffix` with `make` (which must fail if it exists)."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            make(path)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{parent}: no free temporary name {prefix}*{suffix}")


def _create_file(mode: int) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))

    return make


@contextlib.contextmanager
def atomic_path(path: str | Path, mode: int = FILE_MODE) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it onto `path`.
    The file gets `mode` less the umask (default 0666: what `open` gives); pass 0o600 for secrets."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _unique(path.parent, f".{path.name}.", ".tmp", _create_file(mode))
    try:
        created = os.stat(tmp_path).st_mode & 0o777  # `mode` less the umask
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, created)  # a writer that replaced the file (safetensors makes 0600) gets it back
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def fsync_dir(folder: Path) -> None:
    """Make renames inside `folder` durable (best effort where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes, mode: int = FILE_MODE) -> None:
    with atomic_path(path, mode) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str, mode: int = FILE_MODE) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode)


# -- output folders --------------------------------------------------------------------------------

def _is_within(inner: Path, outer: Path) -> bool:
    """inner == outer or inner lies below outer (both resolved)."""
    return inner == outer or outer in inner.parents


def _listing(folder: Path) -> list[str]:
    """Every entry below `folder` (files, folders, links), as sorted relative POSIX paths."""
    out = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        out += [(rel / n).as_posix() for n in dirs + files]
    return sorted(out)


def read_marker(folder: str | Path) -> dict | None:
    """The marker of a folder dpldm wrote (None when it has none or it is unreadable)."""
    try:
        obj = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return obj if isinstance(obj, dict) and isinstance(obj.get("kind"), str) else None


def write_marker(folder: Path, kind: str) -> None:
    """Record that dpldm wrote `folder` (of `kind`) and every entry it holds."""
    import dpldm

    entries = [e for e in _listing(folder) if e != MARKER]
    (folder / MARKER).write_text(json.dumps({"kind": kind, "written_by": f"dpldm {dpldm.__version__}",
                                             "entries": entries}, indent=1) + "\n", encoding="utf-8")


def resolve_path(path: str | Path, flag: str) -> Path:
    """`Path(path).resolve()`, or one UserError naming `flag` and the path when resolving it runs into a
    loop of symbolic links (Python 3.11 raises RuntimeError there, 3.13 OSError ELOOP)."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError) as e:
        if isinstance(e, OSError) and e.errno != errno.ELOOP:
            raise UserError(f"{flag} {path}: cannot resolve it ({e.strerror or e})") from None
    raise UserError(f"{flag} {path}: a loop of symbolic links (resolving it never reaches a file or folder); "
                    "fix or remove the link, or choose another path")


def model_inputs(checkpoint: str | Path | None, flag: str = "--checkpoint") -> list[tuple[str, Path | None]]:
    """The inputs of a command that reads a model: the folder given and, for a run folder, the
    model folder inside it (`RUN/model`, as dpldm.models.ldm reads it)."""
    if checkpoint is None:
        return []
    return [(flag, Path(checkpoint)), (flag, Path(checkpoint) / "model")]


def check_output_dir(dest: str | Path, kind: str, *, overwrite: bool, inputs: Inputs = (),
                     flag: str = "--out") -> None:
    """Refuse, before any work and without touching anything, a folder `dest` that this command
    may not write (module doc). A new folder, or an empty one, is always fine."""
    shown = f"{flag} {dest}"
    dest = Path(dest)
    absolute = dest.absolute()
    for anc in [absolute, *absolute.parents]:
        if anc.exists() and not anc.is_dir():
            raise UserError(f"{shown}: is a file, not a folder" if anc == absolute
                            else f"{shown}: cannot create it, {anc} is a file")
        if anc.exists():
            break
    real = resolve_path(dest, flag)
    for what, inp in inputs:
        if inp is None or not Path(inp).exists():
            continue
        src = resolve_path(inp, what)
        if real == src:
            raise UserError(f"{shown}: is the input {what} {inp} itself; write elsewhere (an output never replaces "
                            "what the command reads)")
        if real in src.parents:
            raise UserError(f"{shown}: contains the input {what} {inp}; write elsewhere (replacing it would delete "
                            "the input)")
    if not dest.exists():
        return
    cwd, home = Path.cwd().resolve(), Path(os.path.expanduser("~")).resolve()
    if _is_within(cwd, real):
        raise UserError(f"{shown}: is the working directory{' or a folder above it' if real != cwd else ''}; "
                        "dpldm never replaces it, choose a new folder")
    if _is_within(home, real) or real == Path(real.anchor):
        raise UserError(f"{shown}: is {'/' if real == Path(real.anchor) else '$HOME or a folder above it'}; "
                        "dpldm never replaces it, choose a new folder")
    try:
        entries = _listing(real)
    except OSError as e:
        raise UserError(f"{shown}: cannot list it ({e.strerror or e})") from None
    if not entries:
        return  # an empty folder: nothing to lose
    if not overwrite:
        raise UserError(f"{shown}: already exists; pass --overwrite to replace it")
    marker = read_marker(real)
    if marker is None:
        raise UserError(f"{shown}: was not written by dpldm (no {MARKER}); --overwrite only replaces a folder dpldm "
                        f"wrote ({kind}), never your own files: remove it yourself or choose a new folder")
    if marker["kind"] != kind:
        raise UserError(f"{shown}: holds a dpldm {marker['kind']} folder, not a {kind}; --overwrite only replaces "
                        "a folder of the same kind: choose a new folder")
    known = set(marker.get("entries") or []) | {MARKER}
    foreign = [e for e in entries if e not in known]
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise UserError(f"{shown}: holds {foreign[0]!r}{more}, which dpldm did not write there; --overwrite never "
                        "deletes files dpldm did not write: move them out or choose a new folder")


def check_output_file(dest: str | Path, inputs: Inputs = (), flag: str = "--out") -> None:
    """Refuse an output FILE that would land on one of the command's inputs: the input itself (an
    .npz it reads) or a file inside an input folder (the --checkpoint's weights, a run folder's
    config.json), whatever --overwrite says. A new file inside an input folder is fine."""
    dest = Path(dest)
    if not dest.exists():
        return
    real = resolve_path(dest, flag)
    for what, inp in inputs:
        if inp is None or not Path(inp).exists():
            continue
        src = resolve_path(inp, what)
        if real == src:
            raise UserError(f"{flag} {dest}: is the input {what} {inp} itself; write elsewhere (an output never "
                            "replaces what the command reads)")
        if src in real.parents:
            raise UserError(f"{flag} {dest}: is a file of the input {what} {inp}; write elsewhere (an output never "
                            "replaces what the command reads, even with --overwrite)")


def follow_umask(folder: Path, dir_mode: int) -> None:
    """Give every folder below `folder` `dir_mode` (0777 less the umask) and every file that mode
    without execute bits: writers such as safetensors create 0600 files whatever the umask."""
    file_mode = dir_mode & 0o666
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), dir_mode)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, file_mode)


@contextlib.contextmanager
def atomic_dir(dest: str | Path, overwrite: bool = False, *, kind: str, inputs: Inputs = (),
               flag: str = "--out") -> Iterator[Path]:
    """Yield an empty temporary folder; on success it gets the marker of `kind` and replaces `dest`.

    `dest` must be new or empty, or (with `overwrite`) a folder dpldm wrote of the same `kind`
    and not an input (check_output_dir, run first). On error the temporary folder is removed and
    `dest` is untouched. Everything in it follows the umask (follow_umask: folders 0777 and files
    0666 less the umask), whatever modes its writers gave."""
    check_output_dir(dest, kind, overwrite=overwrite, inputs=inputs, flag=flag)
    dest = Path(dest).absolute()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _unique(dest.parent, f".{dest.name}.", ".tmp", lambda p: p.mkdir(DIR_MODE))
    except OSError as e:
        raise UserError(f"{flag} {dest}: cannot create it ({e.strerror or e})") from None
    try:
        yield tmp
        write_marker(tmp, kind)
        follow_umask(tmp, os.stat(tmp).st_mode & 0o777)
        old = None
        if dest.exists():  # move the old folder aside first: a crash leaves it whole, under .NAME.*.old
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
            os.replace(dest, old / dest.name)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
