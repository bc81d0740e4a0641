"""Matplotlib figures of the experiments (PNG, written atomically): points with error bars (the
sample standard deviation over repetitions), labelled axes with units. Agg backend: no display."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from dpldm.utils.io import atomic_path


@dataclass
class Series:
    label: str
    x: Sequence[float]
    y: Sequence[float | None]
    yerr: Sequence[float | None] | None = None  # spread over repetitions; None: no bar
    style: dict = field(default_factory=dict)  # matplotlib keywords (marker, linestyle, color)


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _finite(s: Series) -> tuple[list[float], list[float], list[float]]:
    xs, ys, es = [], [], []
    for i, (x, y) in enumerate(zip(s.x, s.y)):
        if y is None or not math.isfinite(float(y)):
            continue
        e = s.yerr[i] if s.yerr is not None else None
        xs.append(float(x))
        ys.append(float(y))
        es.append(0.0 if e is None or not math.isfinite(float(e)) else float(e))
    return xs, ys, es


def line_panels(path: Path, panels: Sequence[tuple[str, Sequence[Series]]], *, xlabel: str, title: str,
                xscale: str = "linear", xticks: Sequence[tuple[float, str]] | None = None,
                hlines: Sequence[tuple[int, float, str]] = ()) -> Path:
    """One row of panels sharing the x axis; each panel: (y label with unit, its series).
    hlines: (panel index, y, label) reference lines (e.g. a non-private ceiling)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    for k, (ax, (ylabel, series)) in enumerate(zip(axes[0], panels)):
        for s in series:
            xs, ys, es = _finite(s)
            if xs:
                ax.errorbar(xs, ys, yerr=es if any(es) else None, capsize=3, label=s.label,
                            **{"marker": "o", **s.style})
        for idx, y, label in hlines:
            if idx == k:
                ax.axhline(y, color="gray", linestyle=":", label=label)
        ax.set_xscale(xscale)
        if xticks:
            ax.set_xticks([t for t, _ in xticks])
            ax.set_xticklabels([lab for _, lab in xticks])
            ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def grouped_bars(path: Path, groups: Sequence[str], bars: Sequence[Series], *, ylabel: str, xlabel: str,
                 title: str) -> Path:
    """Bars per group (x = group index in Series.x), error bars = spread over repetitions."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups) * max(1, len(bars)) / 2), 4.2))
    width = 0.8 / max(1, len(bars))
    for j, s in enumerate(bars):
        xs, ys, es = _finite(s)
        ax.bar([x - 0.4 + width * (j + 0.5) for x in xs], ys, width, yerr=es if any(es) else None, capsize=3,
               label=s.label, **s.style)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    if bars:
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    plt = _plt()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
