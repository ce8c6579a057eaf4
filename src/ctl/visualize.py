"""Pictures of what the model does: attention over the scene, and ranked products."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ctl.io import atomic_path


def heat_colors(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB, dark blue through red to yellow."""
    stops = np.array([[0, 0, 80], [40, 40, 200], [220, 40, 40], [255, 230, 60]], dtype=np.float32)
    position = np.clip(values, 0, 1) * (len(stops) - 1)
    low = np.floor(position).astype(int).clip(0, len(stops) - 2)
    frac = (position - low)[..., None]
    return ((1 - frac) * stops[low] + frac * stops[low + 1]).astype(np.uint8)


def attention_overlay(crop: Image.Image, attention: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """The scene crop with the (H, W) attention grid laid over it as a heat map."""
    peak = attention.max()
    heat = Image.fromarray(heat_colors(attention / peak if peak > 0 else attention))
    heat = heat.resize(crop.size, Image.Resampling.BILINEAR)
    return Image.blend(crop.convert("RGB"), heat, alpha)


def ranking_strip(scene: Image.Image, products: Sequence[tuple[Image.Image, str]], scene_caption: str = "scene", tile: int = 160) -> Image.Image:
    """The scene (or its attention overlay) followed by the ranked products, each captioned."""
    caption = 18
    sheet = Image.new("RGB", (tile * (len(products) + 1), tile + caption), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, text) in enumerate([(scene, scene_caption)] + list(products)):
        thumb = image.convert("RGB")
        thumb.thumbnail((tile - 4, tile - 4))
        sheet.paste(thumb, (i * tile + (tile - thumb.width) // 2, (tile - thumb.height) // 2))
        draw.text((i * tile + 4, tile + 3), text, fill="black")
    return sheet


def stack(images: Sequence[Image.Image]) -> Image.Image:
    """Images one above the other, on white."""
    sheet = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images)), "white")
    top = 0
    for image in images:
        sheet.paste(image, (0, top))
        top += image.height
    return sheet


def save_png(image: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path
