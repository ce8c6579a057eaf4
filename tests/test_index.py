import json

import faiss
import numpy as np
import pytest
import torch

from ctl.images import load_image
from ctl.index import CatalogIndex, IndexedRecommender, IndexMismatch, build_index, embed_products
from ctl.recommend import Recommender, SceneQuery, embed_scene
from ctl.train import build_model, load_run, save_checkpoint


@pytest.fixture(scope="module")
def index(catalog_run):
    return CatalogIndex.load(catalog_run.index_dir, catalog_run.run)


@pytest.fixture(scope="module")
def exhaustive(catalog_run):
    return Recommender.from_dataset(catalog_run.run, catalog_run.dataset, progress=False)


@pytest.fixture(scope="module")
def scenes(catalog_run):
    """(query, SceneQuery) for a few dataset queries."""
    cr = catalog_run
    queries = cr.dataset.queries[:4]
    return [(q, embed_scene(cr.run, cr.backbone, load_image(cr.dataset.image_path(q.scene)), q.bbox, q.category)) for q in queries]


def exhaustive_top(exhaustive, scene, category, k):
    rows = exhaustive.rows[category]
    d = exhaustive.run.model.distance_matrix(scene.vector[None], exhaustive.embeddings[rows])[0].numpy()
    order = np.argsort(d, kind="stable")[:k]
    return [exhaustive.products[rows[i]] for i in order], d[order]


def test_index_holds_the_catalog(catalog_run, index):
    dataset = catalog_run.dataset
    assert len(index) == len(dataset.categories)
    assert index.categories == {c: len(dataset.catalog(c)) for c in dataset.category_names}
    product = sorted(dataset.categories)[0]
    assert index.image_path(product) == dataset.image_path(product)
    assert index.where[product][0] == dataset.categories[product]
    manifest = json.loads((catalog_run.index_dir / "manifest.json").read_text())
    assert manifest["run"]["backbone"] == "efficientnet-lite0"
    assert {m["kind"] for m in manifest["categories"].values()} == {"flat"}
    assert [p.name for p in catalog_run.index_dir.glob("catalog-*.npz")] == [manifest["data"]]


def test_two_stage_with_every_candidate_is_the_exhaustive_ranking(index, exhaustive, scenes):
    for query, scene in scenes:
        size = index.categories[query.category]
        hits = index.search(scene, query.category, k=size, candidates=size)
        ids, distances = exhaustive_top(exhaustive, scene, query.category, size)
        assert [h.product for h in hits] == ids
        np.testing.assert_allclose([h.distance for h in hits], distances, atol=1e-5)
        assert {h.category for h in hits} == {query.category}


def test_flat_inner_product_search_with_q_is_the_ranking_by_d(index, exhaustive, scenes):
    """d = offset - 2 <q, f_p>: the largest inner products with q are the smallest distances."""
    for query, scene in scenes:
        shelf = index.shelves[query.category]
        flat = faiss.IndexFlatIP(shelf.vectors.shape[1])
        flat.add(shelf.vectors)
        _, labels = flat.search(scene.vector.numpy()[None], 5)
        ids, _ = exhaustive_top(exhaustive, scene, query.category, 5)
        assert [shelf.ids[i] for i in labels[0]] == ids
        assert [h.product for h in index.search(scene, query.category, 5, candidates=5, first_stage="query")] == ids


def test_remove_and_add_without_rebuilding(catalog_run, index, scenes):
    query, scene = scenes[0]
    size = index.categories[query.category]
    before = index.search(scene, query.category, k=size, candidates=size)
    gone = before[0].product
    vector = index.shelves[query.category].vectors[index.where[gone][1]].copy()
    image = index.image_path(gone)
    index.remove([gone])
    try:
        after = index.search(scene, query.category, k=size, candidates=size)
        assert [h.product for h in after] == [h.product for h in before[1:]]
        assert gone not in index
        with pytest.raises(KeyError, match="not in the catalog"):
            index.image_path(gone)
        with pytest.raises(KeyError, match="not in the catalog index"):
            index.remove([gone])
    finally:
        index.add([gone], [query.category], [image], vector[None])
    assert [h.product for h in index.search(scene, query.category, k=size, candidates=size)] == [h.product for h in before]


def test_add_replaces_and_makes_categories(index, scenes):
    query, scene = scenes[0]
    q = scene.vector.numpy()
    index.add(["new-a", "new-b"], ["New|Thing", query.category], ["/nowhere/a.jpg", "/nowhere/b.jpg"], np.stack([q, q]) / np.linalg.norm(q))
    try:
        assert index.categories["New|Thing"] == 1
        assert index.search(scene, query.category, 1, first_stage="query")[0].product == "new-b"
        index.add(["new-b"], [query.category], ["/nowhere/b.jpg"], -q[None] / np.linalg.norm(q))  # replaced: now the farthest
        hits = index.search(scene, query.category, k=100, candidates=100)
        assert hits[-1].product == "new-b" and [h.product for h in hits].count("new-b") == 1
    finally:
        index.remove(["new-a", "new-b"])
    assert "New|Thing" not in index.categories
    with pytest.raises(ValueError, match="expected one each"):
        index.add(["x"], ["c"], [], q[None])


def test_save_load_round_trip_and_compaction(catalog_run, index, scenes, tmp_path):
    query, scene = scenes[1]
    copy = CatalogIndex.load(catalog_run.index_dir, catalog_run.run)
    copy.path = tmp_path / "copy"
    products = [p for p, (c, _) in copy.where.items() if c == query.category]
    copy.remove(products[: len(products) * 2 // 3])  # dead slots outnumber live ones: compacted on save
    copy.save()
    loaded = CatalogIndex.load(copy.path, catalog_run.run)
    shelf = loaded.shelves[query.category]
    assert shelf.alive.all() and len(shelf.ids) == len(products) - len(products) * 2 // 3
    size = loaded.categories[query.category]
    assert loaded.search(scene, query.category, size, size) == copy.search(scene, query.category, size, size)
    assert len(list(copy.path.glob("catalog-*.npz"))) == 1


def test_refuses_another_run(catalog_run, tmp_path):
    run = catalog_run.run
    other = tmp_path / "other-run"
    for name in ("config.json", "backbone.json", "categories.json"):
        (other / name).parent.mkdir(exist_ok=True)
        (other / name).write_text((run.path / name).read_text())
    torch.manual_seed(1)
    save_checkpoint(other / "best.pt", {"model": build_model(run.config, run.backbone, run.model.category.categories).state_dict()})
    with pytest.raises(IndexMismatch, match="made with the model of run"):
        CatalogIndex.load(catalog_run.index_dir, load_run(other))
    (other / "backbone.json").write_text(json.dumps({**run.backbone, "weights_id": "other-weights"}))
    with pytest.raises(IndexMismatch, match="other-weights"):
        CatalogIndex.load(catalog_run.index_dir, load_run(other))
    with pytest.raises(IndexMismatch, match="no catalog index here"):
        CatalogIndex.load(tmp_path, run)


def test_build_updates_an_existing_index(catalog_run, tmp_path):
    cr = catalog_run
    dataset = cr.dataset
    dropped = sorted(dataset.categories)[:3]
    kept = {p: c for p, c in dataset.categories.items() if p not in dropped}
    full = dataset.categories
    try:
        dataset.categories = kept
        index, report = build_index(tmp_path / "idx", cr.run, cr.backbone, dataset, progress=False)
        assert (report.added, report.removed, len(index)) == (len(kept), 0, len(kept))
        dataset.categories = full
        index, report = build_index(tmp_path / "idx", cr.run, cr.backbone, dataset, progress=False)
        assert (report.added, report.removed, len(index)) == (3, 0, len(full))
        dataset.categories = kept
        _, report = build_index(tmp_path / "idx", cr.run, cr.backbone, dataset, progress=False)
        assert (report.added, report.removed) == (0, 3)
        with pytest.raises(ValueError, match="rebuild"):
            build_index(tmp_path / "idx", cr.run, cr.backbone, dataset, kind="hnsw", progress=False)
        index, _ = build_index(tmp_path / "idx", cr.run, cr.backbone, dataset, kind="hnsw", rebuild=True, progress=False)
        assert {s.kind for s in index.shelves.values()} == {"hnsw"}
    finally:
        dataset.categories = full


def test_embed_products_reports_unreadable_images(catalog_run, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    good = catalog_run.dataset.image_path(sorted(catalog_run.dataset.categories)[0])
    embeddings, failed = embed_products(catalog_run.run, catalog_run.backbone, [good, bad], progress=False)
    assert list(failed) == [bad] and "bad.jpg" in failed[bad]
    assert np.allclose(np.linalg.norm(embeddings, axis=1), [1, 0], atol=1e-5)


def test_indexed_recommender_refuses_bad_requests(catalog_run, index):
    recommender = IndexedRecommender(catalog_run.run, catalog_run.backbone, index)
    query = catalog_run.dataset.queries[0]
    image = load_image(catalog_run.dataset.image_path(query.scene))
    with pytest.raises(KeyError, match="known: "):
        recommender.recommend(image, None, "Nope", 3)
    with pytest.raises(ValueError, match="k=0"):
        recommender.recommend(image, None, query.category, 0)
    result = recommender.recommend(image, query.bbox, query.category, 3)
    assert len(result.products) == 3 and result.scene.attention is not None


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_index_recall(kind, tmp_path):
    """Clustered unit vectors: the approximate first stage finds nearly all of the exact top 10."""
    rng = np.random.default_rng(0)
    dim, count = 32, 20_000
    centres = rng.standard_normal((200, dim))
    vectors = centres[rng.integers(200, size=count)] + 0.5 * rng.standard_normal((count, dim))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    identity = {"path": "", "variant": "full", "backbone": "none", "weights_id": "", "image_size": 0, "model": ""}
    approximate = CatalogIndex(tmp_path, identity, offset=2.0, global_weight=0.5, dim=dim, kind=kind)
    exact = CatalogIndex(tmp_path, identity, offset=2.0, global_weight=0.5, dim=dim, kind="flat")
    ids = [str(i) for i in range(count)]
    for index in (approximate, exact):
        index.add(ids, ["c"] * count, [""] * count, vectors)
    approximate.remove(ids[:100])
    exact.remove(ids[:100])
    recall = []
    for q in vectors[rng.integers(count, size=50)]:
        scene = SceneQuery(None, torch.from_numpy(q), None, torch.from_numpy(q))
        found = {h.product for h in approximate.search(scene, "c", 10, candidates=10, first_stage="query")}
        truth = {h.product for h in exact.search(scene, "c", 10, candidates=10, first_stage="query")}
        assert not found & set(ids[:100])  # removed products are never returned
        recall.append(len(found & truth) / 10)
    assert np.mean(recall) >= 0.9
