"""Helpers for tests and benchmarks of the data pipeline: examples that carry their own index,
and a way to plant a bad shard behind a consistent index (so only sample checks can catch it)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds

from dpldm.data.manifest import INDEX, MANIFEST, sha256_file, write_json


def indexed_images(n: int, shape: tuple[int, ...] = (8, 8), num_classes: int = 10, seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Random uint8 images whose first two pixels hold the example index (i // 256, i % 256)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    flat = images.reshape(n, -1)
    flat[:, 0] = np.arange(n) // 256
    flat[:, 1] = np.arange(n) % 256
    labels = (np.arange(n) % num_classes).astype(np.int64)
    meta = {"source": "indexed", "split": "train", "num_classes": num_classes,
            "class_names": [str(c) for c in range(num_classes)]}
    return images, labels, meta


def index_of(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Indices carried by a batch: uint8 (B, H, W[, C]) or model tensors (B, C, H, W) in [-1, 1]."""
    if isinstance(x, torch.Tensor):
        u = ((x.permute(0, 2, 3, 1) + 1.0) * 127.5).round().to(torch.int64).numpy()  # (B, H, W, C)
    else:
        u = np.asarray(x).astype(np.int64)
    flat = u.reshape(len(u), -1)
    return flat[:, 0] * 256 + flat[:, 1]


def plant_shard(folder: str | Path, k: int, samples: list[dict[str, Any]], reindex: bool = True) -> Path:
    """Replace shard k of `folder` by a tar of raw `samples` ({"__key__": str, ext: bytes});
    with `reindex`, update filesize/sha256/nsamples in manifest.json and index.json to match."""
    folder = Path(folder)
    m = json.loads((folder / MANIFEST).read_text())
    path = folder / m["shards"][k]["name"]
    with wds.TarWriter(str(path), encoder=False, mtime=0) as w:
        for s in samples:
            w.write(s)
    if reindex:
        idx = json.loads((folder / INDEX).read_text())
        for rec in (m["shards"][k], idx["shardlist"][k]):
            rec.update(filesize=path.stat().st_size, sha256=sha256_file(path), nsamples=len(samples))
        m["num_examples"] = sum(s["nsamples"] for s in m["shards"])
        write_json(folder / INDEX, idx)
        write_json(folder / MANIFEST, m)
    return path


def mount_tmpfs(path: str | Path, size: str = "64k", readonly: bool = False) -> bool:
    """Mount a small tmpfs at `path` (created) for tests of full or read-only file systems; False
    where this process may not mount (not root, or no CAP_SYS_ADMIN). Undo with `unmount`."""
    import shutil
    import subprocess

    Path(path).mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return False
    opts = f"size={size},mode=0777" + (",ro" if readonly else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def unmount(path: str | Path) -> None:
    import subprocess

    subprocess.run(["umount", "-l", str(path)], capture_output=True)
