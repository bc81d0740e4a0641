"""What every experiment shares: its command-line flags, the progress bar, mean +- spread, and the
report (results.md beside results.json and the figures). One experiment = one module of
dpldm/experiments with NAME, HELP, add_arguments(parser) and run(args) -> int (dpldm/experiments/cli.py)."""
from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence, TypeVar

from dpldm.errors import UserError
from dpldm.utils.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = ROOT / "configs" / "demo.toml"
T = TypeVar("T")


def add_common_arguments(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument("--out", default=str(ROOT / "runs" / "experiments" / name),
                   help="results folder: results.json (every finished run; an interrupted experiment resumes), "
                        "results.md, figures (default runs/experiments/%(default)s)".replace("%(default)s", name))
    p.add_argument("--quick", action="store_true", help="smoke mode: tiny runs of every cell (seconds to minutes; tests)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="the recipe (default configs/demo.toml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a recipe value")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")


def check_common(args: argparse.Namespace) -> None:
    if not 1 <= args.threads <= 4096:
        raise UserError(f"--threads must lie in [1, 4096], got {args.threads}")
    from dpldm.experiments.store import check_out_dir

    check_out_dir(Path(args.out))


def check_positive(values: Sequence[float], flag: str, *, allow_inf: bool = False, integer: bool = False) -> None:
    """Every value > 0 (finite unless allow_inf), no duplicates: one line naming the flag."""
    for v in values:
        if isinstance(v, bool) or not (v > 0 and (math.isfinite(v) or (allow_inf and v == math.inf))):
            raise UserError(f"{flag}: every value must be a {'' if allow_inf else 'finite '}number > 0, got {v}")
        if integer and float(v) != int(v):
            raise UserError(f"{flag}: every value must be an integer, got {v}")
    names = [f"{v:g}" for v in values]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"{flag}: {', '.join(dup)} given twice")


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """A tqdm progress bar on stderr over the experiment's cells."""
    from tqdm import tqdm

    yield from tqdm(items, desc=desc, total=total, unit="run", dynamic_ncols=True)


@dataclass(frozen=True)
class Stat:
    mean: float | None
    std: float | None  # sample standard deviation (n - 1); None below 2 values
    n: int

    def text(self, scale: float = 1.0, digits: int = 1, unit: str = "") -> str:
        if self.mean is None:
            return "—"
        t = f"{scale * self.mean:.{digits}f}"
        if self.std is not None:
            t += f" ± {scale * self.std:.{digits}f}"
        return t + unit


def stat(values: Iterable) -> Stat:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return Stat(None, None, 0)
    return Stat(statistics.fmean(vals), statistics.stdev(vals) if len(vals) >= 2 else None, len(vals))


def eps_text(eps: float | None) -> str:
    return "—" if eps is None else "∞" if eps == math.inf else f"{eps:g}"


def write_report(out: Path, title: str, store_data: dict, body: str, figures: Sequence[Path] = ()) -> Path:
    """results.md: title, how it was made (settings fingerprint, the latest invocation's command,
    commit and machine), the tables, the figures (relative links)."""
    inv = (store_data.get("invocations") or [{}])[-1]
    m = inv.get("machine") or {}
    lines = [f"# {title}", "",
             f"- settings `{store_data.get('settings_sha256')}`; {len(store_data.get('runs', {}))} finished run(s) "
             f"in `results.json`",
             f"- command: `{inv.get('command', '?')}`; commit `{inv.get('commit') or 'unknown'}`",
             f"- machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, torch {m.get('torch', '?')} "
             f"({m.get('torch_threads', '?')} threads){', ' + m['cuda'] if m.get('cuda') else ', no GPU'}", "",
             body.rstrip(), ""]
    for f in figures:
        lines += [f"![{Path(f).stem}]({Path(f).name})", ""]
    path = out / "results.md"
    atomic_write_text(path, "\n".join(lines))
    return path
