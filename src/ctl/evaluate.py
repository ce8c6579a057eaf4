"""Ranking evaluation: every method ranks the same candidates for the same queries.

A query's candidates are all its positives followed by same-category negatives (up to
``num_negatives``; the first ``fitb_negatives`` of them form the fill-in-the-blank question).
Any positive counts as a hit. Ties are scored by their expected value under a random order,
so a method that cannot tell candidates apart (popularity on unseen products) is not punished
or rewarded by the order in which candidates happen to be listed.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ctl.config import EvalConfig
from ctl.data import Dataset, Query
from ctl.features import DatasetFeatures
from ctl.model import CompleteTheLook


@dataclass(frozen=True)
class Candidates:
    query: Query
    products: tuple[str, ...]  # the positives first, then the negatives
    num_positives: int


def build_candidates(dataset: Dataset, queries: Sequence[Query], cfg: EvalConfig) -> list[Candidates]:
    """Candidates per query: explicit negatives where a query file gave them, else a seeded sample.

    Each query's sample depends only on the seed and the query itself, so a query gets the same
    negatives whatever else is being evaluated."""
    out = []
    for query in queries:
        negatives = query.negatives
        if negatives is None:
            rng = random.Random(f"{cfg.seed}:{query.scene}:{query.bbox}:{query.category}")
            negatives = tuple(dataset.sample_negatives(query, cfg.num_negatives, rng))
        if negatives:
            out.append(Candidates(query, query.positives + negatives, len(query.positives)))
    return out


def rank_metrics(distances: np.ndarray, num_positives: int, fitb_negatives: int = 3, ks: Sequence[int] = (1, 10)) -> dict[str, float]:
    """Metrics of one query from the distances of its candidates (positives first; lower is better)."""
    pos, neg = distances[:num_positives], distances[num_positives:]
    auc = ((neg[None, :] > pos[:, None]) + 0.5 * (neg[None, :] == pos[:, None])).mean()
    # FITB asks for the first positive among the first few negatives.
    fitb_neg = neg[:fitb_negatives]
    fitb = float(not (fitb_neg < pos[0]).any()) / (1 + (fitb_neg == pos[0]).sum())
    best = pos.min()
    ahead, tied = int((neg < best).sum()), int((neg == best).sum())
    ranks = np.arange(ahead + 1, ahead + tied + 2)  # equally likely ranks of the best positive
    metrics = {"auc": float(auc), "fitb": float(fitb)}
    for k in ks:
        metrics[f"hr@{k}"] = float((ranks <= k).mean())
    metrics["mrr"] = float((1.0 / ranks).mean())
    return metrics


Scorer = Callable[[list[Candidates]], list[np.ndarray]]


def random_scorer(seed: int) -> Scorer:
    def score(candidates: list[Candidates]) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        return [rng.random(len(c.products)) for c in candidates]

    return score


def popularity_scorer(train_queries: Sequence[Query]) -> Scorer:
    """Products ranked by how often they are a positive in the training split."""
    counts = collections.Counter(p for q in train_queries for p in q.positives)

    def score(candidates: list[Candidates]) -> list[np.ndarray]:
        return [-np.array([counts[p] for p in c.products], dtype=np.float64) for c in candidates]

    return score


def raw_feature_scorer(features: DatasetFeatures) -> Scorer:
    """Untrained baseline: cosine distance between the scene crop's and the product's backbone vectors."""

    def unit(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float32)
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    def score(candidates: list[Candidates]) -> list[np.ndarray]:
        out = []
        for c in candidates:
            scene = unit(features.scene_global[features.scene_row(c.query)])
            products = unit(features.product_global[[features.product_index[p] for p in c.products]])
            out.append(1.0 - products @ scene)
        return out

    return score


def model_scorer(model: CompleteTheLook, features: DatasetFeatures, batch_size: int = 256) -> Scorer:
    @torch.no_grad()
    def score(candidates: list[Candidates]) -> list[np.ndarray]:
        model.eval()
        products = model.embed_products(torch.from_numpy(features.product_global).float())
        out = []
        for start in range(0, len(candidates), batch_size):
            batch = candidates[start : start + batch_size]
            rows = [features.scene_row(c.query) for c in batch]
            scene = model.embed_scenes(*features.scene_tensors(rows))
            category = model.category.index([c.query.category for c in batch])
            q = model.query(scene, category)
            for c, q_row in zip(batch, q):
                cand = products[[features.product_index[p] for p in c.products]]
                out.append(model.distance_matrix(q_row[None], cand)[0].numpy())
        return out

    return score


def evaluate(scorer: Scorer, candidates: list[Candidates], seen_products: set[str], cfg: EvalConfig) -> dict:
    """Mean metrics overall, per category, and for seen versus new positive products.

    A query is "new" when none of its positives is a positive anywhere in the training split:
    there a model cannot score by remembering products."""
    groups: dict[str, list[dict[str, float]]] = collections.defaultdict(list)
    for c, distances in zip(candidates, scorer(candidates)):
        metrics = rank_metrics(np.asarray(distances, dtype=np.float64), c.num_positives, cfg.fitb_negatives, cfg.hit_ks)
        novelty = "seen" if seen_products.intersection(c.query.positives) else "new"
        for key in ("overall", f"category:{c.query.category}", f"novelty:{novelty}"):
            groups[key].append(metrics)
    return {key: {**{m: float(np.mean([r[m] for r in rows])) for m in rows[0]}, "count": len(rows)} for key, rows in groups.items()}


def summarize(runs: Sequence[dict]) -> dict:
    """Mean and standard deviation of each metric over repeated runs (seeds) of one method."""
    out = {}
    for key in runs[0]:
        metrics = [m for m in runs[0][key] if m != "count"]
        out[key] = {m: (float(np.mean([r[key][m] for r in runs])), float(np.std([r[key][m] for r in runs]))) for m in metrics}
        out[key]["count"] = runs[0][key]["count"]
    return out


def markdown_table(results: dict[str, dict], group: str = "overall") -> str:
    """One row per method; a cell is ``mean`` or ``mean ± std`` when the method ran over several seeds."""
    present = [summary[group] for summary in results.values() if group in summary]
    if not present:
        return f"(no {group} queries)"
    columns = [m for m in present[0] if m != "count"]
    header = f"| method | {' | '.join(c.upper() for c in columns)} | queries |"
    lines = [header, "|" + " --- |" * (len(columns) + 2)]
    for method, summary in results.items():
        if group not in summary:
            continue
        cells = []
        for c in columns:
            mean, std = summary[group][c]
            cells.append(f"{mean:.3f}" + (f" ± {std:.3f}" if std > 0 else ""))
        lines.append(f"| {method} | {' | '.join(cells)} | {summary[group]['count']} |")
    return "\n".join(lines)
