"""The `glyphs2` public source: handwriting-like digits and capitals from every font matplotlib
ships and Hershey's single-stroke fonts (templates: dpldm.data.fonts), laid out like MNIST.

Same 36 classes as `glyphs` ('0'-'9' -> 0-9, 'A'-'Z' -> 10-35), white on black. `glyphs` (v1,
the shipped model's pretraining data) is not changed by anything here.

Per image (all draws from one numpy Generator seeded by `seed`, made up front, so the same
(n, seed, size) gives identical bytes, whatever the chunking or the torch thread count):
  1. class uniform over 36; a font uniform over the fonts that hold the class; for a Hershey
     font, a pen width uniform over three;
  2. a random linear map (rotation, slant = shear, aspect) and a smooth elastic displacement
     (a 5x5 grid of control offsets, bicubic), one `grid_sample` of the template;
  3. MNIST's layout (LeCun et al.: the digit's bounding box fitted into 20x20 of 28x28, aspect
     kept, the centre of mass moved to the centre): measured on a coarse render of step 2, the
     larger side of the ink's box scaled to `BOX_FRACTION` x size (x a small jitter) and the
     centre of mass moved to the centre (+ a sub-pixel jitter); composed into the sampling grid so
     the template is resampled once, at twice the output size;
  4. pen thickness: a random point on the scale eroded / as drawn / dilated 3x3 / dilated 5x5
     (linear blend of the two neighbouring levels), then a 2x2 box filter down to `size` and the
     brightest pixel scaled to 255.
No statistic of any private set was used to choose these values: they follow MNIST's published
construction and were checked by eye on this source's own renderings (docs/pretraining.md).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dpldm.data.fonts import templates
from dpldm.data.glyphs import CLASSES

VERSION = 1  # bump whenever the bytes for a given (n, seed, size) change
BOX_FRACTION = 20 / 32  # MNIST: 20 px box in 28 px, padded to 32 like the private mnist5k
BOX_JITTER = (0.92, 1.04)
ROTATION_DEG = 10.0
SLANT = (-0.2, 0.4)  # x -= slant * y (y down): positive leans right, like most handwriting
ASPECT = (0.75, 1.15)  # width / height multiplier before the fit
ELASTIC_STD = 0.045  # std of the 5x5 control offsets (normalised template coordinates)
SHIFT_PX = 0.5  # centre-of-mass jitter, output pixels (uniform in +-)
THICKNESS = (0.5, 2.0)  # levels 0 eroded, 1 as drawn, 2 dilated 3x3, 3 dilated 5x5 (at 2x size)
INK_THRESHOLD = 0.3  # a coarse pixel is ink for the bounding box at >= this x the image's max
_CHUNK = 1024


def _draws(rng: np.random.Generator, n: int, size: int) -> dict[str, np.ndarray]:
    """Every random number of `render_glyphs2`, in a fixed order."""
    return {
        "labels": rng.integers(0, len(CLASSES), n),
        "pick": rng.random(n),
        "angle": np.deg2rad(rng.uniform(-ROTATION_DEG, ROTATION_DEG, n)),
        "slant": rng.uniform(*SLANT, n),
        "aspect": rng.uniform(*ASPECT, n),
        "control": rng.normal(0.0, ELASTIC_STD, (n, 2, 5, 5)).astype(np.float32),
        "box": rng.uniform(*BOX_JITTER, n) * BOX_FRACTION * size,  # output pixels
        "shift": rng.uniform(-SHIFT_PX, SHIFT_PX, (n, 2)) * 2.0 / size,  # normalised coordinates
        "thickness": rng.uniform(*THICKNESS, n),
    }


def _pick_templates(labels: np.ndarray, pick: np.ndarray, tlabels: np.ndarray, font_ids: np.ndarray) -> np.ndarray:
    """Template index per example: a font uniform among the class's fonts, then a pen uniform."""
    out = np.empty(len(labels), dtype=np.int64)
    for c in range(len(CLASSES)):
        rows = np.flatnonzero(tlabels == c)  # templates of class c, grouped by font
        fonts, counts = np.unique(font_ids[rows], return_counts=True)
        weights = np.repeat(1.0 / (len(fonts) * counts), counts)  # (len(rows),) sums to 1
        cum = np.cumsum(weights)
        sel = labels == c
        out[sel] = rows[np.minimum(np.searchsorted(cum, pick[sel], side="right"), len(rows) - 1)]
    return out


def _warp_thetas(angle: np.ndarray, slant: np.ndarray, aspect: np.ndarray) -> torch.Tensor:
    """(n, 2, 3) sampling matrices, output -> template: the inverse of rotation @ slant @ aspect."""
    n = len(angle)
    cos, sin = np.cos(angle), np.sin(angle)
    fwd = np.zeros((n, 2, 2))
    fwd[:, 0, 0], fwd[:, 0, 1] = cos * aspect, -sin - cos * slant  # R @ [[1, -s], [0, 1]] @ diag(a, 1)
    fwd[:, 1, 0], fwd[:, 1, 1] = sin * aspect, cos - sin * slant
    theta = np.concatenate([np.linalg.inv(fwd), np.zeros((n, 2, 1))], axis=2)
    return torch.from_numpy(theta.astype(np.float32))


def _warp_grid(theta: torch.Tensor, control: torch.Tensor, px: int) -> torch.Tensor:
    """(m, px, px, 2) template coordinates: affine + bicubic elastic offsets."""
    m = theta.shape[0]
    grid = F.affine_grid(theta, [m, 1, px, px], align_corners=False)  # (m, px, px, 2)
    disp = F.interpolate(control, size=(px, px), mode="bicubic", align_corners=True)  # (m, 2, px, px)
    return grid + disp.permute(0, 2, 3, 1)


def _fit_thetas(coarse: np.ndarray, box_px: np.ndarray, shift: np.ndarray) -> torch.Tensor:
    """(m, 2, 3) maps output -> coarse-render coordinates that scale the ink's larger side to
    `box_px` output pixels and put its centre of mass at the centre (+ `shift`).

    coarse: float64 (m, s, s) warped renders at the output size s."""
    m, s, _ = coarse.shape
    centres = (2 * np.arange(s) + 1) / s - 1  # pixel centres, normalised (align_corners=False)
    mass = coarse.sum(axis=(1, 2))  # (m,)
    safe = np.where(mass > 0, mass, 1.0)
    cx = (coarse.sum(axis=1) * centres).sum(axis=1) / safe  # (m,)
    cy = (coarse.sum(axis=2) * centres).sum(axis=1) / safe
    ink = coarse >= INK_THRESHOLD * coarse.max(axis=(1, 2), keepdims=True).clip(min=1e-12)  # (m, s, s)
    cols, rows = ink.any(axis=1), ink.any(axis=2)  # (m, s) each
    width = (s - np.argmax(cols[:, ::-1], axis=1) - np.argmax(cols, axis=1)) * 2.0 / s  # normalised extent
    height = (s - np.argmax(rows[:, ::-1], axis=1) - np.argmax(rows, axis=1)) * 2.0 / s
    side = np.where(mass > 0, np.maximum(width, height), box_px * 2.0 / s)
    inv = side / (box_px * 2.0 / s)  # output -> coarse scale (1 / zoom)
    theta = np.zeros((m, 2, 3))
    theta[:, 0, 0] = theta[:, 1, 1] = inv
    theta[:, 0, 2] = cx - shift[:, 0] * inv
    theta[:, 1, 2] = cy - shift[:, 1] * inv
    return torch.from_numpy(theta.astype(np.float32))


def _thicken(img: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """img (m, 1, r, r); level (m,) in [0, 3]: blend of eroded / as is / dilated 3x3 / 5x5."""
    levels = torch.cat([-F.max_pool2d(-img, 3, stride=1, padding=1), img, F.max_pool2d(img, 3, stride=1, padding=1),
                        F.max_pool2d(img, 5, stride=1, padding=2)], dim=1)  # (m, 4, r, r)
    lo = level.floor().long().clamp(0, 2)  # (m,)
    w = (level - lo.to(level.dtype)).view(-1, 1, 1)  # (m, 1, 1)
    rows = torch.arange(img.shape[0])
    return (levels[rows, lo] * (1 - w) + levels[rows, lo + 1] * w)[:, None]  # (m, 1, r, r)


def render_glyphs2(n: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """`n` handwriting-like glyphs and their labels: (uint8 (n, size, size), int64 (n,)).

    Same (n, seed, size) -> identical bytes. Labels uniform over the 36 classes."""
    if n < 0:
        raise ValueError(f"render_glyphs2: n must be >= 0, got {n}")
    if size < 8 or size % 2:
        raise ValueError(f"render_glyphs2: size must be an even number >= 8, got {size}")
    res = 2 * size
    tset = templates(res)
    tmpl = torch.from_numpy(tset.images)[:, None]  # (T, 1, res, res)
    d = _draws(np.random.default_rng(seed), n, size)
    chosen = _pick_templates(d["labels"], d["pick"], tset.labels, tset.font_ids)
    thetas = _warp_thetas(d["angle"], d["slant"], d["aspect"])  # (n, 2, 3)
    out = np.empty((n, size, size), dtype=np.uint8)
    for start in range(0, n, _CHUNK):
        sl = slice(start, min(n, start + _CHUNK))
        src = tmpl[torch.from_numpy(chosen[sl])]  # (m, 1, res, res)
        control = torch.from_numpy(d["control"][sl])  # (m, 2, 5, 5)
        coarse = F.grid_sample(src, _warp_grid(thetas[sl], control, size), mode="bilinear",
                               padding_mode="zeros", align_corners=False)  # (m, 1, size, size)
        fit = _fit_thetas(coarse[:, 0].double().numpy(), d["box"][sl], d["shift"][sl])  # (m, 2, 3)
        fine = _warp_grid(thetas[sl], control, res).permute(0, 3, 1, 2)  # (m, 2, res, res)
        outer = F.affine_grid(fit, [len(fit), 1, res, res], align_corners=False)  # (m, res, res, 2)
        grid = F.grid_sample(fine, outer, mode="bilinear", padding_mode="border",
                             align_corners=False).permute(0, 2, 3, 1)  # (m, res, res, 2): composed map
        img = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # (m, 1, res, res)
        img = _thicken(img, torch.from_numpy(d["thickness"][sl]).float())
        img = F.avg_pool2d(img, 2)[:, 0]  # (m, size, size)
        peak = img.amax(dim=(1, 2), keepdim=True).clamp(min=1e-6)
        out[sl] = torch.round((img / peak).clamp(0, 1) * 255).to(torch.uint8).numpy()
    return out, d["labels"].astype(np.int64)


def font_report(size: int = 32) -> list[dict[str, Any]]:
    """Per font: the classes it gives and why each other class was skipped (JSON-able)."""
    return [r.to_json() for r in templates(2 * size).reports]


def load_split(split: str, num: int | None, seed: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """`glyphs2` for dpldm.data.sources: train = seed, test = seed + 1 (as `glyphs`)."""
    n = num if num is not None else (36_000 if split == "train" else 3_600)
    s = seed if split == "train" else seed + 1
    images, labels = render_glyphs2(n, s)
    return images, labels, {
        "num_classes": len(CLASSES), "class_names": list(CLASSES), "seed": s, "version": VERSION,
        "fonts": list(templates(64).fonts),
        "notes": "public glyphs v2: every matplotlib font holding the glyph + Hershey single-stroke fonts, "
                 "handwriting-like augmentation, MNIST layout (dpldm.data.glyphs_v2)"}
