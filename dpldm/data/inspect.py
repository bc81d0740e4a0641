"""`dpldm data inspect DIR`: what a shard folder holds, and a PNG grid of its first examples."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dpldm.data.errors import OutputError
from dpldm.data.manifest import ShardFolder, open_shard_folder
from dpldm.data.outdir import check_writable, writing
from dpldm.data.shards import iter_shard, verify_folder


def summary(folder: ShardFolder) -> dict[str, Any]:
    m = folder.manifest
    return {"folder": str(folder.path), "kind": folder.kind, "source": m.get("source"), "split": m.get("split"),
            "num_examples": folder.num_examples, "num_shards": len(folder.shards),
            "num_classes": folder.spec.num_classes, "class_names": m.get("class_names"),
            "class_histogram": m["class_histogram"], "sample": folder.spec.to_json(),
            "autoencoder_sha256": m.get("autoencoder_sha256")}


def examples_by_class(folder: ShardFolder, per_class: int, max_scan: int = 20_000) -> tuple[np.ndarray, np.ndarray]:
    """Up to `per_class` examples of every class (class order), from the first `max_scan` samples."""
    picked: dict[int, list[np.ndarray]] = {}
    k_total, scanned = folder.spec.num_classes, 0
    for k in range(len(folder.shards)):
        for _, x, y in iter_shard(folder, k):
            if len(picked.setdefault(y, [])) < per_class:
                picked[y].append(x)
            scanned += 1
            full = len(picked) == k_total and all(len(v) == per_class for v in picked.values())
            if full or scanned >= max_scan:
                break
        else:
            continue
        break
    ys = sorted(picked)
    xs = [x for y in ys for x in picked[y]]
    return np.stack(xs), np.array([y for y in ys for _ in picked[y]])


def to_display(xs: np.ndarray, kind: str) -> np.ndarray:
    """Examples -> uint8 (n, H, W, C) with C in {1, 3, 4}. Latents (n, Z, h, w): the first three
    channels (or the first one) as RGB/grey, each example stretched to 0..255."""
    if kind == "images":
        return xs if xs.ndim == 4 else xs[..., None]
    z = xs[:, :3] if xs.shape[1] >= 3 else xs[:, :1]  # (n, 3|1, h, w)
    lo = z.min(axis=(1, 2, 3), keepdims=True)
    hi = z.max(axis=(1, 2, 3), keepdims=True)
    u = np.round(255 * (z - lo) / np.maximum(hi - lo, 1e-12)).astype(np.uint8)
    return u.transpose(0, 2, 3, 1)


def make_grid(rows: list[np.ndarray], min_cell: int = 48, pad: int = 2) -> np.ndarray:
    """Rows of uint8 (n_r, H, W, C) images -> one uint8 image, cells upscaled by an integer factor."""
    h, w, c = rows[0].shape[1:]
    s = max(1, -(-min_cell // max(h, w)))
    cols = max(len(r) for r in rows)
    gh, gw = h * s + pad, w * s + pad
    grid = np.zeros((len(rows) * gh + pad, cols * gw + pad, c), dtype=np.uint8)
    if c == 4:
        grid[..., 3] = 255
    for r, row in enumerate(rows):
        big = row.repeat(s, axis=1).repeat(s, axis=2)  # (n_r, sH, sW, C)
        for q in range(len(row)):
            grid[pad + r * gh: pad + r * gh + h * s, pad + q * gw: pad + q * gw + w * s] = big[q]
    return grid


DEFAULT_GRID = "inspect_grid.png"
GRID_TAG = ("dpldm", "inspect-grid")  # a PNG text chunk: the grid files dpldm may replace


def check_grid_path(path: str | Path) -> Path:
    """Refuse a --grid that is a folder, not a .png, or an existing file dpldm did not write."""
    from PIL import Image

    path = Path(path)
    if path.is_dir():
        raise OutputError(f"--grid {path} is a folder: give a .png file path (e.g. {path / 'inspect_grid.png'})")
    if path.suffix.lower() != ".png":
        raise OutputError(f"--grid {path}: the grid is a PNG; give a path ending in .png")
    if path.exists():
        try:
            with Image.open(path) as im:
                ours = im.info.get(GRID_TAG[0]) == GRID_TAG[1]
        except Exception:  # noqa: BLE001 - not an image at all
            ours = False
        # the default grid inside a shard folder (older dpldm versions wrote it untagged)
        ours = ours or (path.name == DEFAULT_GRID and (path.parent / "manifest.json").is_file())
        if not ours:
            raise OutputError(f"--grid {path} exists and was not written by `dpldm data inspect`; "
                              "refusing to replace it: choose another path")
    check_writable(path.parent, flag="--grid")
    return path


def write_grid(folder: ShardFolder, path: str | Path, per_class: int = 8) -> Path:
    """One row per class (first examples found), written atomically as PNG (tagged as dpldm's)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from dpldm.utils.io import atomic_path

    path = check_grid_path(path)
    xs, ys = examples_by_class(folder, per_class)
    shown = to_display(xs, folder.kind)
    grid = make_grid([shown[ys == y] for y in np.unique(ys)])
    img = Image.fromarray(grid[..., 0] if grid.shape[2] == 1 else grid)
    info = PngInfo()
    info.add_text(*GRID_TAG)
    with writing(path):
        with atomic_path(path) as tmp:
            img.save(tmp, format="PNG", pnginfo=info)
    return path


def inspect_folder(path: str | Path, grid: str | Path | None = None, per_class: int = 8, verify: bool = False) -> dict[str, Any]:
    folder = open_shard_folder(path)
    if grid is not None:
        check_grid_path(grid)  # before the (slow) verification
    info = summary(folder)
    if verify:
        info["verified_class_histogram"] = verify_folder(folder)
    if grid is not None:
        info["grid"] = str(write_grid(folder, grid, per_class=per_class))
    return info
