import json
from pathlib import Path

import numpy as np
import pytest

from ctl.data import context_box, load_dataset
from ctl.images import crop, load_image
from ctl.synthetic import MANIFEST, generate

SMALL = {"scenes": 40, "products_per_category": 12, "categories": 3}


def read_dataset(root: Path, domain: str = "synthetic") -> tuple[list[dict], dict[str, str]]:
    pairs = [json.loads(line) for line in (root / f"{domain}.json").read_text().splitlines()]
    return pairs, json.loads((root / f"{domain}-cat.json").read_text())


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("synthetic"), **SMALL)


def test_same_seed_same_bytes_other_seed_differs(small: Path, tmp_path: Path) -> None:
    assert snapshot(generate(tmp_path / "again", **SMALL)) == snapshot(small)
    other = generate(tmp_path / "other", **SMALL, seed=1)
    assert read_dataset(other) != read_dataset(small)
    assert snapshot(other)[MANIFEST] != snapshot(small)[MANIFEST]


def test_layout_parses_as_stl(small: Path) -> None:
    pairs, categories = read_dataset(small)
    assert len(pairs) >= SMALL["scenes"]
    assert len(set(categories.values())) == SMALL["categories"]
    assert all(path.startswith("Synthetic|") for path in categories.values())
    scenes = {p["scene"] for p in pairs}
    for sig in scenes | set(categories):
        assert len(sig) == 32 and int(sig, 16) >= 0
        image = load_image(small / "images" / f"{sig}.jpg")
        assert image.mode == "RGB" and max(image.size) == 256
    for pair in pairs:
        assert pair["product"] in categories and pair["scene"] not in categories
        left, top, right, bottom = pair["bbox"]
        assert 0 <= left < right <= 1 and 0 <= top < bottom <= 1
    dataset = load_dataset(small)
    assert not dataset.report.counts() and len(dataset.categories) == len(categories)


def test_scenes_and_keys_with_several_answers(small: Path) -> None:
    pairs, categories = read_dataset(small)
    boxes_per_scene: dict[str, set] = {}
    products_per_key: dict[tuple, list[str]] = {}
    for pair in pairs:
        boxes_per_scene.setdefault(pair["scene"], set()).add(tuple(pair["bbox"]))
        products_per_key.setdefault((pair["scene"], tuple(pair["bbox"])), []).append(pair["product"])
    assert any(len(boxes) == 2 for boxes in boxes_per_scene.values())
    shared = [products for products in products_per_key.values() if len(products) > 1]
    assert shared and all(len({categories[p] for p in products}) == 1 for products in shared)


def test_catalog_holds_products_in_no_pair(small: Path) -> None:
    pairs, categories = read_dataset(small)
    paired = {p["product"] for p in pairs}
    assert len(paired) == len(pairs)  # every pair has its own product
    unpaired = set(categories) - paired
    assert len(unpaired) == SMALL["products_per_category"] * SMALL["categories"]
    for path in set(categories.values()):
        assert sum(categories[sig] == path for sig in unpaired) == SMALL["products_per_category"]


def test_second_call_does_nothing_and_repairs_or_replaces_otherwise(tmp_path: Path) -> None:
    params = {"scenes": 6, "products_per_category": 2, "categories": 2}
    generate(tmp_path, **params)
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    generate(tmp_path, **params)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == mtimes

    victim = next((tmp_path / "images").iterdir())
    victim.unlink()
    generate(tmp_path, **params)
    assert victim.exists()

    generate(tmp_path, **{**params, "scenes": 7})
    pairs, _ = read_dataset(tmp_path)
    assert len({p["scene"] for p in pairs}) == 7


def test_rejects_bad_parameters(tmp_path: Path) -> None:
    for bad in ({"scenes": 0}, {"categories": 0}, {"categories": 99}, {"products_per_category": -1},
                {"domain": ""}, {"domain": "a/b"}, {"domain": "synthetic-manifest"}):
        with pytest.raises(ValueError):
            generate(tmp_path, **bad)


def vivid_colour(image) -> np.ndarray:
    """Mean colour of the saturated pixels: the items, not the muted backgrounds."""
    pixels = np.asarray(image, dtype=np.float32).reshape(-1, 3)
    vivid = pixels.max(axis=1) - pixels.min(axis=1) > 55
    return pixels[vivid].mean(axis=0) if vivid.sum() >= 20 else pixels.mean(axis=0)


def test_product_matches_its_scene_context_in_colour(small: Path) -> None:
    pairs, categories = read_dataset(small)
    colours = {sig: vivid_colour(load_image(small / "images" / f"{sig}.jpg")) for sig in categories}
    rng = np.random.default_rng(0)
    wins = []
    for pair in pairs:
        scene = load_image(small / "images" / f"{pair['scene']}.jpg")
        context = vivid_colour(crop(scene, context_box(pair["bbox"])))
        negatives = [s for s, c in categories.items() if c == categories[pair["product"]] and s != pair["product"]]
        negative = negatives[rng.integers(len(negatives))]
        wins.append(np.linalg.norm(colours[pair["product"]] - context) < np.linalg.norm(colours[negative] - context))
    assert np.mean(wins) > 0.8
