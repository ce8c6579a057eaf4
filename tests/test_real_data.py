"""The pipeline on a sample of the real STL-Fashion subset in ../shared (skipped where it is absent)."""

import json
import random
from pathlib import Path

import pytest

from ctl.config import Config
from ctl.evaluate import build_candidates, evaluate, model_scorer, random_scorer, raw_feature_scorer
from ctl.pipeline import prepare
from ctl.train import train

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "stl-fashion"
CATEGORIES = ("Apparel & Accessories|Shoes", "Apparel & Accessories|Clothing|Pants", "Apparel & Accessories|Clothing|Shirts & Tops")

pytestmark = pytest.mark.skipif(
    not (REAL / "fashion.json").is_file(),
    reason=f"the real STL-Fashion subset is not at {REAL}: the real-data test needs ../shared/data/stl-fashion",
)


def write_sample(out: Path, pairs_per_category: int = 300, extra_products: int = 150, seed: int = 0) -> Path:
    """An STL folder holding a sample of the real pairs and catalog; its images/ links to the real ones."""
    rng = random.Random(seed)
    categories = json.loads((REAL / "fashion-cat.json").read_text())
    pairs = [json.loads(line) for line in (REAL / "fashion.json").read_text().splitlines()]
    chosen = []
    for category in CATEGORIES:
        of_category = [p for p in pairs if categories[p["product"]] == category]
        chosen += rng.sample(of_category, pairs_per_category)
    catalog = {p["product"] for p in chosen}
    for category in CATEGORIES:
        others = sorted(p for p, c in categories.items() if c == category and p not in catalog)
        catalog.update(rng.sample(others, extra_products))
    out.mkdir(parents=True)
    (out / "fashion.json").write_text("".join(json.dumps(p) + "\n" for p in chosen))
    (out / "fashion-cat.json").write_text(json.dumps({p: categories[p] for p in sorted(catalog)}))
    (out / "images").symlink_to(REAL / "images")
    return out


def test_trained_full_model_beats_random_on_real_data(tmp_path):
    root = write_sample(tmp_path / "sample")
    cfg = Config().override([
        f"data.root={json.dumps(str(root))}",
        'features.backbone="efficientnet-lite0"',
        f"features.cache_dir={json.dumps(str(tmp_path / 'cache'))}",
        "train.epochs=15",
    ])
    dataset, features = prepare(cfg, progress=False)
    run = train(cfg, dataset, features, tmp_path / "run", progress=False)
    splits = dataset.split(cfg.data.split, cfg.data.seed)
    held_out = build_candidates(dataset, splits["val"] + splits["test"], cfg.eval)
    seen = {p for q in splits["train"] for p in q.positives}
    full = evaluate(model_scorer(run.model, features), held_out, seen, cfg.eval)["overall"]
    chance = evaluate(random_scorer(0), held_out, seen, cfg.eval)["overall"]
    raw = evaluate(raw_feature_scorer(features), held_out, seen, cfg.eval)["overall"]
    print(f"held-out queries {full['count']}: full AUC {full['auc']:.3f}, raw {raw['auc']:.3f}, random {chance['auc']:.3f}")
    assert full["count"] >= 60
    assert full["auc"] > chance["auc"] + 0.05
    assert full["hr@10"] > chance["hr@10"]
