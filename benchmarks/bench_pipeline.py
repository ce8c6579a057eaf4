"""Where the time goes: backbone feature extraction, cached re-reads, and training on cached features against
running the frozen backbone inside every training step (the naive design).

    python benchmarks/bench_pipeline.py [--data ../shared/data/stl-fashion] [--images 300] [--steps 2]

Extraction is encode_dataset into a fresh cache (read, hash, decode, preprocess, backbone, write shards; a warm-up
batch left out); the re-read is the same call once everything is cached. The cached epoch is train()'s own epoch
time; the naive step decodes the scene crop, positive and negative images and runs the backbone before the same model
step, and is timed over --steps steps, then extrapolated to the epoch. resnet50 runs with weights="random": the same
compute as its ImageNet weights, which need a download. Ends with a markdown table for the README.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import tempfile
import time
import tracemalloc
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ctl.backbones import create_backbone, preprocess
from ctl.config import Config, FeatureConfig, TrainConfig
from ctl.data import Dataset, NegativeSampler, SkipReport, load_dataset
from ctl.features import encode_dataset
from ctl.images import ImageRef, load_region
from ctl.model import hinge_loss
from ctl.synthetic import generate
from ctl.train import build_model, train

ROOT = Path(__file__).resolve().parents[1]


def subset(root: Path, images: int) -> tuple[Dataset, dict[str, int]]:
    """About ``images`` images of an STL folder: the first images/3 scene crops, their positives, then other products
    of their categories taken in turn (the negatives). Also the full folder's counts."""
    full = load_dataset(root)
    keys, queries = set(), []
    for q in full.queries:
        if (q.scene, q.crop) in keys or len(keys) < images // 3:
            keys.add((q.scene, q.crop))
            queries.append(q)
    products = {p for q in queries for p in q.positives}
    spare = {c: [p for p in sorted(full.categories) if full.categories[p] == c and p not in products]
             for c in sorted({q.category for q in queries})}
    while len(keys) + len(products) < images and any(spare.values()):
        for pool in spare.values():
            if pool and len(keys) + len(products) < images:
                products.add(pool.pop(0))
    catalog = {p: full.categories[p] for p in sorted(products)}
    sub = Dataset(full.root, catalog, queries, full.scene_products, SkipReport())
    counts = {"crops": len({(q.scene, q.crop) for q in full.queries}), "products": len(full.categories)}
    return sub, counts


def make_config(name: str, cache_dir: Path, batch_size: int, epochs: int) -> Config:
    weights = "random" if name == "resnet50" else ""
    return Config(features=FeatureConfig(backbone=name, weights=weights, cache_dir=str(cache_dir)),
                  train=TrainConfig(batch_size=batch_size, epochs=epochs, patience=epochs))


def training_samples(cfg: Config, dataset: Dataset) -> list:
    """(query, positive) pairs of the training split, as train() builds them."""
    return [(q, p) for q in dataset.split(cfg.data.split, cfg.data.seed)["train"] for p in q.positives]


def naive_epoch(cfg: Config, dataset: Dataset, features, backbone, steps: int) -> tuple[float, int]:
    """Seconds per epoch when every step decodes its images and runs the backbone, extrapolated from ``steps``
    steps; and the number of samples measured."""
    samples, tc = training_samples(cfg, dataset), cfg.train
    queries = [q for q, _ in samples]
    sig = {row: p for p, row in features.product_index.items()}
    negatives = [sig[row] for row in NegativeSampler(dataset, features.product_index).sample(queries, np.random.default_rng(0))]
    model = build_model(cfg, features.backbone, dataset.category_names)
    optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    categories = model.category.index([q.category for q in queries])
    order = np.random.default_rng(0).permutation(len(samples))
    batches = [b for b in np.array_split(order, range(tc.batch_size, len(order), tc.batch_size)) if len(b) > 1]

    def encode(refs):
        size = cfg.features.image_size
        x = torch.stack([preprocess(load_region(ref), size, backbone.mean, backbone.std) for ref in refs])
        with torch.no_grad():  # not inference_mode: its tensors cannot be saved for the model's backward
            return backbone(x.contiguous(memory_format=torch.channels_last))

    model.train()
    seconds, measured = 0.0, 0
    for step in range(steps):
        batch = batches[step % len(batches)]
        started = time.perf_counter()
        scene_global, scene_local = encode([ImageRef(dataset.image_path(queries[i].scene), queries[i].crop) for i in batch])
        positive, _ = encode([ImageRef(dataset.image_path(samples[i][1])) for i in batch])
        negative, _ = encode([ImageRef(dataset.image_path(negatives[i])) for i in batch])
        # from here on, the same step as train()
        q = model.query(model.embed_scenes(scene_global, scene_local.flatten(2).transpose(1, 2)), categories[batch])
        d_pos, d_neg = model.distance(q, model.embed_products(positive)), model.distance(q, model.embed_products(negative))
        loss = hinge_loss(d_pos, d_neg, tc.margin)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seconds += time.perf_counter() - started
        measured += len(batch)
    return seconds / measured * len(samples), measured


def peak_rss_mib() -> float:
    # VmHWM, not ru_maxrss: a process started by fork + exec keeps its parent's ru_maxrss as a floor
    status = Path("/proc/self/status")
    if status.exists():
        return next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmHWM")) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def cached_training_memory(root: str, images: int, name: str, cache_dir: str, batch_size: int) -> dict:
    """Run in a fresh process: load the cached features and train 2 epochs, as `ctl train` would."""
    imported = peak_rss_mib()
    dataset, _ = subset(Path(root), images)
    cfg = make_config(name, Path(cache_dir), batch_size, 2)
    features = encode_dataset(dataset, create_backbone(name, cfg.features.weights), cfg.features, progress=False)
    loaded = peak_rss_mib()
    tracemalloc.start()
    with tempfile.TemporaryDirectory() as run:
        train(cfg, dataset, features, run, progress=False)
    traced = tracemalloc.get_traced_memory()[1] / 2**20
    return {"imported": imported, "loaded": loaded, "peak": peak_rss_mib(), "traced": traced}


def bench(name: str, dataset: Dataset, root: Path, args, tmp: Path) -> dict:
    cfg = make_config(name, tmp / f"cache-{name}", args.batch_size, args.epochs)
    backbone = create_backbone(name, cfg.features.weights)
    images = len(dataset.categories) + len({(q.scene, q.crop) for q in dataset.queries})
    with torch.inference_mode():  # warm-up (oneDNN sets up its kernels on a first batch), left out of the timing
        backbone(torch.zeros(cfg.features.batch_size, 3, 224, 224).contiguous(memory_format=torch.channels_last))
    started = time.perf_counter()
    features = encode_dataset(dataset, backbone, cfg.features, progress=False)
    extract = images / (time.perf_counter() - started)
    started = time.perf_counter()
    encode_dataset(dataset, backbone, cfg.features, progress=False)
    reread = images / (time.perf_counter() - started)
    print(f"{name}: extraction {extract:.1f} img/s, cached re-read {reread:.0f} img/s ({images} images)", flush=True)

    run = train(cfg, dataset, features, tmp / f"run-{name}", progress=False)
    seconds = [json.loads(line)["seconds"] for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    cached = statistics.median(seconds[1:] or seconds)  # the first epoch warms up
    naive, measured = naive_epoch(cfg, dataset, features, backbone, args.steps)
    samples = len(training_samples(cfg, dataset))
    print(f"{name}: epoch of {samples} samples, batch {args.batch_size}: cached {cached:.3f} s (median of epochs 2-"
          f"{len(seconds)}), naive {naive:.1f} s (extrapolated from {args.steps} step(s), {measured} samples): "
          f"{naive / cached:.0f}x", flush=True)

    # a fresh process, so that extraction and the naive steps do not set its peak
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        job = pool.submit(cached_training_memory, str(root), args.images, name, cfg.features.cache_dir, args.batch_size)
        memory = job.result()
    arrays = features.product_global.nbytes + features.scene_global.nbytes + features.scene_local.nbytes
    per_scene = (features.scene_global[0].nbytes + features.scene_local[0].nbytes) / 2**20
    per_product = features.product_global[0].nbytes / 2**20
    print(f"{name}: cached training in a fresh process: peak RSS {memory['imported']:.0f} MiB after imports, "
          f"{memory['loaded']:.0f} MiB with backbone and features loaded, {memory['peak']:.0f} MiB after 2 epochs; "
          f"numpy/Python allocations while training peak at {memory['traced']:.0f} MiB (tracemalloc: torch's are not traced)\n"
          f"{name}: feature arrays {arrays / 2**20:.1f} MiB: {per_scene * 1024:.0f} KiB a scene crop (with its local map), "
          f"{per_product * 1024:.1f} KiB a product", flush=True)
    return {"name": name, "extract": extract, "reread": reread, "cached": cached, "naive": naive, "samples": samples,
            "rss": memory["peak"], "arrays": arrays / 2**20, "per_scene": per_scene, "per_product": per_product}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/stl-fashion", help="an STL folder")
    parser.add_argument("--backbone", nargs="+", default=["efficientnet-lite0", "resnet50"])
    parser.add_argument("--images", type=int, default=300, help="scene crops + products to extract")
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--epochs", type=int, default=5, help="cached epochs to time")
    parser.add_argument("--steps", type=int, default=2, help="naive steps to time")
    args = parser.parse_args()
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root, source = args.data, f"`{args.data.name}` (real JPEGs)"
        if not (root / "images").is_dir():
            print(f"{root}: no STL folder there; using a generated dataset instead (ctl.synthetic.generate)")
            root = generate(tmp / "synthetic", scenes=max(20, args.images // 3), products_per_category=max(5, args.images // 12))
            source = "a generated dataset (ctl.synthetic)"
        dataset, full = subset(root, args.images)
        crops = len({(q.scene, q.crop) for q in dataset.queries})
        print(f"{crops} scene crops + {len(dataset.categories)} products of {root}; fresh cache in {tmp}", flush=True)
        rows = [bench(name, dataset, root, args, tmp) for name in args.backbone]

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    load = f"{'/'.join(f'{v:.1f}' for v in load_before)} before, {'/'.join(f'{v:.1f}' for v in os.getloadavg())} after"
    print("\n| backbone | extraction | cache re-read | epoch, cached | epoch, naive | naive / cached "
          "| peak RSS, cached training | feature arrays |")
    print("| --- | --: | --: | --: | --: | --: | --: | --: |")
    for r in rows:
        name = r["name"] + (" (random weights)" if r["name"] == "resnet50" else "")
        print(f"| {name} | {r['extract']:.1f} img/s | {r['reread']:.0f} img/s | {r['cached']:.2f} s | {r['naive']:.1f} s "
              f"| {r['naive'] / r['cached']:.0f}x | {r['rss']:.0f} MiB | {r['arrays']:.1f} MiB |")
    print(f"\n{crops} scene crops + {len(dataset.categories)} products from {source}, 224 px; training epoch = "
          f"{rows[0]['samples']} samples, batch {args.batch_size}; naive epoch extrapolated from {args.steps} timed step(s). "
          f"{os.cpu_count()} CPUs ({cpu}), {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
          f"load average {load} (1/5/15 min).")
    totals = [f"{full['crops'] * r['per_scene'] + full['products'] * r['per_product']:.0f} MiB ({r['name']})" for r in rows]
    print(f"Features of all {full['crops']} scene crops + {full['products']} products of that folder: {', '.join(totals)}.")


if __name__ == "__main__":
    main()
