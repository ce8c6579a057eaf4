"""The Complete-the-Look model on frozen backbone features.

Notation (Kang et al., CVPR 2019): a scene crop has a global vector and a map of N local vectors;
a product has a global vector. Every feature goes through an embedding MLP ``g`` into one unit
sphere: ``f_s`` (scene), ``f_i`` (scene region i), ``f_p`` (product); ``k_i`` is a second
embedding of region i used as an attention key, ``e_c`` a learned unit vector per category.

    a_i = softmax_i(-||k_i - e_c||^2)
    d_g = ||f_s - f_p||^2        d_l = sum_i a_i ||f_i - f_p||^2        d = (d_g + d_l) / 2

Since every vector has unit norm and the a_i sum to one, ``d_l = 2 - 2 <sum_i a_i f_i, f_p>``:
each distance is affine in ``f_p``, so a scene scores a whole catalog with one matrix product.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ctl.config import ModelConfig


class EmbeddingMLP(nn.Module):
    """g(.) = Linear - BatchNorm - ReLU - Dropout - Linear - L2-normalise.

    With ``locations=0`` one MLP is shared by every leading position of the input. With
    ``locations=N`` the input is (B, N, in_dim) and each of the N locations has its own weights.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, dropout: float, locations: int = 0):
        super().__init__()
        self.locations = locations
        n = max(locations, 1)
        self.w1 = nn.Parameter(torch.empty(n, in_dim, hidden_dim))
        self.b1 = nn.Parameter(torch.zeros(n, hidden_dim))
        self.bn = nn.BatchNorm1d(n * hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.w2 = nn.Parameter(torch.empty(n, hidden_dim, out_dim))
        self.b2 = nn.Parameter(torch.zeros(n, out_dim))
        for w in (self.w1, self.w2):  # nn.Linear's default initialisation, per location
            for i in range(n):
                nn.init.kaiming_uniform_(w.data[i].T, a=5**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.locations:
            batch = x.shape[0]  # x: (B, N, in_dim)
            h = torch.einsum("bni,nih->bnh", x, self.w1) + self.b1
            h = self.bn(h.reshape(batch, -1)).reshape(h.shape)
            h = torch.einsum("bnh,nho->bno", self.dropout(F.relu(h)), self.w2) + self.b2
            return F.normalize(h, dim=-1)
        lead = x.shape[:-1]
        h = self.bn(x.reshape(-1, x.shape[-1]) @ self.w1[0] + self.b1[0])
        h = self.dropout(F.relu(h)) @ self.w2[0] + self.b2[0]
        return F.normalize(h, dim=-1).reshape(*lead, -1)


class CategoryEmbedding(nn.Module):
    """One learned unit vector per product category, looked up by index or by name."""

    def __init__(self, categories: list[str], dim: int):
        super().__init__()
        self.categories = list(categories)
        self._index = {name: i for i, name in enumerate(self.categories)}
        self.weight = nn.Parameter(torch.randn(len(categories), dim))

    def index(self, names: str | list[str]) -> torch.Tensor:
        single = isinstance(names, str)
        unknown = [n for n in ([names] if single else names) if n not in self._index]
        if unknown:
            raise KeyError(f"unknown category {unknown[0]!r}; known: {', '.join(self.categories)}")
        if single:
            return torch.tensor(self._index[names])
        return torch.tensor([self._index[n] for n in names], dtype=torch.long)

    def forward(self, index: torch.Tensor | int) -> torch.Tensor:
        """A scalar index gives (dim,); a (B,) or (B, 1) index gives (B, dim)."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.weight.device)
        if index.dim() == 2 and index.shape[1] == 1:
            index = index[:, 0]
        if index.dim() > 1:
            raise ValueError(f"category index must be a scalar, (B,) or (B, 1); got shape {tuple(index.shape)}")
        bad = (index < 0) | (index >= len(self.categories))
        if bad.any():
            raise IndexError(f"category index {int(index[bad][0])} out of range for {len(self.categories)} categories")
        return F.normalize(self.weight[index], dim=-1)


@dataclass
class SceneEmbedding:
    global_: torch.Tensor  # f_s (B, D)
    local: torch.Tensor | None  # f_i (B, N, D); None for the global-only variant
    keys: torch.Tensor | None  # k_i (B, N, D); None where the attention does not use them


class CompleteTheLook(nn.Module):
    def __init__(self, cfg: ModelConfig, global_dim: int, local_dim: int, num_locations: int, categories: list[str]):
        super().__init__()
        self.variant = cfg.variant
        locations = num_locations if cfg.per_location else 0
        mlp = lambda in_dim, locs=0: EmbeddingMLP(in_dim, cfg.hidden_dim, cfg.embed_dim, cfg.dropout, locs)  # noqa: E731
        self.global_g = mlp(global_dim)  # shared by scene and product
        self.local_g = mlp(local_dim, locations)
        self.key_g = mlp(local_dim, locations)
        self.category = CategoryEmbedding(categories, cfg.embed_dim)
        # (w_g, w_l): how d_g and d_l enter d for each variant
        self.weights = {"global": (1.0, 0.0), "local": (0.0, 1.0)}.get(cfg.variant, (0.5, 0.5))

    def embed_products(self, product_global: torch.Tensor) -> torch.Tensor:
        return self.global_g(product_global)

    def embed_scenes(self, scene_global: torch.Tensor, scene_local: torch.Tensor) -> SceneEmbedding:
        """scene_local: (B, N, C) region features (a flattened H x W map).

        The local heads are the bulk of the work (N rows per scene): only what the variant uses is run."""
        uses_local = self.weights[1] > 0
        return SceneEmbedding(
            self.global_g(scene_global),
            self.local_g(scene_local) if uses_local else None,
            self.key_g(scene_local) if uses_local and self.variant != "full-no-category" else None,
        )

    def attention(self, scene: SceneEmbedding, category: torch.Tensor) -> torch.Tensor:
        """(B, N) weights over regions, summing to one; uniform for the no-category variant."""
        if self.variant == "full-no-category":
            batch, n = scene.local.shape[:2]
            return torch.full((batch, n), 1.0 / n, device=scene.local.device)
        e_c = self.category(category)
        return torch.softmax(-((scene.keys - e_c[:, None, :]) ** 2).sum(-1), dim=1)

    def query(self, scene: SceneEmbedding, category: torch.Tensor) -> torch.Tensor:
        """q (B, D) such that d(scene, p) = 2 (w_g + w_l) - 2 <q, f_p> for every product p."""
        w_g, w_l = self.weights
        q = w_g * scene.global_
        if w_l:
            q = q + w_l * torch.einsum("bn,bnd->bd", self.attention(scene, category), scene.local)
        return q

    def distance(self, query: torch.Tensor, products: torch.Tensor) -> torch.Tensor:
        """d for (B, D) queries against paired (B, D) products: (B,)."""
        return 2.0 * sum(self.weights) - 2.0 * (query * products).sum(-1)

    def distance_matrix(self, query: torch.Tensor, products: torch.Tensor) -> torch.Tensor:
        """d for (B, D) queries against every one of (M, D) products: (B, M)."""
        return 2.0 * sum(self.weights) - 2.0 * query @ products.T

    def forward(self, scene_global, scene_local, category, product_global) -> torch.Tensor:
        """d(s, p) for paired batches."""
        q = self.query(self.embed_scenes(scene_global, scene_local), category)
        return self.distance(q, self.embed_products(product_global))


def hinge_loss(d_pos: torch.Tensor, d_neg: torch.Tensor, margin: float) -> torch.Tensor:
    return F.relu(d_pos - d_neg + margin).mean()
