"""Training on cached backbone features, with a run folder that survives interruption.

A run folder holds ``config.json``, ``categories.json``, ``backbone.json``, ``best.pt`` (the
checkpoint with the best validation AUC), ``last.pt`` (everything needed to resume) and
``metrics.jsonl`` (one record per epoch). Every file is replaced atomically.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ctl.config import Config
from ctl.data import Dataset, NegativeSampler
from ctl.evaluate import build_candidates, evaluate, model_scorer
from ctl.features import DatasetFeatures
from ctl.io import atomic_path, write_text_atomic
from ctl.model import CompleteTheLook, hinge_loss


class RunError(ValueError):
    """A run folder that cannot be used as asked."""


@dataclass
class Run:
    """A trained model with everything needed to use it."""

    path: Path
    config: Config
    backbone: dict  # name, weights_id, global_dim, local_dim, grid
    model: CompleteTheLook


def build_model(cfg: Config, backbone: dict, categories: list[str]) -> CompleteTheLook:
    height, width = backbone["grid"]
    return CompleteTheLook(cfg.model, backbone["global_dim"], backbone["local_dim"], height * width, categories)


def save_checkpoint(path: Path, payload: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_run(path: str | Path, checkpoint: str = "best.pt") -> Run:
    path = Path(path)
    if not (path / checkpoint).is_file():
        raise RunError(f"{path}: no {checkpoint}; train a model into this folder first (ctl train --run {path})")
    config = Config.load(path / "config.json")
    backbone = json.loads((path / "backbone.json").read_text())
    categories = json.loads((path / "categories.json").read_text())
    model = build_model(config, backbone, categories)
    model.load_state_dict(torch.load(path / checkpoint, map_location="cpu", weights_only=True)["model"])
    model.eval()
    return Run(path, config, backbone, model)


# Settings a run may change when resumed: they decide how long it trains or where things are, not what it learns.
RESUMABLE = {"train.epochs", "train.patience", "train.device", "features.cache_dir", "features.batch_size", "features.num_workers"}


def _flat(config: dict) -> dict[str, object]:
    return {f"{section}.{key}": value for section, values in config.items() for key, value in values.items()}


def _prepare_run_folder(path: Path, cfg: Config, backbone: dict, categories: list[str]) -> None:
    """Write the run's identity, or check that an existing run was made with the same one."""
    identity = {"config.json": cfg.to_dict(), "backbone.json": backbone, "categories.json": categories}
    if (path / "config.json").exists():
        found = _flat(json.loads((path / "config.json").read_text()))
        wanted = _flat(json.loads(json.dumps(cfg.to_dict())))
        changed = [f"{k}: {found.get(k)!r} -> {v!r}" for k, v in wanted.items() if found.get(k) != v and k not in RESUMABLE]
        for name in ("backbone.json", "categories.json"):
            if json.loads((path / name).read_text()) != json.loads(json.dumps(identity[name])):
                changed.append(f"{name} differs")
        if changed:
            raise RunError(f"{path} was trained with other settings ({'; '.join(changed)}): resume with the same ones or choose a new --run folder")
    path.mkdir(parents=True, exist_ok=True)
    for name, value in identity.items():
        write_text_atomic(path / name, json.dumps(value, indent=2) + "\n")


def train(cfg: Config, dataset: Dataset, features: DatasetFeatures, run_dir: str | Path, progress: bool = True) -> Run:
    """Train (or resume training) into ``run_dir``; returns the best model by validation AUC."""
    run_dir = Path(run_dir)
    tc = cfg.train
    splits = dataset.split(cfg.data.split, cfg.data.seed)
    if not splits["train"] or not splits["val"]:
        sizes = {k: len(v) for k, v in splits.items()}
        raise RunError(f"need training and validation queries, got {sizes}: use more scenes or change data.split")
    categories = dataset.category_names
    _prepare_run_folder(run_dir, cfg, features.backbone, categories)

    torch.manual_seed(tc.seed)
    model = build_model(cfg, features.backbone, categories).to(tc.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)

    train_queries = [q for q in splits["train"] for _ in q.positives]
    positives = torch.tensor([features.product_index[p] for q in splits["train"] for p in q.positives])
    scene_rows = np.array([features.scene_row(q) for q in train_queries])
    category_idx = model.category.index([q.category for q in train_queries])
    sampler = NegativeSampler(dataset, features.product_index)
    product_global = torch.from_numpy(features.product_global)
    val_candidates = build_candidates(dataset, splits["val"], cfg.eval)
    seen = {p for q in splits["train"] for p in q.positives}

    state = {"epoch": 0, "best_auc": -1.0, "bad_epochs": 0, "log": []}
    if (run_dir / "last.pt").exists():
        state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)
        model.load_state_dict(state.pop("model"))
        optimizer.load_state_dict(state.pop("optimizer"))
        if progress:
            print(f"resuming {run_dir} after epoch {state['epoch']} (best validation AUC {state['best_auc']:.4f})")

    epochs = tqdm(range(state["epoch"], tc.epochs), initial=state["epoch"], total=tc.epochs, desc="train", unit="epoch", disable=not progress)
    for epoch in epochs:
        if state["bad_epochs"] >= tc.patience:
            break
        # Seeding per epoch makes a resumed run identical to an uninterrupted one.
        torch.manual_seed(tc.seed * 100_003 + epoch)
        rng = np.random.default_rng([tc.seed, epoch])
        order = rng.permutation(len(train_queries))
        negatives = torch.from_numpy(sampler.sample(train_queries, rng))
        model.train()
        started, losses = time.perf_counter(), []
        for start in range(0, len(order), tc.batch_size):
            batch = order[start : start + tc.batch_size]
            if len(batch) < 2:  # BatchNorm needs two samples
                continue
            scene_global, scene_local = features.scene_tensors(scene_rows[batch])
            scene = model.embed_scenes(scene_global.to(tc.device), scene_local.to(tc.device))
            q = model.query(scene, category_idx[batch].to(tc.device))
            d_pos = model.distance(q, model.embed_products(product_global[positives[batch]].float().to(tc.device)))
            d_neg = model.distance(q, model.embed_products(product_global[negatives[batch]].float().to(tc.device)))
            loss = hinge_loss(d_pos, d_neg, tc.margin)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        seconds = time.perf_counter() - started
        val = evaluate(model_scorer(model.cpu(), features), val_candidates, seen, cfg.eval)
        model.to(tc.device)
        record = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "seconds": round(seconds, 3), **{f"val_{k}": v for k, v in val["overall"].items()}}
        if "novelty:new" in val:
            record["val_auc_new"] = val["novelty:new"]["auc"]
        state["log"].append(record)
        if record["val_auc"] > state["best_auc"]:
            state["best_auc"], state["bad_epochs"] = record["val_auc"], 0
            save_checkpoint(run_dir / "best.pt", {"model": model.state_dict(), "epoch": epoch + 1, "val_auc": record["val_auc"]})
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        save_checkpoint(run_dir / "last.pt", {**state, "model": model.state_dict(), "optimizer": optimizer.state_dict()})
        write_text_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in state["log"]))
        epochs.set_postfix(loss=f"{record['loss']:.4f}", val_auc=f"{record['val_auc']:.4f}")
    return load_run(run_dir)
