from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ctl.backbones import create_backbone, preprocess
from ctl.features import cache_folder, extract_features
from ctl.images import ImageRef, load_region

SIZE = 64  # a 4 x 4 local map: small enough to keep these tests fast


@pytest.fixture(scope="module")
def backbone():
    return create_backbone("efficientnet-lite0")


@pytest.fixture
def batches(backbone):
    """Sizes of the batches the backbone is run on; pass ``fail_at`` to make the n-th batch raise."""
    sizes: list[int] = []
    forward = backbone.forward

    def counting(x):
        sizes.append(len(x))
        if len(sizes) == getattr(counting, "fail_at", 0):
            raise KeyboardInterrupt
        return forward(x)

    backbone.forward = counting
    yield counting, sizes
    del backbone.forward


def write_jpeg(path: Path, seed: int) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


@pytest.fixture
def images(tmp_path) -> list[Path]:
    folder = tmp_path / "images"
    folder.mkdir()
    return [write_jpeg(folder / f"{i}.jpg", i) for i in range(5)]


def extract(backbone, refs, cache, **kwargs):
    options = dict(cache_dir=cache, image_size=SIZE, batch_size=2, num_workers=2, with_local=True, progress=False)
    return extract_features(backbone, refs, **{**options, **kwargs})


def test_rows_align_with_refs_and_match_a_direct_forward(backbone, batches, images, tmp_path):
    _, sizes = batches
    refs = [ImageRef(images[0]), ImageRef(images[1], (0.1, 0.2, 0.6, 0.9)), ImageRef(images[2]), ImageRef(images[0])]
    before = sorted(images[0].parent.iterdir())
    features = extract(backbone, refs, tmp_path / "cache")

    assert features.global_.shape == (4, 1280) and features.global_.dtype == np.float16
    assert features.local.shape == (4, 4, 4, 112) and features.ok.all() and not features.failed
    assert sum(sizes) == 3  # the repeated region is computed once
    x = torch.stack([preprocess(load_region(ref), SIZE, backbone.mean, backbone.std) for ref in refs])
    with torch.inference_mode():
        global_, local = backbone(x)
    np.testing.assert_allclose(features.global_, global_.numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(features.local, local.permute(0, 2, 3, 1).numpy(), rtol=2e-3, atol=2e-3)
    assert sorted(images[0].parent.iterdir()) == before  # nothing is written next to the images


def test_second_call_reads_the_cache_only(backbone, batches, images, tmp_path):
    _, sizes = batches
    refs = [ImageRef(p) for p in images]
    first = extract(backbone, refs, tmp_path / "cache")
    sizes.clear()
    again = extract(backbone, refs, tmp_path / "cache")
    assert sizes == []
    assert np.array_equal(again.global_, first.global_) and np.array_equal(again.local, first.local)

    global_only = extract(backbone, refs, tmp_path / "cache", with_local=False)
    assert global_only.local is None and np.array_equal(global_only.global_, first.global_)
    assert sum(sizes) == 5  # global-only entries are cached apart from entries with a local map


def test_an_edited_image_is_recomputed_alone(backbone, batches, images, tmp_path):
    _, sizes = batches
    refs = [ImageRef(p) for p in images]
    first = extract(backbone, refs, tmp_path / "cache")
    write_jpeg(images[3], seed=99)
    sizes.clear()
    second = extract(backbone, refs, tmp_path / "cache")
    assert sizes == [1]
    changed = np.any(second.global_ != first.global_, axis=1)
    assert changed.tolist() == [False, False, False, True, False]


def test_an_interrupted_run_resumes_with_the_missing_rows(backbone, batches, images, tmp_path):
    counting, sizes = batches
    refs = [ImageRef(p) for p in images]
    counting.fail_at = 2
    with pytest.raises(KeyboardInterrupt):
        extract(backbone, refs, tmp_path / "cache")
    (folder,) = (tmp_path / "cache").iterdir()
    assert len(list(folder.glob("shard-*.npz"))) == 1 and not list(folder.glob(".*"))

    counting.fail_at = 0
    sizes.clear()
    resumed = extract(backbone, refs, tmp_path / "cache")
    assert sum(sizes) == 3 and resumed.ok.all()
    np.testing.assert_array_equal(resumed.global_, extract(backbone, refs, tmp_path / "fresh").global_)


def test_unreadable_images_are_reported_and_the_rest_is_extracted(backbone, batches, images, tmp_path):
    truncated = tmp_path / "images" / "truncated.jpg"
    truncated.write_bytes(images[1].read_bytes()[:300])
    text = tmp_path / "images" / "notes.jpg"
    text.write_text("not an image")
    missing = tmp_path / "images" / "missing.jpg"
    refs = [ImageRef(images[0]), ImageRef(truncated), ImageRef(missing), ImageRef(text, (0, 0, 0.5, 0.5))]

    features = extract(backbone, refs, tmp_path / "cache")
    assert features.ok.tolist() == [True, False, False, False]
    assert set(features.failed) == set(refs[1:])
    for ref, reason in features.failed.items():
        assert str(ref.path) in reason
    assert "cannot read" in features.failed[refs[2]]
    assert not features.global_[1:].any() and not features.local[1:].any()


def test_an_unreadable_shard_is_recomputed(backbone, batches, images, tmp_path):
    _, sizes = batches
    refs = [ImageRef(p) for p in images[:2]]
    extract(backbone, refs, tmp_path / "cache")
    (shard,) = (tmp_path / "cache").glob("*/shard-*.npz")
    shard.write_bytes(b"garbage")
    sizes.clear()
    with pytest.warns(UserWarning, match="unreadable feature shard"):
        features = extract(backbone, refs, tmp_path / "cache")
    assert sizes == [2] and features.ok.all()


def test_cache_folder_depends_on_backbone_weights_and_preprocessing(backbone, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    folder = cache_folder(backbone, "~/features", 224)
    assert folder.parent == tmp_path / "features" and folder.name.startswith("efficientnet-lite0-")
    assert cache_folder(backbone, "~/features", 192) != folder
    monkeypatch.setattr(backbone, "weights_id", "other")
    assert cache_folder(backbone, "~/features", 224) != folder
