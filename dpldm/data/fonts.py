"""Glyph templates of the `glyphs2` public set: every font matplotlib ships plus Hershey's
single-stroke fonts, each (font, character) checked to really hold that character.

A TrueType font is used for a character only when (1) its cmap maps the character to a glyph,
(2) that glyph's PostScript name is the character's own (`zero`..`nine`, `A`..`Z`; `zerooldstyle`
etc. for old-style figures): cmex10's '0' is `parenlefttp`, cmsy10's '0' is `prime`, Last Resort's
every letter is the `lastresortlatin` box, (3) the rendering is not empty, (4) it differs from the
font's .notdef rendering and (5) no other character of the font renders the very same image (a
placeholder). Hershey fonts (vector strokes from the MIT-licensed `Hershey-Fonts` package) are
stroked with a round pen of three widths. Each template is cropped to its ink and fitted, aspect
kept, into a centred box of `TEMPLATE_BOX` of the canvas; identical templates of one class (two
fonts sharing a glyph) are kept once. Everything is deterministic: fonts in sorted file order.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dpldm.data.errors import SourceError
from dpldm.data.glyphs import CLASSES, fit_canvas

# Latin Hershey fonts with digits and capitals '0'-'9', 'A'-'Z' (the package's names). Left out:
# greek*/cyril*/japanese (other scripts at ASCII codes), gothic* (blackletter capitals that read as
# other letters), markers/symbolic/music/meteorology/astrology/math* (symbols, or copies of the
# Roman glyphs kept here).
HERSHEY_FONTS = ("cursive", "futural", "futuram", "rowmand", "rowmans", "rowmant", "scriptc", "scripts",
                 "timesi", "timesib", "timesr", "timesrb")
HERSHEY_PENS = (0.06, 0.09, 0.12)  # pen diameter / larger side of the glyph
HERSHEY_PIP = "Hershey-Fonts==2.1.0"
TEMPLATE_BOX = 0.5  # the glyph's larger side, as a fraction of the template canvas
_RENDER_PX = 256  # high-resolution canvas
_DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass
class FontReport:
    """What one font gave: the classes used and, per skipped character, why."""
    name: str
    kind: str  # "ttf" | "hershey"
    used: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "used": "".join(self.used), "skipped": dict(self.skipped)}


@dataclass(frozen=True)
class Templates:
    images: np.ndarray  # (T, res, res) float32 in [0, 1]
    labels: np.ndarray  # (T,) int64 class of each template
    font_ids: np.ndarray  # (T,) int64 index into `fonts`
    fonts: tuple[str, ...]  # font names, in order
    reports: tuple[FontReport, ...]


def ttf_paths() -> list[Path]:
    """Every TrueType file matplotlib ships (mpl-data/fonts/ttf), sorted by name."""
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    paths = sorted(folder.glob("*.ttf"))
    if not paths:
        raise SourceError(f"glyphs2: no .ttf fonts in matplotlib's {folder}")
    return paths


def expected_glyph_names(char: str) -> tuple[str, ...]:
    """PostScript glyph names that draw `char` ('0'-'9', 'A'-'Z')."""
    if char.isdigit():
        name = _DIGIT_NAMES[int(char)]
        return name, name + "oldstyle"
    return (char,)


def _pil_font(path: Path):
    from PIL import ImageFont

    return ImageFont.truetype(str(path), size=int(_RENDER_PX * 0.6))


def render_ttf(font, char: str) -> np.ndarray:
    """`char` drawn white on black, centred on a (256, 256) canvas: uint8."""
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (_RENDER_PX, _RENDER_PX), 0)
    ImageDraw.Draw(canvas).text((_RENDER_PX / 2, _RENDER_PX / 2), char, fill=255, font=font, anchor="mm")
    return np.asarray(canvas)


def notdef_codepoint(path: Path) -> str | None:
    """A private-use character the font does not map (PIL draws it as the font's .notdef glyph);
    None when the font maps them all (Last Resort: its placeholders are caught as duplicates)."""
    from matplotlib.ft2font import FT2Font

    f = FT2Font(str(path))
    for cp in range(0xE000, 0xF900):
        if f.get_char_index(cp) == 0:
            return chr(cp)
    return None


def rendering_problems(canvases: dict[str, np.ndarray], notdef: np.ndarray | None) -> dict[str, str]:
    """Characters whose rendering cannot be that character, and why: empty, the .notdef glyph, or
    the same image as another character of the font (a placeholder box)."""
    out: dict[str, str] = {}
    seen: dict[bytes, str] = {}
    for char, img in canvases.items():
        key = img.tobytes()
        if not img.any():
            out[char] = "renders empty"
        elif notdef is not None and np.array_equal(img, notdef):
            out[char] = "renders the .notdef glyph"
        elif key in seen:
            out[char] = f"renders the same image as {seen[key]!r} (a placeholder)"
            out.setdefault(seen[key], f"renders the same image as {char!r} (a placeholder)")
        else:
            seen[key] = char
    return out


def ttf_canvases(path: Path, check_names: bool = True) -> tuple[dict[str, np.ndarray], FontReport]:
    """The font's usable characters as 256-pixel canvases, and the report of what was skipped."""
    from matplotlib.ft2font import FT2Font

    report = FontReport(path.name, "ttf")
    ft = FT2Font(str(path))
    font = _pil_font(path)
    canvases: dict[str, np.ndarray] = {}
    for char in CLASSES:
        index = ft.get_char_index(ord(char))
        if index == 0:
            report.skipped[char] = "not in the font's cmap"
            continue
        name = ft.get_glyph_name(index)
        if check_names and name not in expected_glyph_names(char):
            report.skipped[char] = f"cmap maps it to glyph {name!r}"
            continue
        canvases[char] = render_ttf(font, char)
    missing = notdef_codepoint(path)
    notdef = None if missing is None else render_ttf(font, missing)
    for char, why in rendering_problems(canvases, notdef).items():
        report.skipped[char] = why
        del canvases[char]
    report.used = [c for c in CLASSES if c in canvases]
    return canvases, report


def _hershey():
    try:
        from HersheyFonts import HersheyFonts
    except ImportError:
        raise SourceError(f"glyphs2: the Hershey fonts package is not installed (pip install {HERSHEY_PIP})") from None
    return HersheyFonts()


def stroke_hershey(strokes: list[list[tuple[float, float]]], pen: float) -> np.ndarray:
    """Vector strokes drawn with a round pen of diameter `pen` x the glyph's larger side, white on
    black, centred on a (256, 256) canvas: uint8."""
    from PIL import Image, ImageDraw

    pts = np.array([p for s in strokes for p in s], dtype=np.float64)  # (P, 2)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    side = 0.6 * _RENDER_PX
    scale = side / max(float((hi - lo).max()), 1e-9)
    width = max(1, round(pen * side))
    centre = (lo + hi) / 2
    canvas = Image.new("L", (_RENDER_PX, _RENDER_PX), 0)
    draw = ImageDraw.Draw(canvas)
    r = width / 2
    for s in strokes:
        xy = [tuple((np.asarray(p, dtype=np.float64) - centre) * scale + _RENDER_PX / 2) for p in s]
        if len(xy) > 1:
            draw.line(xy, fill=255, width=width)
        for x, y in xy:  # round joints and caps (and dots)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    return np.asarray(canvas)


def hershey_canvases(name: str) -> tuple[dict[str, list[np.ndarray]], FontReport]:
    """Per usable character of Hershey font `name`, one canvas per pen width."""
    h = _hershey()
    h.load_default_font(name)
    report = FontReport(f"hershey:{name}", "hershey")
    glyphs = h.all_glyphs
    strokes: dict[str, list] = {}
    for char in CLASSES:
        g = glyphs.get(char)
        if g is None or not any(len(s) for s in g.strokes):
            report.skipped[char] = "no strokes in the font"
        else:
            strokes[char] = [list(s) for s in g.strokes if len(s)]
    out = {c: [stroke_hershey(s, pen) for pen in HERSHEY_PENS] for c, s in strokes.items()}
    for char, why in rendering_problems({c: v[1] for c, v in out.items()}, None).items():
        report.skipped[char] = why
        del out[char]
    report.used = [c for c in CLASSES if c in out]
    return out, report


@functools.lru_cache(maxsize=2)
def templates(res: int) -> Templates:
    """All templates at canvas size `res` (cached): every usable (font, class[, pen])."""
    images, labels, font_ids, fonts, reports = [], [], [], [], []
    sources: list[tuple[dict[str, list[np.ndarray]], FontReport]] = []
    for path in ttf_paths():
        canvases, report = ttf_canvases(path)
        sources.append(({c: [v] for c, v in canvases.items()}, report))
    for name in HERSHEY_FONTS:
        sources.append(hershey_canvases(name))
    kept: dict[int, set[bytes]] = {}  # class -> template bytes already kept (fonts sharing a glyph)
    for canvases, report in sources:
        fid = len(fonts)
        used = []
        for char in report.used:
            label = CLASSES.index(char)
            fitted = [fit_canvas(c, res, TEMPLATE_BOX) for c in canvases[char]]
            if fitted[0].tobytes() in kept.setdefault(label, set()):
                report.skipped[char] = "same template as an earlier font's"
                continue
            kept[label].add(fitted[0].tobytes())
            used.append(char)
            for t in fitted:
                images.append(t)
                labels.append(label)
                font_ids.append(fid)
        report.used = used
        reports.append(report)
        if used:
            fonts.append(report.name)
    return Templates(np.stack(images), np.asarray(labels, dtype=np.int64), np.asarray(font_ids, dtype=np.int64),
                     tuple(fonts), tuple(reports))
