"""A small Shop-The-Look-format dataset drawn by code: licence-free, deterministic from a seed, seconds to make.

Every scene has a style: one of twelve colours and a texture (plain, stripes, dots or checks).
The other items of the outfit, drawn around a product's box, carry that style, and so do the
product in the box and its catalog image. Catalog products of each category come in every style,
so the product that goes with a scene can be told from its same-category negatives only by
reading the scene's context: the largest region around the box, which is all the model sees.

Nuisance on top: muted backgrounds with a floor and neutral clutter, grids of 2-4 rows and columns,
jittered item sizes and positions, loose boxes, an occasional item in another style, per-item colour
jitter, scene lighting, pixel noise and JPEG compression.
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ctl.data import context_box
from ctl.images import Box
from ctl.io import write_bytes_atomic, write_text_atomic

PixelBox = tuple[int, int, int, int]

GENERATOR_VERSION = 2  # bump when the drawing changes, so existing datasets are regenerated
MANIFEST = "synthetic-manifest.json"  # beside <domain>.json, so not "synthetic.json"
TEXTURES = ("plain", "stripes", "dots", "checks")
# Named fashion colours as (hue, saturation, value): styles recur across scenes, as they do in real outfits.
PALETTE = (
    (0.0, 0.8, 0.8), (0.07, 0.85, 0.9), (0.13, 0.8, 0.8), (0.2, 0.7, 0.55), (0.33, 0.7, 0.6), (0.47, 0.75, 0.6),
    (0.55, 0.6, 0.9), (0.62, 0.8, 0.5), (0.75, 0.6, 0.7), (0.9, 0.55, 0.9), (0.95, 0.8, 0.5), (0.06, 0.7, 0.5),
)

# Shapes in unit coordinates (x right, y down): ("poly", points), ("ellipse", box) or ("line", points, width).
Part = tuple
Shape = list[Part]


def _shoes(v: np.ndarray) -> Shape:
    top = 0.45 * v[0]  # a low shoe up to a boot
    toe = 0.55 + 0.15 * v[1]
    return [("poly", [(0.02, top), (0.3, top), (0.38, 0.5), (toe, 0.6), (0.95, 0.72), (1, 0.88), (1, 1), (0, 1)])]


def _bags(v: np.ndarray) -> Shape:
    taper = 0.12 * v[0]
    handle = 0.05 + 0.2 * v[1]
    return [
        ("poly", [(0.08 + taper, 0.38), (0.92 - taper, 0.38), (1, 1), (0, 1)]),
        ("line", [(0.3, 0.4), (0.3, handle), (0.7, handle), (0.7, 0.4)], 0.07),
    ]


def _tops(v: np.ndarray) -> Shape:
    sleeve = 0.3 + 0.45 * v[0]  # short to long sleeves
    hem = 0.8 + 0.2 * v[1]
    return [("poly", [
        (0.3, 0), (0.42, 0.07), (0.58, 0.07), (0.7, 0), (1, 0.18), (0.94, sleeve), (0.8, sleeve),
        (0.78, hem), (0.22, hem), (0.2, sleeve), (0.06, sleeve), (0, 0.18),
    ])]


def _pants(v: np.ndarray) -> Shape:
    flare = 0.1 * v[0]
    crotch = 0.25 + 0.15 * v[1]
    return [("poly", [(0.08, 0), (0.92, 0), (1, 1), (0.58 - flare, 1), (0.5, crotch), (0.42 + flare, 1), (0, 1)])]


def _sunglasses(v: np.ndarray) -> Shape:
    lens = 0.6 + 0.35 * v[0]
    return [
        ("ellipse", (0, 0.05, 0.43, lens)),
        ("ellipse", (0.57, 0.05, 1, lens)),
        ("line", [(0.4, 0.25), (0.6, 0.25)], 0.05),
    ]


def _hats(v: np.ndarray) -> Shape:
    brim = 0.15 * v[0]
    return [("ellipse", (0.22, 0, 0.78, 1.1)), ("ellipse", (brim, 0.68, 1 - brim, 1))]


def _skirts(v: np.ndarray) -> Shape:
    waist = 0.2 + 0.15 * v[0]
    return [("poly", [(waist, 0), (1 - waist, 0), (1, 1), (0, 1)])]


def _dresses(v: np.ndarray) -> Shape:
    waist = 0.3 + 0.15 * v[0]
    return [
        ("poly", [(0.3, 0.08), (0.7, 0.08), (0.68, waist), (1, 1), (0, 1), (0.32, waist)]),
        ("line", [(0.33, 0.1), (0.36, 0)], 0.05),
        ("line", [(0.67, 0.1), (0.64, 0)], 0.05),
    ]


@dataclass(frozen=True)
class Category:
    path: str
    aspect: float  # width / height of the shape
    shape: Callable[[np.ndarray], Shape]  # the shape, given the product's proportions


CATEGORIES = (
    Category("Synthetic|Shoes", 1.7, _shoes),
    Category("Synthetic|Bags", 1.1, _bags),
    Category("Synthetic|Shirts & Tops", 1.0, _tops),
    Category("Synthetic|Pants", 0.55, _pants),
    Category("Synthetic|Sunglasses", 2.4, _sunglasses),
    Category("Synthetic|Hats", 1.5, _hats),
    Category("Synthetic|Skirts", 0.9, _skirts),
    Category("Synthetic|Dresses", 0.6, _dresses),
)


@dataclass(frozen=True)
class Style:
    hue: float
    sat: float
    val: float
    texture: str
    light_accent: bool  # the texture's second colour: a lighter or a darker tone of the same hue


@dataclass(frozen=True)
class Product:
    sig: str
    category: int
    style: Style
    variant: tuple[float, float]  # the shape's proportions, so products of one category differ


@dataclass(frozen=True)
class SceneSpec:
    sig: str
    style: Style
    keys: tuple[tuple[Product, ...], ...]  # one entry per box: the products that are correct answers for it


def generate(
    out: str | Path,
    *,
    scenes: int = 300,
    products_per_category: int = 120,
    categories: int = 4,
    seed: int = 0,
    domain: str = "synthetic",
) -> Path:
    """Write an STL-format dataset into ``out`` and return ``out``; a no-op if ``out`` already holds this one.

    ``scenes`` scenes carry about 1.3 pairs each, every pair with its own product; ``products_per_category``
    more products per category are in no pair (the negative pool).
    """
    if scenes < 1 or products_per_category < 0 or not 1 <= categories <= len(CATEGORIES):
        raise ValueError(f"need scenes >= 1, products_per_category >= 0, 1 <= categories <= {len(CATEGORIES)}")
    if not domain or "/" in domain or domain.startswith(".") or f"{domain}.json" == MANIFEST:
        raise ValueError(f"domain={domain!r}: a plain file name")
    out = Path(out)
    params = {"version": GENERATOR_VERSION, "scenes": scenes, "products_per_category": products_per_category,
              "categories": categories, "seed": seed, "domain": domain}
    specs, products = _plan(scenes, products_per_category, categories, seed, domain)
    images = out / "images"
    files = [out / f"{domain}.json", out / f"{domain}-cat.json"]
    files += [images / f"{item.sig}.jpg" for item in [*specs, *products]]
    if _read_manifest(out / MANIFEST) == params and all(f.exists() for f in files):
        return out

    (out / MANIFEST).unlink(missing_ok=True)  # written again last: its presence means a complete dataset
    for product in products:
        write_bytes_atomic(images / f"{product.sig}.jpg", _jpeg(_catalog_image(product)))
    lines = []
    for spec in specs:
        image, boxes = _scene_image(spec, categories)
        write_bytes_atomic(images / f"{spec.sig}.jpg", _jpeg(image))
        for key, box in zip(spec.keys, boxes):
            bbox = [round(c, 6) for c in box]
            lines += [json.dumps({"product": p.sig, "scene": spec.sig, "bbox": bbox}) for p in key]
    write_text_atomic(files[0], "".join(line + "\n" for line in lines))
    catalog = {p.sig: CATEGORIES[p.category].path for p in sorted(products, key=lambda p: p.sig)}
    write_text_atomic(files[1], json.dumps(catalog, indent=0) + "\n")
    write_text_atomic(out / MANIFEST, json.dumps(params, indent=2) + "\n")
    return out


def _read_manifest(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _sig(domain: str, seed: int, kind: str, index: int) -> str:
    return hashlib.md5(f"{domain}:{seed}:{kind}:{index}".encode()).hexdigest()


def _random_style(rng: np.random.Generator) -> Style:
    colour = PALETTE[rng.integers(len(PALETTE))]
    return Style(*colour, texture=TEXTURES[rng.integers(len(TEXTURES))], light_accent=bool(rng.integers(2)))


def _plan(
    scenes: int, products_per_category: int, categories: int, seed: int, domain: str
) -> tuple[list[SceneSpec], list[Product]]:
    """Who goes where, in which style; no pixels yet, so it is cheap enough to run just to list the files."""
    rng = np.random.default_rng(seed)
    products: list[Product] = []

    def product(category: int, style: Style) -> Product:
        p = Product(_sig(domain, seed, "product", len(products)), category, style,
                    (float(rng.uniform()), float(rng.uniform())))
        products.append(p)
        return p

    specs = []
    for i in range(scenes):
        style = _random_style(rng)
        n_boxes = 2 if categories > 1 and rng.uniform() < 0.25 else 1
        chosen = rng.choice(categories, size=n_boxes, replace=False)
        keys = tuple(
            tuple(product(int(c), style) for _ in range(2 if rng.uniform() < 0.07 else 1)) for c in chosen
        )
        specs.append(SceneSpec(_sig(domain, seed, "scene", i), style, keys))
    for c in range(categories):
        for _ in range(products_per_category):
            product(c, _random_style(rng))
    return specs, products


def _rng(sig: str) -> np.random.Generator:
    return np.random.default_rng(int(sig, 16))


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0), 1), min(max(v, 0), 1))) * 255


def _colours(style: Style, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The style's main and accent colours under a little per-item jitter (dye lots, lighting)."""
    main = _hsv(style.hue + rng.normal(0, 0.015), style.sat + rng.normal(0, 0.04), style.val + rng.normal(0, 0.04))
    accent = main + (255 - main) * 0.65 if style.light_accent else main * 0.45
    return main, accent


def _pattern(w: int, h: int, style: Style, rng: np.random.Generator) -> np.ndarray:
    main, accent = _colours(style, rng)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    period = rng.uniform(8, 15)
    if style.texture == "stripes":
        angle = np.deg2rad(rng.choice([0, 45, 90, 135]))
        on = (x * np.cos(angle) + y * np.sin(angle)) % period < period * 0.45
    elif style.texture == "dots":
        on = (x % period - period / 2) ** 2 + (y % period - period / 2) ** 2 < (period * 0.3) ** 2
    elif style.texture == "checks":
        on = (np.floor(x / period) + np.floor(y / period)) % 2 == 1
    else:
        on = np.zeros((h, w), dtype=bool)
    shade = 1.05 - 0.2 * y / max(h - 1, 1)  # light from above
    return np.where(on[..., None], accent, main) * shade[..., None]


def _draw_item(image: Image.Image, box: PixelBox, category: int, variant: tuple[float, float],
               style: Style, rng: np.random.Generator) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    fill = Image.fromarray(np.clip(_pattern(w, h, style, rng), 0, 255).astype(np.uint8))
    mask = Image.new("L", (w, h), 0)
    draw_mask, draw_fill = ImageDraw.Draw(mask), ImageDraw.Draw(fill)
    edge = tuple(int(c * 0.55) for c in _colours(style, rng)[0])

    def scale(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        return [(px * (w - 1), py * (h - 1)) for px, py in points]

    for part in CATEGORIES[category].shape(np.array(variant)):
        if part[0] == "poly":
            draw_mask.polygon(scale(part[1]), fill=255)
            draw_fill.polygon(scale(part[1]), outline=edge, width=2)
        elif part[0] == "ellipse":
            (ex0, ey0), (ex1, ey1) = scale([part[1][:2], part[1][2:]])
            draw_mask.ellipse((ex0, ey0, ex1, ey1), fill=255)
            draw_fill.ellipse((ex0, ey0, ex1, ey1), outline=edge, width=2)
        else:
            draw_mask.line(scale(part[1]), fill=255, width=max(2, round(part[2] * w)))
    image.paste(fill, (x0, y0), mask)


def _fit(cell: PixelBox, aspect: float, rng: np.random.Generator, fill: tuple[float, float]) -> PixelBox:
    """A box of the given aspect at a random size and position inside ``cell``."""
    cx0, cy0, cx1, cy1 = cell
    f = rng.uniform(*fill)
    w = min((cx1 - cx0) * f, (cy1 - cy0) * f * aspect)
    h = w / aspect
    x0 = cx0 + rng.uniform(0, cx1 - cx0 - w)
    y0 = cy0 + rng.uniform(0, cy1 - cy0 - h)
    return int(x0), int(y0), max(int(x0 + w), int(x0) + 4), max(int(y0 + h), int(y0) + 4)


def _finish(pixels: np.ndarray, rng: np.random.Generator, noise: float) -> Image.Image:
    pixels = pixels + noise * rng.standard_normal(pixels.shape, dtype=np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _catalog_image(product: Product) -> Image.Image:
    """The product alone on a plain light background, like a shop's photo."""
    rng = _rng(product.sig)
    w, h = [(256, 256), (200, 256), (256, 200)][rng.integers(3)]
    grey = rng.uniform(232, 252)
    image = Image.new("RGB", (w, h), tuple(int(grey + rng.normal(0, 2)) for _ in range(3)))
    box = _fit((0, 0, w, h), CATEGORIES[product.category].aspect, rng, (0.65, 0.85))
    shadow = int(grey - rng.uniform(10, 25))
    ImageDraw.Draw(image).ellipse((box[0], box[3] - 6, box[2], box[3] + 6), fill=(shadow,) * 3)
    _draw_item(image, box, product.category, product.variant, product.style, rng)
    return _finish(np.asarray(image, dtype=np.float32), rng, noise=2.0)


def _background(w: int, h: int, rng: np.random.Generator) -> Image.Image:
    """A muted wall with a gradient, often a floor, and a few neutral shapes (furniture, frames)."""
    def muted() -> np.ndarray:
        return _hsv(rng.uniform(), rng.uniform(0, 0.16), rng.uniform(0.45, 0.95))

    t = np.linspace(0, 1, h)[:, None, None]
    pixels = muted() * (1 - t) + muted() * t
    pixels = np.broadcast_to(pixels, (h, w, 3)).copy()
    if rng.uniform() < 0.6:
        pixels[int(h * rng.uniform(0.6, 0.85)):] = muted()
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(0, 4)):
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        box = (x0, y0, x0 + rng.uniform(20, w / 2), y0 + rng.uniform(20, h / 2))
        shape = draw.rectangle if rng.uniform() < 0.6 else draw.ellipse
        shape(box, fill=tuple(int(c) for c in muted()))
    return image


def _cells(w: int, h: int, rows: int, cols: int) -> Iterator[PixelBox]:
    for r in range(rows):
        for c in range(cols):
            yield (c * w // cols, r * h // rows, (c + 1) * w // cols, (r + 1) * h // rows)


def _inside(inner: PixelBox, outer: Box, w: int, h: int) -> bool:
    return (inner[0] >= outer[0] * w - 1 and inner[1] >= outer[1] * h - 1
            and inner[2] <= outer[2] * w + 1 and inner[3] <= outer[3] * h + 1)


def _scene_image(spec: SceneSpec, categories: int) -> tuple[Image.Image, list[Box]]:
    """The scene and the normalised box of each of its keys.

    Items sit one to a cell of a grid. Each target's context region holds whole rows or columns
    of cells, and at least two of the items there are drawn in the scene's style.
    """
    rng = _rng(spec.sig)
    w, h = [(256, 256), (192, 256), (170, 256), (256, 192)][rng.choice(4, p=[0.3, 0.3, 0.2, 0.2])]
    rows, cols = int(rng.integers(max(2, h // 110), h // 64 + 1)), int(rng.integers(max(2, w // 110), w // 64 + 1))
    cells = list(_cells(w, h, rows, cols))
    order = rng.permutation(len(cells))
    targets = [keys[0] for keys in spec.keys]
    target_boxes = [_fit(cells[i], CATEGORIES[p.category].aspect, rng, (0.6, 0.95)) for i, p in zip(order, targets)]
    boxes = []
    for x0, y0, x1, y1 in target_boxes:
        pad = rng.integers(0, 5, size=4)  # loose boxes, as in the real data
        boxes.append((max(x0 - pad[0], 0) / w, max(y0 - pad[1], 0) / h,
                      min(x1 + pad[2], w) / w, min(y1 + pad[3], h) / h))

    others = [c for c in range(len(CATEGORIES)) if c not in {p.category for p in targets}]
    items = []  # (box, category, variant, styled)
    for i in order[len(targets):]:
        category = int(rng.choice(others))
        box = _fit(cells[i], CATEGORIES[category].aspect, rng, (0.55, 0.92))
        items.append([box, category, (float(rng.uniform()), float(rng.uniform())), rng.choice(3, p=[0.75, 0.1, 0.15])])
    for box in boxes:
        region = context_box(box)
        inside = [item for item in items if _inside(item[0], region, w, h)]
        styled = sum(item[3] == 0 for item in inside) + sum(_inside(b, region, w, h) for b in target_boxes)
        for item in inside:
            if styled >= 2:
                break
            if item[3] != 0:
                item[3], styled = 0, styled + 1

    image = _background(w, h, rng)
    for box, category, variant, kind in items:
        if kind != 2:  # 2: an empty cell
            style = spec.style if kind == 0 else _random_style(rng)
            _draw_item(image, box, category, variant, style, rng)
    for box, product in zip(target_boxes, targets):
        _draw_item(image, box, product.category, product.variant, product.style, rng)
    lighting = rng.uniform(0.9, 1.05)
    return _finish(np.asarray(image, dtype=np.float32) * lighting, rng, noise=3.0), boxes


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()
