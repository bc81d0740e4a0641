"""One sample on disk: payload bytes (`.npy`, `.png` or `.pth`) + label (`.cls`), validated.

A `SampleSpec` (stored in each folder's manifest) says what every sample of a folder must look
like; `decode_sample` checks a sample against it and raises `ShardError` naming the shard and key:
missing member, undecodable payload, wrong dtype or shape, NaN/inf values, label not an integer
or outside [0, num_classes).
"""
from __future__ import annotations

import functools
import io
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from dpldm.data.errors import ShardError

PAYLOAD_EXTS = ("npy", "png", "pth")
LABEL_EXT = "cls"
KEY_DIGITS = 8


def sample_key(index: int) -> str:
    """The `__key__` of the example with global index `index` within its folder."""
    return f"{index:0{KEY_DIGITS}d}"


@dataclass(frozen=True)
class SampleSpec:
    ext: str                 # payload extension: "npy" | "png" | "pth"
    shape: tuple[int, ...]   # one example: (H, W) or (H, W, C) images, (C, h, w) latents
    dtype: str               # "uint8" images, "float32" latents
    num_classes: int         # labels lie in [0, num_classes)

    def __post_init__(self):
        if self.ext not in PAYLOAD_EXTS:
            raise ValueError(f"payload format must be one of {PAYLOAD_EXTS}, got {self.ext!r}")
        if self.ext == "png" and self.dtype != "uint8":
            raise ValueError("png payloads hold uint8 images only")
        if self.ext == "png" and not (len(self.shape) == 2 or (len(self.shape) == 3 and self.shape[2] in (1, 3, 4))):
            raise ValueError(f"png needs (H, W) or (H, W, 1|3|4) images, got shape {self.shape}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "SampleSpec":
        return cls(ext=d["ext"], shape=tuple(d["shape"]), dtype=d["dtype"], num_classes=int(d["num_classes"]))


# -- encoding ----------------------------------------------------------------------------------

def encode_payload(x: np.ndarray, ext: str) -> bytes:
    """Bytes of one example in the given format (lossless for every supported format)."""
    if ext == "npy":
        buf = io.BytesIO()
        np.lib.format.write_array(buf, np.ascontiguousarray(x), allow_pickle=False)
        return buf.getvalue()
    if ext == "png":
        from PIL import Image

        arr = x[..., 0] if x.ndim == 3 and x.shape[2] == 1 else x
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
        return buf.getvalue()
    if ext == "pth":
        buf = io.BytesIO()
        torch.save(torch.from_numpy(np.ascontiguousarray(x)), buf)
        return buf.getvalue()
    raise ValueError(f"unknown payload format {ext!r}")


def encode_sample(index: int, x: np.ndarray, label: int, ext: str) -> dict[str, Any]:
    """A webdataset sample dict (bytes values) ready for `TarWriter.write`."""
    return {"__key__": sample_key(index), ext: encode_payload(x, ext), LABEL_EXT: str(int(label)).encode("ascii")}


# -- decoding ----------------------------------------------------------------------------------

def _as_bytes(v: Any) -> bytes:
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v)
    if hasattr(v, "read"):  # wids gives BytesIO streams
        v.seek(0)
        return v.read()
    raise TypeError(f"unexpected member type {type(v).__name__}")


def _member(sample: dict, ext: str) -> Any:
    # webdataset names members "npy", wids names them ".npy"
    if ext in sample:
        return sample[ext]
    return sample.get("." + ext)


@functools.lru_cache(maxsize=64)
def _npy_header(shape: tuple[int, ...], dtype: str) -> bytes:
    """The exact .npy header our writer puts before an array of this shape and dtype."""
    z = np.zeros(shape, dtype=dtype)
    return encode_payload(z, "npy")[: -z.nbytes or None]


def decode_payload(data: bytes, spec: SampleSpec, *, shard: str | None = None, key: str | None = None) -> np.ndarray:
    if spec.ext == "npy":
        header = _npy_header(spec.shape, spec.dtype)
        if data.startswith(header):  # fast path: the header pins dtype, shape and C order
            x = np.frombuffer(data, dtype=spec.dtype, offset=len(header))
            if x.size == int(np.prod(spec.shape)):
                x = x.reshape(spec.shape)
                if x.dtype.kind == "f" and not np.isfinite(x).all():
                    raise ShardError(f"{int((~np.isfinite(x)).sum())} non-finite value(s) (NaN/inf)", shard=shard, key=key)
                return x
    try:
        if spec.ext == "npy":
            x = np.load(io.BytesIO(data), allow_pickle=False)
        elif spec.ext == "png":
            from PIL import Image

            with Image.open(io.BytesIO(data)) as im:
                im.load()
                x = np.asarray(im)
            if len(spec.shape) == 3 and spec.shape[2] == 1 and x.ndim == 2:
                x = x[..., None]
        else:  # pth
            t = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"expected a tensor, got {type(t).__name__}")
            x = t.numpy()
    except ShardError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure is a corrupt sample
        raise ShardError(f"cannot decode .{spec.ext} payload ({type(e).__name__}: {e})", shard=shard, key=key) from None
    if str(x.dtype) != spec.dtype:
        raise ShardError(f"wrong dtype {x.dtype} (expected {spec.dtype})", shard=shard, key=key)
    if tuple(x.shape) != spec.shape:
        raise ShardError(f"wrong shape {tuple(x.shape)} (expected {spec.shape})", shard=shard, key=key)
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).sum())
        raise ShardError(f"{bad} non-finite value(s) (NaN/inf)", shard=shard, key=key)
    return x


def decode_label(data: bytes, num_classes: int, *, shard: str | None = None, key: str | None = None) -> int:
    try:
        y = int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise ShardError(f"label {data[:20]!r} is not an integer", shard=shard, key=key) from None
    if not (0 <= y < num_classes):
        raise ShardError(f"label {y} out of range [0, {num_classes})", shard=shard, key=key)
    return y


def decode_sample(sample: dict, spec: SampleSpec, *, shard: str | None = None,
                  expected_key: str | None = None) -> tuple[np.ndarray, int]:
    """(example array of spec.shape, label) from a webdataset or wids sample dict."""
    key = sample.get("__key__")
    if expected_key is not None and key != expected_key:
        raise ShardError(f"found sample {key!r} where the index expects {expected_key!r} "
                         "(index out of date, or a sample is missing)", shard=shard, key=expected_key)
    payload, label = _member(sample, spec.ext), _member(sample, LABEL_EXT)
    if payload is None:
        have = sorted(k.lstrip(".") for k in sample if not k.startswith("__"))
        raise ShardError(f"missing .{spec.ext} member (has {have})", shard=shard, key=key)
    if label is None:
        have = sorted(k.lstrip(".") for k in sample if not k.startswith("__"))
        raise ShardError(f"missing .{LABEL_EXT} member (has {have})", shard=shard, key=key)
    x = decode_payload(_as_bytes(payload), spec, shard=shard, key=key)
    y = decode_label(_as_bytes(label), spec.num_classes, shard=shard, key=key)
    return x, y


# -- model-side tensors ------------------------------------------------------------------------

def images_to_tensor(x: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W) or (B, H, W, C) -> float32 (B, C, H, W) in [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(x))
    if t.ndim == 3:
        t = t.unsqueeze(-1)  # (B, H, W, 1)
    return t.permute(0, 3, 1, 2).to(torch.float32).div_(127.5).sub_(1.0).contiguous()


def tensor_to_images(x: torch.Tensor) -> np.ndarray:
    """float (B, C, H, W) in [-1, 1] -> uint8 (B, H, W, C), rounding to the nearest level."""
    u = ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return u.permute(0, 2, 3, 1).cpu().numpy()
