"""The whole pipeline on one dataset: features, every model variant, baselines, one table."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ctl.backbones import create_backbone
from ctl.config import VARIANTS, Config
from ctl.data import Dataset, Query, load_dataset
from ctl.evaluate import (
    build_candidates,
    evaluate,
    markdown_table,
    model_scorer,
    popularity_scorer,
    random_scorer,
    raw_feature_scorer,
    summarize,
)
from ctl.features import DatasetFeatures, encode_dataset
from ctl.images import load_image
from ctl.io import write_text_atomic
from ctl.recommend import Recommender, ranking_picture
from ctl.train import Run, train
from ctl.visualize import save_png, stack


def prepare(cfg: Config, progress: bool = True) -> tuple[Dataset, DatasetFeatures]:
    """Load the dataset and its backbone features (from the cache where they are already there)."""
    dataset = load_dataset(cfg.data.root, cfg.data.domain, cfg.data.min_crop_px)
    backbone = create_backbone(cfg.features.backbone, cfg.features.weights)
    features = encode_dataset(dataset, backbone, cfg.features, progress=progress)
    if progress:
        print(dataset.report.summary())
    return dataset, features


def run_pipeline(
    cfg: Config,
    out: str | Path,
    variants: Sequence[str] = VARIANTS,
    seeds: Sequence[int] = (0,),
    progress: bool = True,
    examples: int = 6,
) -> dict:
    """Train each variant for each seed into ``out/runs`` and write ``out/results.{json,md}``, and
    ``out/rankings-<variant>.png``: what the first seed's model recommends for a few test scenes.

    Every method is evaluated on the same candidates of the validation and the test split."""
    out = Path(out)
    dataset, features = prepare(cfg, progress)
    splits = dataset.split(cfg.data.split, cfg.data.seed)
    seen = {p for q in splits["train"] for p in q.positives}
    candidates = {name: build_candidates(dataset, splits[name], cfg.eval) for name in ("val", "test")}

    def score_all(scorer) -> dict:
        return {name: evaluate(scorer, cands, seen, cfg.eval) for name, cands in candidates.items()}

    runs: dict[str, list[dict]] = {
        "random": [score_all(random_scorer(cfg.eval.seed + s)) for s in seeds],
        "popularity": [score_all(popularity_scorer(splits["train"]))],
        f"raw {features.backbone['name']} features": [score_all(raw_feature_scorer(features))],
    }
    for variant in variants:
        for seed in seeds:
            run_cfg = cfg.override([f"model.variant={variant}", f"train.seed={seed}"])
            run = train(run_cfg, dataset, features, out / "runs" / f"{variant}-seed{seed}", progress)
            runs.setdefault(variant, []).append(score_all(model_scorer(run.model, features)))
            if seed == seeds[0]:
                draw_rankings(run, dataset, splits["test"][:examples], out / f"rankings-{variant}.png")

    results = {
        "dataset": str(dataset.root),
        "backbone": features.backbone,
        "seeds": list(seeds),
        "config": cfg.to_dict(),
        "splits": {name: len(c) for name, c in candidates.items()},
        "skipped": dataset.report.counts(),
        "methods": {m: {split: summarize([r[split] for r in rs]) for split in candidates} for m, rs in runs.items()},
    }
    write_text_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    write_text_atomic(out / "results.md", results_markdown(results))
    return results


def draw_rankings(run: Run, dataset: Dataset, queries: Sequence[Query], path: Path, k: int = 5) -> None:
    """The top-k of the whole category's catalog for each query, correct answers marked, as one picture."""
    if not queries:
        return
    recommender = Recommender.from_dataset(run, dataset, progress=False)
    strips = []
    for query in queries:
        result = recommender.recommend(load_image(dataset.image_path(query.scene)), query.bbox, query.category, k)
        strips.append(ranking_picture(result, dataset.image_path, query.category, query.positives))
    save_png(stack(strips), path)


def results_markdown(results: dict) -> str:
    parts = [f"Dataset `{results['dataset']}`, backbone `{results['backbone']['name']}`, seeds {results['seeds']}.\n"]
    for split in ("val", "test"):
        by_method = {m: s[split] for m, s in results["methods"].items()}
        for group, title in (("overall", "all queries"), ("novelty:new", "queries whose positive is new (never a training positive)")):
            parts.append(f"**{split} split, {title}**\n\n{markdown_table(by_method, group)}\n")
    parts.append(f"**val split, AUC per category**\n\n{category_table({m: s['val'] for m, s in results['methods'].items()})}\n")
    return "\n".join(parts)


def category_table(by_method: dict[str, dict], metric: str = "auc") -> str:
    """One row per category, one column per method: where each method wins and loses."""
    methods = list(by_method)
    categories = sorted({g for summary in by_method.values() for g in summary if g.startswith("category:")})
    lines = [f"| category | {' | '.join(methods)} | queries |", "|" + " --- |" * (len(methods) + 2)]
    for group in categories:
        cells = [f"{by_method[m][group][metric][0]:.3f}" if group in by_method[m] else "" for m in methods]
        count = next(by_method[m][group]["count"] for m in methods if group in by_method[m])
        lines.append(f"| {group.removeprefix('category:').split('|')[-1]} | {' | '.join(cells)} | {count} |")
    return "\n".join(lines)
