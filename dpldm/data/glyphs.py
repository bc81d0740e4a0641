"""The public data set: glyphs rendered from the DejaVu fonts that matplotlib ships.

36 classes: digits '0'-'9' (labels 0-9) then 'A'-'Z' (labels 10-35), grayscale, white glyph on
black like MNIST. Each (font, character) is rendered once at high resolution with PIL, cropped to
its ink, fitted into a box of 5/8 of the canvas (MNIST fits digits into 20 of 28 pixels) and
centred, at twice the output resolution. Four stroke weights come from grey-level erosion /
dilation of that template. Each image then gets a random affine map (rotation, scale, shear,
translation) plus a smooth elastic displacement, applied with one batched `grid_sample`, and is
box-filtered down to the output size. All randomness comes from one numpy Generator seeded by
`seed`, so the same (n, seed, size) gives identical bytes.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CLASSES = tuple("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ")
FONT_FILES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
)
STROKE_PROBS = (0.2, 0.4, 0.25, 0.15)  # thin (eroded), regular, dilated 3x3, dilated 5x5
ROTATION_DEG = 15.0
SCALE_RANGE = (0.85, 1.1)
SHEAR = 0.3
TRANSLATE = 0.08  # fraction of half the image side (normalised grid coordinates)
ELASTIC_STD = 0.04  # std of the 4x4 control displacements, normalised grid coordinates
_RENDER_PX = 256  # high-resolution canvas for PIL
_CHUNK = 2048


def font_paths() -> list[Path]:
    """The DejaVu TTF files bundled with matplotlib (mpl-data/fonts/ttf)."""
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    paths = [folder / name for name in FONT_FILES]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"glyphs: matplotlib's bundled fonts not found in {folder}: {', '.join(missing)}")
    return paths


def _render_template(font_path: Path, char: str, res: int) -> np.ndarray:
    """One glyph, white on black, fitted into a centred (5/8 res)-pixel box: float32 (res, res) in [0, 1]."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(font_path), size=int(_RENDER_PX * 0.6))
    canvas = Image.new("L", (_RENDER_PX, _RENDER_PX), 0)
    ImageDraw.Draw(canvas).text((_RENDER_PX / 2, _RENDER_PX / 2), char, fill=255, font=font, anchor="mm")
    if canvas.getbbox() is None:
        raise RuntimeError(f"glyphs: {font_path.name} rendered {char!r} as an empty image")
    return fit_canvas(np.asarray(canvas), res, box=5 / 8)


def fit_canvas(canvas: np.ndarray, res: int, box: float) -> np.ndarray:
    """Crop a uint8 canvas (H, W) to its ink and fit it (aspect kept) into a centred box of
    `box` * res pixels: float32 (res, res) in [0, 1]. Used by glyphs and glyphs2 (dpldm.data.fonts)."""
    from PIL import Image

    img = Image.fromarray(canvas)
    ink = img.crop(img.getbbox())
    factor = box * res / max(ink.size)
    w, h = max(1, round(ink.size[0] * factor)), max(1, round(ink.size[1] * factor))
    ink = ink.resize((w, h), Image.Resampling.LANCZOS)
    out = Image.new("L", (res, res), 0)
    out.paste(ink, ((res - w) // 2, (res - h) // 2))
    return np.asarray(out, dtype=np.float32) / 255.0


@functools.lru_cache(maxsize=4)
def glyph_templates(res: int) -> torch.Tensor:
    """(n_fonts * 36, 4, res, res) float32: every (font, class) in 4 stroke weights; row = font * 36 + class."""
    base = np.stack([_render_template(p, c, res) for p in font_paths() for c in CLASSES])  # (F*36, res, res)
    x = torch.from_numpy(base)[:, None]  # (F*36, 1, res, res)
    thin = -F.max_pool2d(-x, 3, stride=1, padding=1)  # grey erosion
    bold = F.max_pool2d(x, 3, stride=1, padding=1)  # grey dilation
    bolder = F.max_pool2d(x, 5, stride=1, padding=2)
    return torch.cat([thin, x, bold, bolder], dim=1).contiguous()  # (F*36, 4, res, res)


def _affine_thetas(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 2, 3) sampling matrices (output grid -> template coordinates)."""
    angle = np.deg2rad(rng.uniform(-ROTATION_DEG, ROTATION_DEG, n))
    scale = rng.uniform(*SCALE_RANGE, n)
    shear = rng.uniform(-SHEAR, SHEAR, n)
    shift = rng.uniform(-TRANSLATE, TRANSLATE, (n, 2))
    cos, sin = np.cos(angle), np.sin(angle)
    rot = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], 1)  # (n, 2, 2)
    shr = np.zeros((n, 2, 2))
    shr[:, 0, 0] = shr[:, 1, 1] = 1.0
    shr[:, 0, 1] = shear
    lin = rot @ shr / scale[:, None, None]  # (n, 2, 2): a larger glyph samples a smaller template window
    return np.concatenate([lin, shift[:, :, None]], axis=2).astype(np.float32)  # (n, 2, 3)


def render_glyphs(n: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """`n` jittered glyph images and their labels: (uint8 (n, size, size), int64 (n,)).

    Same (n, seed, size) -> identical bytes. Labels are uniform over the 36 classes."""
    if n < 0:
        raise ValueError(f"render_glyphs: n must be >= 0, got {n}")
    if size < 8 or size % 2:
        raise ValueError(f"render_glyphs: size must be an even number >= 8, got {size}")
    res = 2 * size  # render at twice the output size, then box-filter down
    templates = glyph_templates(res)  # (F*36, 4, res, res)
    n_fonts = templates.shape[0] // len(CLASSES)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), n)
    fonts = rng.integers(0, n_fonts, n)
    strokes = rng.choice(len(STROKE_PROBS), size=n, p=STROKE_PROBS)
    thetas = _affine_thetas(rng, n)  # (n, 2, 3)
    control = rng.normal(0.0, ELASTIC_STD, (n, 2, 4, 4)).astype(np.float32)  # elastic control points
    out = np.empty((n, size, size), dtype=np.uint8)
    for start in range(0, n, _CHUNK):
        sl = slice(start, min(n, start + _CHUNK))
        m = sl.stop - sl.start
        src = templates[torch.from_numpy(fonts[sl] * len(CLASSES) + labels[sl]),
                        torch.from_numpy(strokes[sl])][:, None]  # (m, 1, res, res)
        grid = F.affine_grid(torch.from_numpy(thetas[sl]), [m, 1, res, res], align_corners=False)  # (m, res, res, 2)
        disp = F.interpolate(torch.from_numpy(control[sl]), size=(res, res), mode="bicubic",
                             align_corners=True)  # (m, 2, res, res)
        grid = grid + disp.permute(0, 2, 3, 1)
        img = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # (m, 1, res, res)
        img = F.avg_pool2d(img, 2)[:, 0]  # (m, size, size)
        out[sl] = torch.round(img.clamp(0, 1) * 255).to(torch.uint8).numpy()
    return out, labels.astype(np.int64)


def glyph_class_name(label: int) -> str:
    return CLASSES[label]

