"""Save a batch of images as one PNG grid (PIL; no torchvision)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dpldm.utils.io import atomic_path


def image_grid(images: torch.Tensor, nrow: int, pad: int = 2) -> np.ndarray:
    """images (N, C, H, W) in [-1, 1] -> uint8 (rows*(H+pad)+pad, nrow*(W+pad)+pad, C), row-major."""
    n, c, h, w = images.shape
    rows = -(-n // nrow)
    u8 = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = u8[i]
    return grid


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int, pad: int = 2, upscale: int = 1,
                    tag: tuple[str, str] | None = None) -> Path:
    """Write `images` as a PNG grid (atomically); `upscale` enlarges pixels (nearest); `tag`: a
    (key, value) PNG text chunk saying which command wrote it (what its --overwrite may replace)."""
    from PIL.PngImagePlugin import PngInfo

    grid = image_grid(images, nrow, pad)
    img = Image.fromarray(grid[:, :, 0] if grid.shape[2] == 1 else grid)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.Resampling.NEAREST)
    info = PngInfo()
    if tag is not None:
        info.add_text(*tag)
    path = Path(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG", pnginfo=info)
    return path
