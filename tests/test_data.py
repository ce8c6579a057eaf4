import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctl.data import (
    DataError,
    Dataset,
    NegativeSampler,
    Query,
    SkipReport,
    context_box,
    load_dataset,
    load_queries,
    validate_box,
)

# --------------------------------------------------------------------------- context_box


def _area(box):
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def _overlap(a, b):
    return _area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))


@pytest.mark.parametrize(
    "bbox, expected",
    [
        # above 0.6, below 0.1, left 0.3, right 0.3: the region above wins
        ((0.3, 0.6, 0.7, 0.9), (0.0, 0.0, 1.0, 0.6)),
        # above 0.6, below 0.1, left 0.1, right 0.7: the region right of the box is larger than the one above
        ((0.1, 0.6, 0.3, 0.9), (0.3, 0.0, 1.0, 1.0)),
        # above 0.05, below 0.7: the region below
        ((0.2, 0.05, 0.6, 0.3), (0.0, 0.3, 1.0, 1.0)),
        # a box at the left edge: the region to its right
        ((0.0, 0.2, 0.3, 0.7), (0.3, 0.0, 1.0, 1.0)),
        # a box at the right edge: the region to its left
        ((0.55, 0.1, 1.0, 0.9), (0.0, 0.0, 0.55, 1.0)),
    ],
)
def test_context_box_by_hand(bbox, expected):
    assert context_box(bbox) == pytest.approx(expected)


def test_context_box_without_box_is_whole_image():
    assert context_box(None) == (0.0, 0.0, 1.0, 1.0)


def test_context_box_hides_the_product_and_is_the_largest_side():
    rng = random.Random(3)
    for _ in range(500):
        left, right = sorted(rng.uniform(0, 1) for _ in range(2))
        top, bottom = sorted(rng.uniform(0, 1) for _ in range(2))
        if right - left < 1e-3 or bottom - top < 1e-3:
            continue
        bbox = (left, top, right, bottom)
        ctx = context_box(bbox)
        assert _overlap(ctx, bbox) == pytest.approx(0.0, abs=1e-12)  # the product is never shown
        sides = [(0, 0, 1, top), (0, bottom, 1, 1), (0, 0, left, 1), (right, 0, 1, 1)]
        assert _area(ctx) == pytest.approx(max(_area(s) for s in sides))


# --------------------------------------------------------------------------- validate_box


def test_validate_box_accepts_and_returns_floats():
    assert validate_box([0, 0, 1, 1], "x") == (0.0, 0.0, 1.0, 1.0)
    box = validate_box((0.1, 0.2, 0.3, 0.4), "x")
    assert box == (0.1, 0.2, 0.3, 0.4) and all(isinstance(v, float) for v in box)


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ([-0.1, 0.2, 0.5, 0.6], "outside"),
        ([0.1, 0.2, 1.2, 0.6], "outside"),
        ([0.1, 0.2, 0.5, float("nan")], "outside"),
        ([0.1, 0.2, float("inf"), 0.6], "outside"),
        ([0.5, 0.2, 0.4, 0.6], "empty"),  # left > right
        ([0.5, 0.2, 0.5, 0.6], "empty"),  # left == right
        ([0.1, 0.7, 0.5, 0.6], "empty"),  # top > bottom
        ([0.1, 0.2, 0.3], "four numbers"),
        ([0.1, 0.2, 0.3, 0.4, 0.5], "four numbers"),
        (["a", 0.2, 0.3, 0.4], "four numbers"),
        (["0.1", 0.2, 0.3, 0.4], "four numbers"),  # a numeric string is still not a number
        ([True, 0, 1, 1], "four numbers"),
        ([None, 0.2, 0.3, 0.4], "four numbers"),
        ([[0.1], 0.2, 0.3, 0.4], "four numbers"),
        ("0.1,0.2,0.3,0.4", "four numbers"),
        (None, "four numbers"),
        ({"left": 0.1}, "four numbers"),
    ],
)
def test_validate_box_rejects_naming_the_input(raw, fragment):
    with pytest.raises(ValueError) as err:
        validate_box(raw, "pairs.json:17")
    assert "pairs.json:17" in str(err.value)
    assert fragment in str(err.value)


# --------------------------------------------------------------------------- an STL folder written by the tests


def _jpeg(path: Path, size=(100, 100), color=(120, 90, 60), exif_orientation=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, color)
    if exif_orientation is None:
        image.save(path, quality=85)
    else:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        image.save(path, quality=85, exif=exif.tobytes())


BOX_A = [0.1, 0.6, 0.3, 0.9]
BOX_B = [0.6, 0.1, 0.9, 0.4]
CATALOG = {
    **{f"S{i}": "shoes" for i in range(1, 8)},
    **{f"B{i}": "bags" for i in range(1, 5)},
}


def _write_stl(root: Path, lines: list, catalog=None, domain="fashion", scenes=("SC1", "SC2")) -> Path:
    """An STL folder: pair lines (dicts are dumped, strings written as they are), the catalog, images."""
    catalog = CATALOG if catalog is None else catalog
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{domain}-cat.json").write_text(json.dumps(catalog))
    (root / f"{domain}.json").write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    for product in catalog:
        _jpeg(root / "images" / f"{product}.jpg", size=(40, 40))
    for scene in scenes:
        _jpeg(root / "images" / f"{scene}.jpg")
    return root


GOOD = [
    {"scene": "SC1", "product": "S1", "bbox": BOX_A},
    {"scene": "SC1", "product": "S2", "bbox": BOX_A},  # same box and category: one query, two positives
    {"scene": "SC1", "product": "B1", "bbox": BOX_A},  # same box, other category: its own query
    {"scene": "SC1", "product": "B2", "bbox": BOX_B},
    {"scene": "SC2", "product": "S3", "bbox": BOX_A},
]


def _by_key(queries):
    return {(q.scene, tuple(q.bbox), q.category): q for q in queries}


# the queries the GOOD records make: (scene, box, category)
GOOD_QUERY_KEYS = {
    ("SC1", tuple(BOX_A), "shoes"),
    ("SC1", tuple(BOX_A), "bags"),
    ("SC1", tuple(BOX_B), "bags"),
    ("SC2", tuple(BOX_A), "shoes"),
}


def test_load_dataset_groups_pairs_into_queries(tmp_path):
    ds = load_dataset(_write_stl(tmp_path / "stl", GOOD))
    assert ds.report.skipped == []
    assert ds.report.summary() == "nothing skipped"
    queries = _by_key(ds.queries)
    assert set(queries) == GOOD_QUERY_KEYS
    assert set(queries["SC1", tuple(BOX_A), "shoes"].positives) == {"S1", "S2"}
    assert queries["SC1", tuple(BOX_A), "bags"].positives == ("B1",)
    assert queries["SC1", tuple(BOX_B), "bags"].positives == ("B2",)
    for q in ds.queries:
        assert q.crop == context_box(q.bbox)
        assert q.negatives is None
    assert ds.scene_products == {"SC1": frozenset({"S1", "S2", "B1", "B2"}), "SC2": frozenset({"S3"})}
    assert ds.categories == CATALOG
    assert ds.category_names == ["bags", "shoes"]
    assert ds.catalog("bags") == ["B1", "B2", "B3", "B4"]
    assert ds.catalog("no-such-category") == []
    assert ds.image_path("SC1") == tmp_path / "stl" / "images" / "SC1.jpg"


def test_load_dataset_skips_each_bad_input_with_its_name(tmp_path):
    lines = list(GOOD) + [
        'this is not JSON {"scene"',  # line 6
        {"scene": "SC1", "bbox": BOX_A},  # line 7: no product
        {"scene": "SC1", "product": "S4", "bbox": [0.1, 0.2, 1.3, 0.5]},  # line 8: outside [0, 1]
        {"scene": "SC1", "product": "S4", "bbox": [0.5, 0.2, 0.4, 0.6]},  # line 9: left >= right
        {"scene": "SC1", "product": "NOCAT9", "bbox": BOX_A},  # line 10: product with no category
        {"scene": "SC1", "product": "S1", "bbox": BOX_A},  # line 11: duplicate of line 1
        {"scene": "GONE", "product": "S5", "bbox": BOX_A},  # line 12: scene image missing
        {"scene": "BROKEN", "product": "S6", "bbox": BOX_A},  # line 13: scene image corrupt
        {"scene": "TINY", "product": "S7", "bbox": BOX_A},  # line 14: crop below min_crop_px
        [1, 2, 3],  # line 15: JSON but not an object
    ]
    root = _write_stl(tmp_path / "stl", lines)
    _jpeg(root / "images" / "NOCAT9.jpg")  # has an image, but no category
    (root / "images" / "BROKEN.jpg").write_bytes(b"\x00\x01 definitely not a jpeg")
    _jpeg(root / "images" / "TINY.jpg", size=(40, 40))  # context of BOX_A is 28 x 40 px

    ds = load_dataset(root, min_crop_px=32)
    skipped = ds.report.skipped
    reasons = {name: reason for name, reason in skipped}

    def reason_of(name_part):
        found = [reason for name, reason in skipped if name_part in name]
        assert found, f"{name_part!r} not in report: {skipped}"
        return found[0]

    assert reason_of("fashion.json:6").startswith("not JSON")
    assert reason_of("fashion.json:7") == "missing field: product"
    assert reason_of("fashion.json:8").startswith("bad box") and "outside" in reason_of("fashion.json:8")
    assert reason_of("fashion.json:9").startswith("bad box") and "empty" in reason_of("fashion.json:9")
    assert reason_of("NOCAT9") == "product has no category"
    assert [n for n in reasons if "NOCAT9" in n][0].startswith("fashion.json:10")
    assert reason_of("fashion.json:11") == "duplicate pair"
    assert reason_of("GONE") == "scene image missing"
    assert reason_of("BROKEN").startswith("scene image unreadable")
    assert reason_of("TINY") == "context crop below 32 px"
    assert reason_of("fashion.json:15") == "not a JSON object"
    assert len(skipped) == 10

    # the good records are all still there, and nothing from a bad one leaked in
    queries = _by_key(ds.queries)
    assert set(queries) == GOOD_QUERY_KEYS
    assert set(queries["SC1", tuple(BOX_A), "shoes"].positives) == {"S1", "S2"}  # the duplicate is not a third positive
    assert "NOCAT9" not in ds.categories
    assert all(q.scene not in {"GONE", "BROKEN", "TINY"} for q in ds.queries)

    summary = ds.report.summary()
    assert "10" in summary.splitlines()[0]
    assert re.search(r"\b2\s+bad box", summary)
    assert re.search(r"\b1\s+duplicate pair", summary)
    assert re.search(r"\b1\s+scene image missing", summary)
    assert "GONE" in summary
    assert ds.report.counts()["bad box"] == 2


def test_same_crop_is_kept_when_large_enough(tmp_path):
    root = _write_stl(tmp_path / "stl", GOOD + [{"scene": "TINY", "product": "S7", "bbox": BOX_A}])
    _jpeg(root / "images" / "TINY.jpg", size=(40, 40))
    assert any(q.scene == "TINY" for q in load_dataset(root, min_crop_px=28).queries)
    assert not any(q.scene == "TINY" for q in load_dataset(root, min_crop_px=29).queries)


def test_crop_size_check_uses_the_upright_image(tmp_path):
    # Stored 100 x 40 with EXIF orientation 6: load_image returns it upright, 40 x 100.
    tall_ok = {"scene": "PHONE", "product": "S4", "bbox": [0.3, 0.6, 0.7, 0.9]}  # above: 40 x 60 upright
    tall_thin = {"scene": "PHONE", "product": "S5", "bbox": [0.1, 0.6, 0.3, 0.9]}  # right: 28 x 100 upright
    root = _write_stl(tmp_path / "stl", GOOD + [tall_ok, tall_thin])
    _jpeg(root / "images" / "PHONE.jpg", size=(100, 40), exif_orientation=6)
    ds = load_dataset(root, min_crop_px=32)
    phone = [q for q in ds.queries if q.scene == "PHONE"]
    assert [q.positives for q in phone] == [("S4",)]
    assert ("PHONE [0.1, 0.6, 0.3, 0.9]", "context crop below 32 px") in ds.report.skipped


def test_product_without_image_is_left_out_of_catalog(tmp_path):
    root = _write_stl(tmp_path / "stl", GOOD + [{"scene": "SC2", "product": "S4", "bbox": BOX_B}])
    (root / "images" / "S4.jpg").unlink()
    ds = load_dataset(root)
    assert "S4" not in ds.categories
    assert "S4" not in ds.catalog("shoes")
    assert ("S4", "product image missing") in ds.report.skipped
    assert any("S4" in name and reason == "product image missing" for name, reason in ds.report.skipped if name != "S4")


def test_json_array_pairs_file_is_a_data_error(tmp_path):
    root = _write_stl(tmp_path / "stl", [])
    (root / "fashion.json").write_text(json.dumps(GOOD))
    with pytest.raises(DataError, match="fashion.json.*JSON array"):
        load_dataset(root)


def test_missing_files_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        load_dataset(tmp_path / "nowhere")

    root = _write_stl(tmp_path / "stl", GOOD)
    (root / "fashion.json").unlink()
    with pytest.raises(DataError, match=r"fashion\.json: missing"):
        load_dataset(root)

    root = _write_stl(tmp_path / "stl2", GOOD)
    with pytest.raises(DataError, match=r"home-cat\.json"):
        load_dataset(root, domain="home")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty.*none"):
        load_dataset(empty)


def test_two_category_files_need_a_domain(tmp_path):
    root = _write_stl(tmp_path / "stl", GOOD)
    _write_stl(root, [{"scene": "SC1", "product": "B1", "bbox": BOX_A}], domain="home")
    with pytest.raises(DataError) as err:
        load_dataset(root)
    assert str(root) in str(err.value)
    assert "fashion" in str(err.value) and "home" in str(err.value)
    assert len(load_dataset(root, domain="home").queries) == 1
    assert len(load_dataset(root, domain="fashion").queries) == 4


def test_bad_category_file_is_a_data_error(tmp_path):
    root = _write_stl(tmp_path / "stl", GOOD)
    (root / "fashion-cat.json").write_text('["S1", "S2"]')
    with pytest.raises(DataError, match="fashion-cat.json"):
        load_dataset(root)
    (root / "fashion-cat.json").write_text("{not json")
    with pytest.raises(DataError, match="fashion-cat.json"):
        load_dataset(root)


def test_no_usable_pair_is_a_data_error(tmp_path):
    root = _write_stl(tmp_path / "stl", ["garbage", {"scene": "SC1"}])
    with pytest.raises(DataError, match="fashion.json"):
        load_dataset(root)


# --------------------------------------------------------------------------- split


def _synthetic_dataset(num_scenes: int, queries_per_scene: int = 2, offset: int = 0) -> Dataset:
    queries = [
        Query(f"scene{i:05d}", (0.1, 0.1, 0.2, 0.2 + 0.1 * j), "shoes", (f"S{i}",), (0.2, 0.0, 1.0, 1.0))
        for i in range(offset, offset + num_scenes)
        for j in range(queries_per_scene)
    ]
    return Dataset(Path("/nonexistent"), {}, queries, {}, SkipReport())


def _scene_sides(splits):
    sides = {}
    for name, queries in splits.items():
        for q in queries:
            sides.setdefault(q.scene, set()).add(name)
    return sides


def test_split_deterministic_and_by_scene():
    ds = _synthetic_dataset(1000)
    first, again = ds.split((0.8, 0.1, 0.1), seed=7), ds.split((0.8, 0.1, 0.1), seed=7)
    assert first == again
    assert set(first) == {"train", "val", "test"}
    assert sum(len(v) for v in first.values()) == len(ds.queries)
    sides = _scene_sides(first)
    assert all(len(s) == 1 for s in sides.values())  # no scene in two splits
    counts = {name: sum(1 for s in sides.values() if name in s) for name in first}
    # 1000 scenes: the standard deviation of each count is at most ~13
    assert abs(counts["train"] - 800) < 70
    assert abs(counts["val"] - 100) < 50
    assert abs(counts["test"] - 100) < 50


def test_split_changes_with_the_seed():
    ds = _synthetic_dataset(300, 1)
    a = _scene_sides(ds.split((0.5, 0.25, 0.25), seed=0))
    b = _scene_sides(ds.split((0.5, 0.25, 0.25), seed=1))
    moved = sum(1 for scene in a if a[scene] != b[scene])
    assert moved > 60  # independent draws would move about 62.5% of 300 scenes


def test_adding_scenes_does_not_move_existing_ones():
    small = _scene_sides(_synthetic_dataset(500).split((0.8, 0.1, 0.1), seed=3))
    big_ds = _synthetic_dataset(500)
    big_ds.queries += _synthetic_dataset(400, offset=500).queries
    big = _scene_sides(big_ds.split((0.8, 0.1, 0.1), seed=3))
    assert len(big) == 900
    for scene, side in small.items():
        assert big[scene] == side


def test_split_fraction_extremes():
    ds = _synthetic_dataset(50, 1)
    everything = ds.split((1.0, 0.0, 0.0), seed=0)
    assert len(everything["train"]) == 50 and not everything["val"] and not everything["test"]
    only_test = ds.split((0.0, 0.0, 1.0), seed=0)
    assert len(only_test["test"]) == 50


# --------------------------------------------------------------------------- negatives


def _negatives_dataset() -> Dataset:
    categories = {**{f"S{i}": "shoes" for i in range(10)}, **{f"B{i}": "bags" for i in range(10)}}
    q1 = Query("SC1", (0.1, 0.1, 0.3, 0.3), "shoes", ("S0",), (0.3, 0.0, 1.0, 1.0))
    q2 = Query("SC1", (0.5, 0.5, 0.9, 0.9), "shoes", ("S1",), (0.0, 0.0, 1.0, 0.5))
    q3 = Query("SC2", (0.5, 0.5, 0.9, 0.9), "bags", ("B0", "B1"), (0.0, 0.0, 1.0, 0.5))
    scene_products = {"SC1": frozenset({"S0", "S1", "S2", "B3"}), "SC2": frozenset({"B0", "B1"})}
    return Dataset(Path("/nonexistent"), categories, [q1, q2, q3], scene_products, SkipReport())


def test_sample_negatives_same_category_not_in_scene_distinct():
    ds = _negatives_dataset()
    q1 = ds.queries[0]
    for seed in range(20):
        negatives = ds.sample_negatives(q1, 5, random.Random(seed))
        assert len(negatives) == 5
        assert len(set(negatives)) == 5
        assert all(ds.categories[p] == "shoes" for p in negatives)
        # S1 and S2 are annotated at other boxes of the same scene: never negatives
        assert not set(negatives) & {"S0", "S1", "S2"}


def test_sample_negatives_capped_by_pool_and_deterministic():
    ds = _negatives_dataset()
    q1, q3 = ds.queries[0], ds.queries[2]
    everything = ds.sample_negatives(q1, 100, random.Random(0))
    assert sorted(everything) == [f"S{i}" for i in range(3, 10)]
    assert sorted(ds.sample_negatives(q3, 100, random.Random(0))) == [f"B{i}" for i in range(2, 10)]
    assert ds.sample_negatives(q1, 4, random.Random(5)) == ds.sample_negatives(q1, 4, random.Random(5))
    draws = {tuple(ds.sample_negatives(q1, 3, random.Random(s))) for s in range(10)}
    assert len(draws) > 1  # the rng is used


def test_sample_negatives_excludes_positives_of_scene_without_annotations():
    ds = _negatives_dataset()
    query = Query("ELSEWHERE", (0.1, 0.1, 0.3, 0.3), "shoes", ("S4", "S5"), (0.3, 0.0, 1.0, 1.0))
    negatives = ds.sample_negatives(query, 100, random.Random(0))
    assert sorted(negatives) == sorted(f"S{i}" for i in range(10) if i not in (4, 5))


def test_negative_sampler_same_category_never_in_scene():
    ds = _negatives_dataset()
    index = {p: i for i, p in enumerate(sorted(ds.categories))}
    names = {i: p for p, i in index.items()}
    sampler = NegativeSampler(ds, index)
    rng = np.random.default_rng(0)
    queries = ds.queries * 200
    rows = sampler.sample(queries, rng)
    assert rows.shape == (len(queries),) and rows.dtype == np.int64
    drawn = {"SC1": set(), "SC2": set()}
    for query, row in zip(queries, rows):
        product = names[int(row)]
        assert ds.categories[product] == query.category
        assert product not in ds.scene_products[query.scene]
        drawn[query.scene].add(product)
    # it really samples over the allowed pool
    assert drawn["SC1"] == {f"S{i}" for i in range(3, 10)}
    assert drawn["SC2"] == {f"B{i}" for i in range(2, 10)}
    again = sampler.sample(queries, np.random.default_rng(0))
    assert (again == rows).all()


def test_negative_sampler_fails_clearly_when_the_whole_category_is_in_the_scene():
    categories = {"S0": "shoes", "S1": "shoes", "B0": "bags"}
    query = Query("SC1", (0.1, 0.1, 0.3, 0.3), "shoes", ("S0",), (0.3, 0.0, 1.0, 1.0))
    ds = Dataset(Path("/x"), categories, [query], {"SC1": frozenset({"S0", "S1"})}, SkipReport())
    sampler = NegativeSampler(ds, {p: i for i, p in enumerate(sorted(categories))})
    with pytest.raises(DataError, match="shoes.*SC1"):
        sampler.sample([query], np.random.default_rng(0))


# --------------------------------------------------------------------------- load_queries


def test_load_queries_reads_explicit_queries_and_skips_bad_ones(tmp_path):
    root = _write_stl(tmp_path / "stl", GOOD)
    ds = load_dataset(root)
    before = len(ds.report.skipped)
    records = [
        {"scene": "SC1", "bbox": BOX_A, "category": "shoes", "positive": "S1", "negatives": ["S4", "S5", "S6"]},
        {"scene": "SC2", "bbox": BOX_B, "category": "bags", "positive": ["B1", "B2"], "negatives": ["B3"]},
        {"scene": "SC2", "bbox": None, "category": "shoes", "positive": "S3", "negatives": ["S1"]},
        {"scene": "SC1", "bbox": BOX_A, "category": "shoes", "positive": "UNKNOWN1", "negatives": ["S4"]},  # line 4
        {"scene": "SC1", "bbox": BOX_A, "category": "shoes", "positive": "S1", "negatives": ["S4", "UNKNOWN2"]},  # 5
        {"scene": "SC1", "bbox": [0.5, 0.1, 0.2, 0.4], "category": "shoes", "positive": "S1", "negatives": ["S4"]},  # 6
        {"scene": "SC1", "bbox": [0.1, 0.1, 2.0, 0.4], "category": "shoes", "positive": "S1", "negatives": ["S4"]},  # 7
        {"scene": "NOPE", "bbox": BOX_A, "category": "shoes", "positive": "S1", "negatives": ["S4"]},  # 8
        {"scene": "SC1", "bbox": BOX_A, "category": "shoes", "negatives": ["S4"]},  # 9: no positive
        {"scene": "SC1", "bbox": BOX_A, "category": "shoes", "positive": [], "negatives": ["S4"]},  # 10: empty
    ]
    path = tmp_path / "queries.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\nnot json\n")
    queries = load_queries(path, ds)

    assert len(queries) == 3
    q1, q2, q3 = queries
    assert (q1.scene, q1.bbox, q1.category, q1.positives, q1.negatives) == ("SC1", tuple(BOX_A), "shoes", ("S1",), ("S4", "S5", "S6"))
    assert q1.crop == context_box(tuple(BOX_A))
    assert q2.positives == ("B1", "B2") and q2.negatives == ("B3",)
    assert q3.bbox is None and q3.crop == (0.0, 0.0, 1.0, 1.0)

    new = dict(ds.report.skipped[before:])
    assert "UNKNOWN1" in new["queries.jsonl:4"]
    assert "UNKNOWN2" in new["queries.jsonl:5"]
    assert "queries.jsonl:6" in new["queries.jsonl:6"] and "empty" in new["queries.jsonl:6"]
    assert "outside" in new["queries.jsonl:7"]
    assert new["queries.jsonl:8"] == "scene image missing"
    assert new["queries.jsonl:9"] == "missing field: positive"
    assert new["queries.jsonl:10"].startswith("bad query") and "positive" in new["queries.jsonl:10"]
    assert new["queries.jsonl:11"].startswith("not JSON")
    assert len(new) == 8
