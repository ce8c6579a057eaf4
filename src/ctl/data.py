"""STL-format datasets: pairs, categories, scene context crops, splits and negatives.

An STL folder holds ``<domain>.json`` (JSON lines ``{"product", "scene", "bbox": [l, t, r, b]}``),
``<domain>-cat.json`` (product -> category path, the whole catalog) and ``images/SIG.jpg``.
Loading never stops at one bad record: it is skipped, and the :class:`SkipReport` names it.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ctl.images import Box, ImageRef


class DataError(ValueError):
    """A dataset that cannot be read at all (as opposed to single records, which are skipped)."""


@dataclass
class SkipReport:
    """What loading left out, each with the input's name and the reason."""

    skipped: list[tuple[str, str]] = field(default_factory=list)

    def add(self, name: str, reason: str) -> None:
        self.skipped.append((name, reason))

    def counts(self) -> dict[str, int]:
        return dict(collections.Counter(reason.split(":")[0] for _, reason in self.skipped))

    def summary(self, limit: int = 5) -> str:
        if not self.skipped:
            return "nothing skipped"
        lines = [f"skipped {len(self.skipped)} input(s):"]
        for reason, count in sorted(self.counts().items(), key=lambda kv: -kv[1]):
            examples = [name for name, r in self.skipped if r.split(":")[0] == reason][:limit]
            lines.append(f"  {count:6d}  {reason}  (e.g. {', '.join(examples)})")
        return "\n".join(lines)


@dataclass(frozen=True)
class Query:
    """One box of one scene to fill with a product of one category.

    ``positives`` are every product of that category annotated at that (scene, box): each is a
    correct answer. ``crop`` is the context region the model sees. ``negatives`` is set only by an
    explicit query file; otherwise negatives are sampled.
    """

    scene: str
    bbox: Box
    category: str
    positives: tuple[str, ...]
    crop: Box
    negatives: tuple[str, ...] | None = None


def context_box(bbox: Box | None) -> Box:
    """The scene region shown to the model: the largest of the regions above, below, left and right
    of the product's box, so that the product itself is hidden. No box: the whole scene."""
    if bbox is None:
        return (0.0, 0.0, 1.0, 1.0)
    left, top, right, bottom = bbox
    # Each candidate spans the full other axis, so comparing the free extent compares areas.
    regions = [
        (top, (0.0, 0.0, 1.0, top)),
        (1.0 - bottom, (0.0, bottom, 1.0, 1.0)),
        (left, (0.0, 0.0, left, 1.0)),
        (1.0 - right, (right, 0.0, 1.0, 1.0)),
    ]
    return max(regions, key=lambda region: region[0])[1]


def validate_box(raw, name: str) -> Box:
    """A normalised (left, top, right, bottom) box, or a ValueError naming ``name``."""
    numbers = isinstance(raw, (list, tuple)) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw)
    if not numbers or len(raw) != 4:
        raise ValueError(f"{name}: box must be four numbers [left, top, right, bottom], got {raw!r}")
    box = tuple(float(v) for v in raw)
    left, top, right, bottom = box
    if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in box):
        raise ValueError(f"{name}: box {list(box)} lies outside [0, 1]")
    if left >= right or top >= bottom:
        raise ValueError(f"{name}: box {list(box)} is empty (needs left < right and top < bottom)")
    return box  # type: ignore[return-value]


def crop_size_px(image_size: tuple[int, int], crop: Box) -> tuple[int, int]:
    width, height = image_size
    return round((crop[2] - crop[0]) * width), round((crop[3] - crop[1]) * height)


@dataclass
class Dataset:
    root: Path
    categories: dict[str, str]  # product -> category path, the whole usable catalog
    queries: list[Query]
    scene_products: dict[str, frozenset[str]]  # every product annotated anywhere in a scene
    report: SkipReport

    def image_path(self, sig: str) -> Path:
        return self.root / "images" / f"{sig}.jpg"

    @property
    def category_names(self) -> list[str]:
        return sorted(set(self.categories.values()))

    def catalog(self, category: str) -> list[str]:
        """The category's products, sorted."""
        return self._catalogs.get(category, [])

    @functools.cached_property
    def _catalogs(self) -> dict[str, list[str]]:
        by_category: dict[str, list[str]] = collections.defaultdict(list)
        for product in sorted(self.categories):
            by_category[self.categories[product]].append(product)
        return dict(by_category)

    def discard(self, failed: dict[ImageRef, str]) -> None:
        """Drop the products and queries whose image turned out unreadable, reporting each."""
        if not failed:
            return
        bad = {ref.path.stem: reason for ref, reason in failed.items()}
        for product in [p for p in self.categories if p in bad]:
            self.report.add(product, f"product image unreadable: {bad[product]}")
            del self.categories[product]
        for query in self.queries:
            if query.scene in bad:
                self.report.add(query.scene, f"scene image unreadable: {bad[query.scene]}")
        self.queries = [q for q in self.queries if q.scene not in bad and all(p in self.categories for p in q.positives)]
        self.__dict__.pop("_catalogs", None)  # drop the cached per-category lists

    def split(self, fractions: tuple[float, float, float], seed: int) -> dict[str, list[Query]]:
        """Train / validation / test queries, split by scene so that no scene is in two splits.

        Each scene's side is fixed by a seeded hash of its id, so adding scenes to a dataset
        never moves the others."""
        cut_train, cut_val = fractions[0], fractions[0] + fractions[1]
        splits: dict[str, list[Query]] = {"train": [], "val": [], "test": []}
        for query in self.queries:
            u = _unit_hash(f"{seed}:{query.scene}")
            name = "train" if u < cut_train else "val" if u < cut_val else "test"
            splits[name].append(query)
        return splits

    def sample_negatives(self, query: Query, count: int, rng: random.Random) -> list[str]:
        """Up to ``count`` distinct products of the query's category, none annotated in its scene."""
        excluded = self.scene_products.get(query.scene, frozenset()) | set(query.positives)
        pool = [p for p in self.catalog(query.category) if p not in excluded]
        return rng.sample(pool, min(count, len(pool)))


def _unit_hash(text: str) -> float:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") / 2**64


def find_files(root: Path, domain: str = "") -> tuple[Path, Path]:
    """The pairs file and category file of an STL folder."""
    if not root.is_dir():
        raise DataError(f"{root}: no such dataset folder")
    if not domain:
        found = sorted(p.name[: -len("-cat.json")] for p in root.glob("*-cat.json"))
        if len(found) != 1:
            listed = ", ".join(found) or "none"
            raise DataError(f"{root}: expected one <domain>-cat.json, found {listed}; name the domain")
        domain = found[0]
    pairs, categories = root / f"{domain}.json", root / f"{domain}-cat.json"
    for path in (pairs, categories):
        if not path.is_file():
            raise DataError(f"{path}: missing (an STL folder holds {pairs.name}, {categories.name} and images/)")
    return pairs, categories


def read_categories(path: Path) -> dict[str, str]:
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a JSON object of product -> category ({err})") from err
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise DataError(f"{path}: expected one JSON object mapping product signature -> category path")
    return raw


def read_jsonl(path: Path, report: SkipReport) -> Iterable[tuple[str, dict]]:
    """Records of a JSON-lines file, each with a name ``file:line``; bad lines go to the report."""
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not a text file of JSON lines ({err})") from err
    if lines and lines[0].lstrip().startswith("["):
        raise DataError(f"{path}: expected JSON lines (one object per line), not a JSON array")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        name = f"{path.name}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            report.add(name, f"not JSON: {err.msg}")
            continue
        if not isinstance(record, dict):
            report.add(name, "not a JSON object")
            continue
        yield name, record


def load_dataset(root: str | Path, domain: str = "", min_crop_px: int = 32) -> Dataset:
    """Read an STL folder; records that cannot be used are skipped and reported, never fatal."""
    root = Path(root).expanduser()
    pairs_path, categories_path = find_files(root, domain)
    report = SkipReport()

    listed = read_categories(categories_path)
    categories = {}
    for product, category in listed.items():
        if (root / "images" / f"{product}.jpg").is_file():
            categories[product] = category
        else:
            report.add(product, "product image missing")

    groups: dict[tuple[str, Box, str], list[str]] = collections.defaultdict(list)
    seen: set[tuple[str, str, Box]] = set()
    scene_products: dict[str, set[str]] = collections.defaultdict(set)
    for name, record in read_jsonl(pairs_path, report):
        try:
            scene, product = str(record["scene"]), str(record["product"])
            bbox = validate_box(record["bbox"], name)
        except KeyError as err:
            report.add(name, f"missing field: {err.args[0]}")
            continue
        except ValueError as err:
            report.add(name, f"bad box: {err}")
            continue
        if product not in categories:
            reason = "product image missing" if product in listed else "product has no category"
            report.add(f"{name} ({product})", reason)
            continue
        if (scene, product, bbox) in seen:
            report.add(name, "duplicate pair")
            continue
        seen.add((scene, product, bbox))
        scene_products[scene].add(product)
        groups[(scene, bbox, categories[product])].append(product)

    if not seen:
        raise DataError(f"{pairs_path}: no usable pair\n{report.summary()}")
    queries = []
    scene_sizes: dict[str, tuple[int, int] | str] = {}
    for (scene, bbox, category), products in groups.items():
        if scene not in scene_sizes:
            scene_sizes[scene] = _image_size(root / "images" / f"{scene}.jpg")
        size = scene_sizes[scene]
        if isinstance(size, str):
            report.add(scene, size)
            continue
        crop = context_box(bbox)
        if min(crop_size_px(size, crop)) < min_crop_px:
            report.add(f"{scene} {list(bbox)}", f"context crop below {min_crop_px} px")
            continue
        queries.append(Query(scene, bbox, category, tuple(products), crop))

    return Dataset(root, categories, queries, {s: frozenset(p) for s, p in scene_products.items()}, report)


def _image_size(path: Path) -> tuple[int, int] | str:
    """The image's size from its header, or the reason it cannot be used."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            # EXIF orientations 5-8 turn the picture a quarter: load_image returns it with sides swapped
            if image.getexif().get(0x0112) in (5, 6, 7, 8):
                return height, width
            return width, height
    except FileNotFoundError:
        return "scene image missing"
    except (UnidentifiedImageError, OSError) as err:
        return f"scene image unreadable: {err}"


def load_queries(path: str | Path, dataset: Dataset) -> list[Query]:
    """An explicit query file for reproducible benchmarks: JSON lines
    ``{"scene", "bbox", "category", "positive": SIG or [SIG, ...], "negatives": [SIG, ...]}``."""
    path = Path(path)
    report = dataset.report
    queries = []
    for name, record in read_jsonl(path, report):
        try:
            bbox = validate_box(record["bbox"], name) if record.get("bbox") is not None else None
            positives = record["positive"]
            positives = tuple([positives] if isinstance(positives, str) else positives)
            if not positives:
                raise ValueError("no positive product")
            query = Query(
                scene=str(record["scene"]),
                bbox=bbox,  # type: ignore[arg-type]
                category=str(record["category"]),
                positives=positives,
                crop=context_box(bbox),
                negatives=tuple(record["negatives"]),
            )
        except KeyError as err:
            report.add(name, f"missing field: {err.args[0]}")
            continue
        except (ValueError, TypeError) as err:
            report.add(name, f"bad query: {err}")
            continue
        if query.category not in dataset.category_names:
            report.add(name, f"unknown category: {query.category}")
            continue
        unknown = [p for p in query.positives + query.negatives if p not in dataset.categories]
        if unknown:
            report.add(name, f"product not in catalog: {unknown[0]}")
            continue
        if not dataset.image_path(query.scene).is_file():
            report.add(name, "scene image missing")
            continue
        queries.append(query)
    return queries


class NegativeSampler:
    """Fast same-category negative sampling for training, from the whole catalog of the category."""

    def __init__(self, dataset: Dataset, product_index: dict[str, int]):
        self.pools = {c: np.array([product_index[p] for p in dataset.catalog(c)]) for c in dataset.category_names}
        self.excluded = {
            s: {product_index[p] for p in products if p in product_index}
            for s, products in dataset.scene_products.items()
        }

    def sample(self, queries: list[Query], rng: np.random.Generator) -> np.ndarray:
        """One negative product row per query."""
        out = np.empty(len(queries), dtype=np.int64)
        for i, query in enumerate(queries):
            pool, excluded = self.pools[query.category], self.excluded.get(query.scene, set())
            for _ in range(100):  # the scene's own products are a tiny share of a category
                candidate = int(pool[rng.integers(len(pool))])
                if candidate not in excluded:
                    break
            else:
                raise DataError(f"category {query.category!r} has no product outside scene {query.scene}")
            out[i] = candidate
        return out
