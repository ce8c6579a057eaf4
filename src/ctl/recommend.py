"""Recommendations for a new scene: the top-K catalog products of a category that complete it."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ctl.backbones import Backbone, create_backbone, preprocess
from ctl.data import Dataset, context_box
from ctl.features import extract_features
from ctl.images import Box, ImageRef, crop, load_image
from ctl.train import Run, RunError
from ctl.visualize import attention_overlay, ranking_strip


@dataclass
class SceneQuery:
    """A scene prepared for ranking: the context crop, its query vector and attention grid."""

    crop: Image.Image
    vector: torch.Tensor  # q (D,): d(scene, p) = offset - 2 <q, f_p>
    attention: np.ndarray | None  # (H, W) weights over regions; None for the global-only variant
    global_: torch.Tensor  # f_s (D,): the scene's global embedding, d_g(scene, p) = 2 - 2 <f_s, f_p>


@dataclass
class Recommendation:
    products: list[tuple[str, float]]  # (product id, distance d), nearest first
    scene: SceneQuery


def load_backbone(run: Run) -> Backbone:
    """The backbone a run was trained on, refusing other weights."""
    backbone = create_backbone(run.backbone["name"], run.config.features.weights)
    if backbone.weights_id != run.backbone["weights_id"]:
        raise RunError(
            f"{run.path}: trained on {run.backbone['name']} weights {run.backbone['weights_id']}, "
            f"but the weights found now are {backbone.weights_id}; pass the same --weights file"
        )
    return backbone


@torch.no_grad()
def embed_scene(run: Run, backbone: Backbone, image: Image.Image, box: Box | None, category: str) -> SceneQuery:
    """Hide the product's box (keep the largest region around it), embed the rest, steer it by category."""
    model = run.model
    index = model.category.index(category)[None]
    context = crop(image, context_box(box))
    x = preprocess(context, run.config.features.image_size, backbone.mean, backbone.std)[None]
    global_, local = backbone(x)
    grid = local.shape[-2:]
    scene = model.embed_scenes(global_, local.flatten(2).transpose(1, 2))
    attention = None if model.variant == "global" else model.attention(scene, index)[0].reshape(grid).numpy()
    return SceneQuery(context, model.query(scene, index)[0], attention, scene.global_[0])


def embed_products(run: Run, backbone: Backbone, images: Sequence[Path], progress: bool = True) -> tuple[np.ndarray, dict[Path, str]]:
    """f_p (n, dim) float32 of product images, through the run's feature cache; rows of unreadable
    images are zero, and the reason for each of those is returned beside."""
    cfg = run.config.features
    features = extract_features(
        backbone,
        [ImageRef(path) for path in images],
        cache_dir=cfg.cache_dir,
        image_size=cfg.image_size,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        with_local=False,
        progress=progress,
    )
    with torch.no_grad():
        embeddings = run.model.embed_products(torch.from_numpy(features.global_).float()).numpy()
    embeddings[~features.ok] = 0.0
    return embeddings, {ref.path: reason for ref, reason in features.failed.items()}


class Recommender:
    """Ranks a catalog by the full distance d for one scene at a time."""

    def __init__(self, run: Run, backbone: Backbone, products: list[str], categories: list[str], embeddings: np.ndarray):
        self.run, self.backbone = run, backbone
        self.products = products
        self.embeddings = torch.from_numpy(embeddings)  # f_p, one row per product
        self.rows: dict[str, np.ndarray] = {}
        for category in sorted(set(categories)):
            self.rows[category] = np.array([i for i, c in enumerate(categories) if c == category])

    @classmethod
    def from_dataset(cls, run: Run, dataset: Dataset, progress: bool = True) -> Recommender:
        backbone = load_backbone(run)
        products = sorted(dataset.categories)
        paths = [dataset.image_path(p) for p in products]
        embeddings, failed = embed_products(run, backbone, paths, progress)
        keep = [i for i, path in enumerate(paths) if path not in failed]
        return cls(run, backbone, [products[i] for i in keep], [dataset.categories[products[i]] for i in keep], embeddings[keep])

    def recommend(self, image: Image.Image, box: Box | None, category: str, k: int = 10) -> Recommendation:
        if k < 1:
            raise ValueError(f"k={k}: ask for at least one product")
        scene = embed_scene(self.run, self.backbone, image, box, category)
        rows = self.rows.get(category)
        if rows is None:
            raise KeyError(f"no catalog product in category {category!r}")
        with torch.no_grad():
            distances = self.run.model.distance_matrix(scene.vector[None], self.embeddings[rows])[0].numpy()
        top = np.argsort(distances, kind="stable")[:k]
        return Recommendation([(self.products[rows[i]], float(distances[i])) for i in top], scene)


def ranking_picture(result: Recommendation, image_path: Callable[[str], Path], category: str, positives: Collection[str] = ()) -> Image.Image:
    """The scene's context crop (the product's box cut away; with the attention map where the variant
    has one) followed by the ranked products, each captioned with its rank and distance; known
    correct answers are marked."""
    scene = result.scene.crop if result.scene.attention is None else attention_overlay(result.scene.crop, result.scene.attention)
    tiles = [
        (load_image(image_path(p)), f"{rank}. d={d:.3f}" + (" CORRECT" if p in positives else ""))
        for rank, (p, d) in enumerate(result.products, 1)
    ]
    return ranking_strip(scene, tiles, f"context seen, for {category.split('|')[-1]}")
