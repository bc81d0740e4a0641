"""Reading a list of image files into one uint8 array, the same way for `dpldm data import` (image
folders) and `dpldm evaluate` (PNG folders).

Modes. Every file's PIL mode belongs to one kind:
    grey   '1', 'L', 'I;16' (and its byte orders), 'I' with values in 0..65535
    rgb    'RGB' (and 'CMYK', 'YCbCr', 'LAB', 'HSV', converted by PIL to RGB)
    rgba   'RGBA', 'RGBa', 'PA'
    LA     grey + alpha ('LA', 'La')
    P      palette
Without `mode`, all files must be of one kind among grey / rgb / rgba (kept as L, RGB, RGBA); a
mix is refused naming one file of each kind, and LA / P need an explicit `mode`. With `mode`
("L", "RGB", "RGBA") every file is converted:
    palette      -> its palette colours (RGB, or RGBA when the palette has transparency)
    alpha        -> composited over black for L and RGB (value * alpha / 255); kept for RGBA
    colour -> L  -> ITU-R 601-2 luma 0.299 R + 0.587 G + 0.114 B
    grey -> RGB/RGBA -> the grey value in every colour channel (alpha 255)
16-bit grey ('I;16', 'I') is scaled to 8 bits by v / 257 (0 -> 0, 65535 -> 255), rounded, never
clipped ('I' values outside 0..65535, and float 'F' images, are refused). EXIF orientation is
applied first (the image as viewers show it).

Sizes. Without `resize` all images must have one size (a mismatch is refused naming two files).
`resize=S` scales the shorter side to S with PIL's Lanczos filter (in float, per channel; RGBA
premultiplied by alpha); `center_crop` then cuts the centred S x S square (without `resize`: the
centred square of the shorter side). A non-square result without `center_crop` is refused.
Every computation runs in float64 on 0..255 values and is rounded once at the end (half up).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dpldm.data.errors import SourceError

MODES = ("L", "RGB", "RGBA")
_GREY16 = {"I;16", "I;16L", "I;16B", "I;16N"}
_KIND = {"1": "grey", "L": "grey", "I": "grey", **{m: "grey" for m in _GREY16},
         "RGB": "rgb", "CMYK": "rgb", "YCbCr": "rgb", "LAB": "rgb", "HSV": "rgb",
         "RGBA": "rgba", "RGBa": "rgba", "PA": "rgba", "LA": "LA", "La": "LA", "P": "P"}
_KIND_MODE = {"grey": "L", "rgb": "RGB", "rgba": "RGBA"}  # kinds that need no --mode
_KIND_TEXT = {"grey": "greyscale", "rgb": "RGB", "rgba": "RGBA", "LA": "greyscale+alpha", "P": "palette"}
_ORIENT_SWAPS = {5, 6, 7, 8}  # EXIF orientations that transpose width and height


@dataclass(frozen=True)
class ImageOptions:
    mode: str | None = None     # None: keep the folder's one kind; "L" | "RGB" | "RGBA": convert every image
    resize: int | None = None   # shorter side -> resize (Lanczos)
    center_crop: bool = False   # then the centred square

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in MODES:
            raise SourceError(f"--mode must be one of {'|'.join(MODES)}, got {self.mode!r}")
        if self.resize is not None and (not isinstance(self.resize, int) or self.resize < 1):
            raise SourceError(f"--resize must be an integer >= 1, got {self.resize!r}")

    @property
    def is_default(self) -> bool:
        return self.mode is None and self.resize is None and not self.center_crop

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "resize": self.resize, "center_crop": self.center_crop}


@dataclass(frozen=True)
class _Header:
    path: Path
    mode: str
    size: tuple[int, int]  # (width, height) as displayed (EXIF orientation applied)


def _open(path: Path):
    from PIL import Image

    try:
        return Image.open(path)
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file
        raise SourceError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None


def _header(path: Path) -> _Header:
    with _open(path) as im:
        w, h = im.size
        try:
            if im.getexif().get(0x0112) in _ORIENT_SWAPS:
                w, h = h, w
        except Exception:  # noqa: BLE001 - a broken EXIF block: the pixels decide later
            pass
        return _Header(path, im.mode, (w, h))


def _kind(h: _Header) -> str:
    kind = _KIND.get(h.mode)
    if kind is None:
        raise SourceError(f"{h.path}: image mode {h.mode!r} is not supported (float or 32-bit images: "
                          "convert them to 8- or 16-bit first)")
    return kind


def resolve_mode(headers: list[_Header], mode: str | None) -> str:
    """The output mode: `mode` when given, else the folder's one kind (refusing mixes, LA and P)."""
    first: dict[str, Path] = {}
    for h in headers:
        first.setdefault(_kind(h), h.path)
    if mode is not None:
        return mode
    if len(first) > 1:
        listed = ", ".join(f"{p} is {_KIND_TEXT[k]}" for k, p in first.items())
        raise SourceError(f"images of different modes ({listed}); pass --mode L, RGB or RGBA to convert every image")
    (kind, path), = first.items()
    if kind not in _KIND_MODE:
        raise SourceError(f"{path} is a {_KIND_TEXT[kind]} image: pass --mode L, RGB or RGBA to say how to convert it")
    return _KIND_MODE[kind]


def _final_size(h: _Header, opt: ImageOptions) -> tuple[int, int]:
    w, hh = h.size
    if opt.resize is not None:
        s = opt.resize
        w, hh = (s, max(1, round(hh * s / w))) if w <= hh else (max(1, round(w * s / hh)), s)
        if not opt.center_crop and w != hh:
            raise SourceError(f"{h.path}: {h.size[0]}x{h.size[1]} is not square, so --resize {s} makes it "
                              f"{w}x{hh}; add --center-crop to cut the centred {s}x{s} square")
    if opt.center_crop:
        m = min(w, hh)
        w, hh = m, m
    return w, hh


def _channels(im, path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Colour (H, W, 1|3) and alpha (H, W) or None, float64 in 0..255."""
    from PIL import ImageOps

    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - broken EXIF: keep the stored orientation
        pass
    mode = im.mode
    if mode in _GREY16 or mode == "I":
        a = np.asarray(im).astype(np.float64)  # (H, W) in 0..65535
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise SourceError(f"{path}: {mode} image with values {a.min():.0f}..{a.max():.0f} outside 16-bit 0..65535")
        return (a / 257.0)[..., None], None
    if mode in ("1", "L"):
        return np.asarray(im.convert("L"), dtype=np.float64)[..., None], None
    if mode in ("LA", "La"):
        a = np.asarray(im.convert("LA"), dtype=np.float64)  # (H, W, 2)
        return a[..., :1], a[..., 1]
    if mode == "P":
        has_alpha = "transparency" in im.info
        a = np.asarray(im.convert("RGBA" if has_alpha else "RGB"), dtype=np.float64)
        return (a[..., :3], a[..., 3]) if has_alpha else (a, None)
    if _KIND.get(mode) == "rgba":
        a = np.asarray(im.convert("RGBA"), dtype=np.float64)
        return a[..., :3], a[..., 3]
    return np.asarray(im.convert("RGB"), dtype=np.float64), None


def to_mode(colour: np.ndarray, alpha: np.ndarray | None, mode: str) -> np.ndarray:
    """(H, W, 1|3) colour + optional alpha -> (H, W, C) float64 of `mode` (see the module doc)."""
    if mode in ("L", "RGB") and alpha is not None:
        colour = colour * (alpha[..., None] / 255.0)  # composite over black
    if mode == "L":
        if colour.shape[2] == 3:
            colour = colour @ np.array([0.299, 0.587, 0.114])[:, None]  # (H, W, 1)
        return colour
    rgb = colour if colour.shape[2] == 3 else np.repeat(colour, 3, axis=2)  # (H, W, 3)
    if mode == "RGB":
        return rgb
    a = alpha if alpha is not None else np.full(rgb.shape[:2], 255.0)
    return np.concatenate([rgb, a[..., None]], axis=2)  # (H, W, 4)


def _resize(x: np.ndarray, size: tuple[int, int], premultiplied_alpha: bool) -> np.ndarray:
    """(H, W, C) float64 -> (h, w, C) float64, Lanczos per channel in float ('F' images)."""
    from PIL import Image

    if (x.shape[1], x.shape[0]) == size:
        return x
    if premultiplied_alpha:
        x = np.concatenate([x[..., :3] * (x[..., 3:] / 255.0), x[..., 3:]], axis=2)
    out = np.stack([np.asarray(Image.fromarray(x[..., c].astype(np.float32), mode="F")
                               .resize(size, Image.Resampling.LANCZOS), dtype=np.float64)
                    for c in range(x.shape[2])], axis=2)
    if premultiplied_alpha:
        a = np.clip(out[..., 3:], 0.0, 255.0)
        out = np.concatenate([np.where(a > 0, out[..., :3] * 255.0 / np.maximum(a, 1e-12), 0.0), a], axis=2)
    return out


def _crop(x: np.ndarray) -> np.ndarray:
    h, w = x.shape[:2]
    m = min(h, w)
    top, left = (h - m) // 2, (w - m) // 2
    return x[top:top + m, left:left + m]


def read_images(files: list[Path], options: ImageOptions | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """uint8 (N, H, W) for mode L or (N, H, W, 3|4) for RGB/RGBA, and notes for the manifest.

    Every header is read and checked (modes, sizes) before any pixel is decoded."""
    opt = options or ImageOptions()
    if not files:
        raise SourceError("no image files")
    headers = [_header(Path(p)) for p in files]
    mode = resolve_mode(headers, opt.mode)
    sizes = [_final_size(h, opt) for h in headers]
    for h, s in zip(headers, sizes):
        if s != sizes[0]:
            how = "after --resize/--center-crop " if not opt.is_default else ""
            raise SourceError(f"images of different sizes {how}({headers[0].path} is {sizes[0][0]}x{sizes[0][1]}, "
                              f"{h.path} is {s[0]}x{s[1]}); pass --resize S (and --center-crop) to make them one size")
    out = np.empty((len(files), sizes[0][1], sizes[0][0], *(() if mode == "L" else (len(mode),))), dtype=np.uint8)
    for i, h in enumerate(headers):
        with _open(h.path) as im:
            try:
                im.load()
            except Exception as e:  # noqa: BLE001 - a truncated or corrupt file
                raise SourceError(f"{h.path}: unreadable image ({type(e).__name__}: {e})") from None
            colour, alpha = _channels(im, h.path)
        x = to_mode(colour, alpha, mode)  # (H, W, C) float64 in 0..255
        if opt.resize is not None:
            hh, ww = x.shape[:2]
            s = opt.resize
            new = (s, max(1, round(hh * s / ww))) if ww <= hh else (max(1, round(ww * s / hh)), s)
            x = _resize(x, new, premultiplied_alpha=(mode == "RGBA"))
        if opt.center_crop:
            x = _crop(x)
        u = np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8)  # round half up, once
        out[i] = u[..., 0] if mode == "L" else u
    kinds = sorted({_KIND_TEXT[_kind(h)] for h in headers})
    deep = any(h.mode in _GREY16 or h.mode == "I" for h in headers)
    notes = {"mode": mode, "input_modes": sorted({h.mode for h in headers}), "resize": opt.resize,
             "center_crop": opt.center_crop, "conversion": _conversion_text(mode, kinds, deep, opt)}
    return out, notes


def _conversion_text(mode: str, kinds: list[str], sixteen_bit: bool, opt: ImageOptions) -> str:
    parts = [f"{'/'.join(kinds)} -> {mode}"]
    if mode in ("L", "RGB") and any(k in kinds for k in ("RGBA", "greyscale+alpha", "palette")):
        parts.append("alpha composited over black")
    if mode == "L" and any(k in kinds for k in ("RGB", "RGBA", "palette")):
        parts.append("luma 0.299R+0.587G+0.114B")
    if sixteen_bit:
        parts.append("16-bit grey scaled by 1/257")
    if opt.resize is not None:
        parts.append(f"shorter side -> {opt.resize} (Lanczos)")
    if opt.center_crop:
        parts.append("centre square crop")
    return "; ".join(parts)
