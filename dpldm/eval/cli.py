"""`dpldm evaluate`: FID (with its sample count), KID and downstream accuracy of synthetic samples.

    dpldm evaluate --samples samples.npz --real mnist_train.npz --real-test mnist_test.npz \\
        [--fid-samples 1000] [--no-fid] [--json out.json] [--cache-dir .cache/eval]
    dpldm evaluate --full --device cuda --samples ... --real ... --real-test ...   # GPU, all samples

PATH is an `.npz` with `images` (uint8 (N, H, W) or (N, H, W, C)) and, optionally, `labels`
((N,) ints), or a folder of PNG files: labels from class sub-folders by the rule `dpldm data
import` uses (dpldm.data.labels: integer names `3/img.png` -> label 3; other names sorted ->
0..K-1; a mix refused), pixels as dpldm.data.images reads them (one mode or `--mode`, 16-bit scaled).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from dpldm.errors import UserError

DEFAULT_CACHE = ".cache/dpldm-eval"
DEFAULT_CPU_FID_SAMPLES = 1000
IMAGE_SUFFIXES = (".png",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", required=True, help="synthetic samples: .npz (images, labels) or PNG folder")
    p.add_argument("--real", help="real *training* split (FID/KID reference): .npz or PNG folder")
    p.add_argument("--real-test", help="real test split with labels, for the downstream accuracy")
    p.add_argument("--fid-samples", type=int, default=None,
                   help=f"synthetic samples for FID/KID (default {DEFAULT_CPU_FID_SAMPLES}; "
                        f"all with --full)")
    p.add_argument("--real-samples", type=int, default=None,
                   help="real training images for FID/KID (default: same as --fid-samples)")
    p.add_argument("--no-fid", action="store_true", help="skip FID/KID (downstream accuracy only)")
    p.add_argument("--full", action="store_true",
                   help="full-size evaluation for GPU machines: all samples and all real images")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] for Inception (default auto)")
    p.add_argument("--batch-size", type=int, default=None, help="Inception batch (default 32 CPU, 200 GPU)")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE, help=f"feature cache (default {DEFAULT_CACHE})")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--num-classes", type=int, default=None,
                   help="classes of the downstream task (default: max synthetic label + 1)")
    p.add_argument("--classifier-epochs", type=int, default=None, help="max epochs (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_out", help="write the results to this JSON file (atomic)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--mode", default=None, choices=("L", "RGB", "RGBA"),
                   help="PNG folders: convert every image to this mode (needed when modes differ; as "
                        "`dpldm data import --mode`)")


# ----------------------------------------------------------------------------- loading


def _check_images(images: np.ndarray, where: str) -> np.ndarray:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        dtype = getattr(images, "dtype", type(images).__name__)
        raise UserError(f"{where}: 'images' must be uint8 (0..255), got {dtype}")
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3, 4)):
        raise UserError(f"{where}: 'images' must have shape (N, H, W) or (N, H, W, C) with C in "
                        f"1/3/4, got {images.shape}")
    if images.shape[0] == 0:
        raise UserError(f"{where}: no images")
    return images


def _check_labels(labels: np.ndarray, n: int, where: str) -> np.ndarray:
    from dpldm.eval.classifier import MAX_CLASSES

    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != n:
        raise UserError(f"{where}: 'labels' must have shape ({n},) to match the images, got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{where}: 'labels' must be integers, got {labels.dtype}")
    if n and labels.min() < 0:
        raise UserError(f"{where}: label out of range: {int(labels.min())} < 0")
    if n and labels.max() >= MAX_CLASSES:  # before the int64 cast: a uint64 label may not fit it
        raise UserError(f"{where}: label {int(labels.max())} out of range: labels must lie in [0, {MAX_CLASSES:,}) "
                        "(the downstream classifier has one output per class up to the largest label)")
    return labels.astype(np.int64)


def _load_png_folder(folder: Path, mode: Optional[str] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """PNGs of a folder, read like `dpldm data import` reads an image folder (dpldm.data.images:
    one mode unless `mode` is given, 16-bit scaled, sizes must agree) with labels by the same
    rule (dpldm.data.labels): every image in a first-level subfolder -> labels from the subfolder
    names (integer names -> int(name); other names sorted -> 0..K-1); a flat folder -> no labels."""
    from dpldm.data.errors import DataError
    from dpldm.data.images import ImageOptions, read_images
    from dpldm.data.labels import class_labels

    files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if not files:
        raise UserError(f"{folder}: no PNG files found")
    parents = [f.parent.relative_to(folder).parts for f in files]
    nested = [len(p) >= 1 for p in parents]
    try:
        labels = None
        if any(nested) and not all(nested):
            top, sub = files[nested.index(False)], files[nested.index(True)]
            raise UserError(f"{folder}: PNGs both directly in the folder ({top.name}) and in class subfolders "
                            f"({sub.relative_to(folder)}); put every image in its class subfolder, or none")
        if all(nested):
            rule = class_labels(sorted({p[0] for p in parents}), where=str(folder))
            labels = np.array([rule.class_to_label[p[0]] for p in parents], dtype=np.int64)
        images, _notes = read_images(files, ImageOptions(mode=mode))
    except DataError as e:
        raise UserError(str(e)) from None
    return images, labels


def load_images(path: str, what: str, mode: Optional[str] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(images uint8, labels or None) from an .npz (`images`, `labels`) or a PNG folder
    (`mode`: convert every PNG to L, RGB or RGBA, as `dpldm data import --mode`)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what}: no such file or folder: {path}")
    if p.is_dir():
        images, labels = _load_png_folder(p, mode)
    elif p.suffix == ".npz":
        try:
            with np.load(p, allow_pickle=False) as z:
                keys = list(z.keys())
                if "images" not in keys:
                    raise UserError(f"{what}: {path} has no 'images' array (found: {', '.join(keys) or 'none'})")
                images = z["images"]
                labels = z["labels"] if "labels" in keys else None
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{what}: cannot read {path} as .npz ({e})") from None
    else:
        raise UserError(f"{what}: {path} is neither an .npz file nor a folder of PNGs")
    images = _check_images(images, f"{what} ({path})")
    if labels is not None:
        labels = _check_labels(labels, len(images), f"{what} ({path})")
    return images, labels


# ----------------------------------------------------------------------------- arguments

MAX_EPOCHS = 10_000
MAX_KID_SUBSETS = 100_000


def check_args(args: argparse.Namespace) -> None:
    """Every flag that needs no data, before anything is loaded or computed."""
    from dpldm.eval.classifier import MAX_CLASSES

    for flag, value in (("--samples", args.samples), ("--real", args.real), ("--real-test", args.real_test),
                        ("--cache-dir", args.cache_dir), ("--json", args.json_out)):
        if value is not None and not str(value).strip():
            raise UserError(f"{flag}: empty path")
    for flag, value, low, high in (("--batch-size", args.batch_size, 1, None),
                                   ("--kid-subsets", args.kid_subsets, 1, MAX_KID_SUBSETS),
                                   ("--kid-subset-size", args.kid_subset_size, 2, None),
                                   ("--num-classes", args.num_classes, 1, MAX_CLASSES),
                                   ("--classifier-epochs", args.classifier_epochs, 1, MAX_EPOCHS),
                                   ("--fid-samples", args.fid_samples, 2, None),
                                   ("--real-samples", args.real_samples, 2, None),
                                   ("--seed", args.seed, 0, 2**32 - 1)):
        if value is None:
            continue
        if value < low or (high is not None and value > high):
            bound = f"lie in [{low}, {high}]" if high is not None else f"be >= {low}"
            raise UserError(f"{flag} must {bound}, got {value}")
    from dpldm.utils.device import check_device_spec, resolve_device

    check_device_spec(args.device)
    if not args.no_fid:
        resolve_device(args.device)  # a GPU that is not here: refused now, not after loading the data
    if args.cache_dir is not None and not args.no_cache:
        for anc in [Path(args.cache_dir).absolute(), *Path(args.cache_dir).absolute().parents]:
            if anc.exists() and not anc.is_dir():
                raise UserError(f"--cache-dir {args.cache_dir}: cannot use it, {anc} is a file")
    if args.json_out is not None:
        check_json_out(args.json_out, [("--samples", args.samples), ("--real", args.real),
                                       ("--real-test", args.real_test)])


def check_json_out(path: str, inputs=()) -> None:
    """--json names a file that can be written: not a folder, nothing but folders above it, and the
    nearest existing folder writable (checked before the evaluation, which can take an hour); never
    one of the inputs (or a file inside an input folder); an existing file only when it is a report
    `dpldm evaluate` wrote (replaced, as a rerun into the same --json always did)."""
    from dpldm.utils.io import check_output_file

    out = Path(path)
    if out.is_dir():
        raise UserError(f"--json {path}: is a folder; give a file name (e.g. {out / 'eval.json'})")
    for anc in out.absolute().parents:
        if anc.exists():
            if not anc.is_dir():
                raise UserError(f"--json {path}: cannot create it, {anc} is a file")
            if not os.access(anc, os.W_OK | os.X_OK):
                raise UserError(f"--json {path}: cannot write in {anc} (permission denied)")
            break
    check_output_file(out, inputs, flag="--json")
    if out.exists() and not is_report(out):
        raise UserError(f"--json {path}: exists and is not a report `dpldm evaluate` wrote; refusing to replace it: "
                        "choose another path (or move the file away)")


def is_report(path: Path) -> bool:
    """A JSON object as `dpldm evaluate --json` writes it (write_json_result)."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(obj, dict) and {"samples_path", "n_samples_total"} <= set(obj)


def write_json_result(path: str, result: dict) -> None:
    """Write the result; if that still fails, print it (the evaluation is not lost) and refuse."""
    from dpldm.utils.io import atomic_write_text

    text = json.dumps(result, indent=2, sort_keys=True) + "\n"
    try:
        atomic_write_text(path, text)
    except OSError as e:
        print(text, end="")
        raise UserError(f"--json {path}: cannot write it ({e.strerror or e}); the result is printed above") from None
    print(f"wrote {path}")


# ----------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> int:
    from dpldm.eval.classifier import ClassifierConfig
    from dpldm.eval.evaluate import evaluate_synthetic

    check_args(args)
    compute_fid = not args.no_fid
    if compute_fid and not args.real:
        raise UserError("--real (the real training split) is needed for FID/KID; or pass --no-fid")
    if not compute_fid and not args.real_test:
        raise UserError("nothing to do: --no-fid and no --real-test")
    samples, labels = load_images(args.samples, "--samples", args.mode)
    real = load_images(args.real, "--real", args.mode)[0] if (compute_fid and args.real) else None
    real_test = None
    if args.real_test:
        test_images, test_labels = load_images(args.real_test, "--real-test", args.mode)
        if test_labels is None:
            raise UserError(f"--real-test ({args.real_test}): needs 'labels' for the downstream accuracy")
        if labels is None:
            raise UserError(f"--samples ({args.samples}): needs 'labels' for the downstream accuracy "
                            f"(or leave out --real-test)")
        real_test = (test_images, test_labels)
    if args.full:
        if args.fid_samples is not None or args.real_samples is not None:
            raise UserError("--full uses all samples; drop --fid-samples/--real-samples")
        n_fid, n_real = None, None
    else:
        n_fid = args.fid_samples if args.fid_samples is not None else DEFAULT_CPU_FID_SAMPLES
        n_real = args.real_samples
    if compute_fid:
        from dpldm.eval.inception import resolve_device

        dev = resolve_device(args.device)
        if args.full and dev == "cpu":
            n_img = len(samples) + len(real)
            print(f"warning: --full on CPU runs Inception on {n_img} images (~{n_img / 4 / 60:.0f} min "
                  f"at ~4 images/s on 2 cores); --full is meant for GPU machines", file=sys.stderr)
    cfg_kwargs = {"seed": args.seed}
    if args.classifier_epochs is not None:
        cfg_kwargs["epochs"] = args.classifier_epochs
    result = evaluate_synthetic(
        samples, labels, real, real_test, n_fid=n_fid, cache_dir=None if args.no_cache else args.cache_dir,
        n_real=n_real, device=args.device, batch_size=args.batch_size, compute_fid=compute_fid,
        kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
        classifier_config=ClassifierConfig(**cfg_kwargs), num_classes=args.num_classes,
        seed=args.seed, progress=not args.quiet and sys.stderr.isatty(), log=print)
    result.update({"samples_path": str(args.samples), "real_path": args.real,
                   "real_test_path": args.real_test, "n_samples_total": int(len(samples)),
                   "full": bool(args.full)})
    print(summary_line(result))
    if args.json_out:
        write_json_result(args.json_out, result)
    return 0


def summary_line(r: dict) -> str:
    parts = []
    if "fid" in r:
        parts.append(f"FID {r['fid']:.2f} (n={r['fid_n_samples']} vs {r['fid_n_real']} real)")
        parts.append(f"KID {r['kid']:.4f} +- {r['kid_std']:.4f}")
    if "accuracy" in r:
        parts.append(f"accuracy {100 * r['accuracy']:.2f}% (n_test={r['n_test_real']})")
    return "result: " + ", ".join(parts)
