"""The ``ctl`` command: a thin layer over the library, one subcommand per pipeline step."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ctl.config import VARIANTS, Config
from ctl.download import IMAGE_URL

DEFAULT_DATA = Path("~/.cache/ctl/synthetic").expanduser()


def build_config(args: argparse.Namespace) -> Config:
    """The config file (if any), then the explicit flags, then ``--set`` assignments."""
    cfg = Config.load(args.config) if args.config else Config()
    flags = {
        "data.root": getattr(args, "data", None),
        "features.backbone": getattr(args, "backbone", None),
        "features.weights": getattr(args, "weights", None),
        "features.cache_dir": getattr(args, "cache_dir", None),
        "model.variant": getattr(args, "variant", None),
        "train.epochs": getattr(args, "epochs", None),
    }
    assignments = [f"{k}={json.dumps(str(v) if isinstance(v, Path) else v)}" for k, v in flags.items() if v is not None]
    return cfg.override(assignments + list(args.set))


def ensure_data(cfg: Config) -> Config:
    """With no dataset named, generate the small built-in one (seconds) and use it."""
    if cfg.data.root:
        return cfg
    from ctl.synthetic import generate

    print(f"no --data given: using the generated dataset in {DEFAULT_DATA}")
    generate(DEFAULT_DATA)
    return cfg.override([f"data.root={json.dumps(str(DEFAULT_DATA))}"])


def open_run(args: argparse.Namespace):
    """A trained run, its config updated by ``--data`` and ``--set`` (e.g. a cache folder, eval settings)."""
    from ctl.train import load_run

    run = load_run(args.run)
    data = [f"data.root={json.dumps(str(args.data))}"] if args.data else []
    run.config = run.config.override(data + list(args.set))
    return run


def run_dataset(run):
    from ctl.data import load_dataset

    data = run.config.data
    return load_dataset(data.root, data.domain, data.min_crop_px)


def cmd_features(args: argparse.Namespace) -> None:
    from ctl.pipeline import prepare

    cfg = ensure_data(build_config(args))
    _, features = prepare(cfg)
    print(f"features ready: {len(features.product_index)} products, {len(features.scene_index)} scene crops ({features.backbone['name']})")


def cmd_train(args: argparse.Namespace) -> None:
    from ctl.pipeline import prepare
    from ctl.train import train

    cfg = ensure_data(build_config(args))
    dataset, features = prepare(cfg)
    run = train(cfg, dataset, features, args.run)
    print(f"best model in {run.path / 'best.pt'}; per-epoch metrics in {run.path / 'metrics.jsonl'}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from ctl.data import load_queries
    from ctl.evaluate import build_candidates, evaluate, markdown_table, model_scorer, popularity_scorer, random_scorer, raw_feature_scorer, summarize
    from ctl.features import encode_dataset
    from ctl.io import write_text_atomic
    from ctl.recommend import load_backbone

    run = open_run(args)
    cfg = run.config
    dataset = run_dataset(run)
    splits = dataset.split(cfg.data.split, cfg.data.seed)
    queries = load_queries(args.queries, dataset) if args.queries else splits[args.split]
    features = encode_dataset(dataset, load_backbone(run), cfg.features, queries=queries)
    print(dataset.report.summary())
    candidates = build_candidates(dataset, [q for q in queries if features.has_scene(q)], cfg.eval)
    seen = {p for q in splits["train"] for p in q.positives}
    scorers = {
        "random": random_scorer(cfg.eval.seed),
        "popularity": popularity_scorer(splits["train"]),
        f"raw {features.backbone['name']} features": raw_feature_scorer(features),
        cfg.model.variant: model_scorer(run.model, features),
    }
    results = {name: evaluate(scorer, candidates, seen, cfg.eval) for name, scorer in scorers.items()}
    print(markdown_table({name: summarize([r]) for name, r in results.items()}))
    if args.out:
        write_text_atomic(args.out, json.dumps(results, indent=2) + "\n")


def cmd_recommend(args: argparse.Namespace) -> None:
    from ctl.data import validate_box
    from ctl.images import load_image
    from ctl.recommend import Recommender, load_backbone, ranking_picture
    from ctl.visualize import attention_overlay, save_png

    run = open_run(args)
    box = validate_box(args.box, "--box") if args.box else None
    image = load_image(args.scene)
    if args.index:
        from ctl.index import CatalogIndex, IndexedRecommender

        index = CatalogIndex.load(args.index, run)
        recommender = IndexedRecommender(run, load_backbone(run), index)
        image_path = index.image_path
    else:
        dataset = run_dataset(run)
        recommender = Recommender.from_dataset(run, dataset)
        image_path = dataset.image_path
    result = recommender.recommend(image, box, args.category, args.k)
    for rank, (product, distance) in enumerate(result.products, 1):
        print(f"{rank:3d}  {product}  d={distance:.4f}  {image_path(product)}")
    if args.explain and result.scene.attention is not None:
        save_png(attention_overlay(result.scene.crop, result.scene.attention), args.explain)
        print(f"attention map: {args.explain}")
    if args.strip:
        save_png(ranking_picture(result, image_path, args.category), args.strip)
        print(f"ranking picture: {args.strip}")


def cmd_index(args: argparse.Namespace) -> None:
    from ctl.index import build_index
    from ctl.recommend import load_backbone

    run = open_run(args)
    dataset = run_dataset(run)
    index, report = build_index(args.out, run, load_backbone(run), dataset, kind=args.kind, rebuild=args.rebuild)
    kinds = ", ".join(sorted({shelf.kind for shelf in index.shelves.values()}))
    print(f"{args.out}: {len(index)} products in {len(index.categories)} categories ({kinds}); added {report.added}, removed {report.removed}")
    for path, reason in list(report.left_out.items())[:5]:
        print(f"  left out {path}: {reason}")
    if len(report.left_out) > 5:
        print(f"  ... {len(report.left_out)} left out in all")


def cmd_serve(args: argparse.Namespace) -> None:
    import os

    import torch
    import uvicorn

    from ctl.index import CatalogIndex, IndexedRecommender
    from ctl.recommend import load_backbone
    from ctl.serve import create_app, pick_examples

    run = open_run(args)
    index = CatalogIndex.load(args.index, run)
    examples = []
    data = run.config.data.root
    if args.examples and data and Path(data).expanduser().is_dir():
        dataset = run_dataset(run)
        examples = pick_examples(dataset, list(index.categories), args.examples, run.config.data)
    elif args.examples:
        print(f"no example scenes: the dataset {data or '(none)'} is not here; pass --data")
    # One core per scene and as many scenes at once as cores: with concurrent requests this beats
    # torch's intra-op threads, which stall when another request's thread takes their core.
    torch.set_num_threads(1)
    concurrency = args.concurrency or os.cpu_count() or 1
    recommender = IndexedRecommender(run, load_backbone(run), index)
    app = create_app(recommender, examples, max_upload_bytes=int(args.max_upload_mb * 2**20), concurrency=concurrency)
    print(f"serving {len(index)} products on http://{args.host}:{args.port}/ (API docs: /docs)")
    uvicorn.run(app, host=args.host, port=args.port)


def cmd_download(args: argparse.Namespace) -> None:
    from ctl.download import download, fetch_official

    if args.domain:
        args.pairs, args.categories = fetch_official(args.domain, args.out, timeout=args.timeout)
    elif not (args.pairs and args.categories):
        raise ValueError("name the official files: --domain fashion|home, or --pairs FILE and --categories FILE")
    summary = download(
        args.pairs,
        args.categories,
        args.out,
        url_template=args.url_template,
        connections=args.connections,
        rate=args.rate,
        retries=args.retries,
        timeout=args.timeout,
        max_failure_rate=args.max_failure_rate,
    )
    print(summary.report())
    if not summary.passed:
        sys.exit(1)


def cmd_run(args: argparse.Namespace) -> None:
    from ctl.pipeline import run_pipeline

    cfg = ensure_data(build_config(args))
    run_pipeline(cfg, args.out, args.variants, list(range(args.seeds)))
    print((Path(args.out) / "results.md").read_text())
    print(f"results: {Path(args.out) / 'results.md'} and results.json; pictures of the rankings: rankings-<variant>.png; runs in {Path(args.out) / 'runs'}")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="ctl", description="Complete the Look: recommend products that complete a scene.")
    sub = top.add_subparsers(dest="command", required=True)

    def command(name: str, func, help: str, data: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        p.add_argument("--config", type=Path, help="a JSON config file (see ctl.config)")
        p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one config value")
        if data:
            p.add_argument("--data", type=Path, help="an STL-format folder (default: a small generated dataset)")
        return p

    def run_command(name: str, func, help: str) -> argparse.ArgumentParser:
        """A command on a trained run: its dataset is the run's unless --data names another."""
        p = command(name, func, help, data=False)
        p.add_argument("--run", type=Path, required=True, help="the run folder (ctl train)")
        p.add_argument("--data", type=Path, help="the STL folder (default: the run's dataset)")
        return p

    def backbone_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--backbone", help="resnet50 (default, needs its weights) or efficientnet-lite0 (offline)")
        p.add_argument("--weights", help="a state-dict file for the backbone")
        p.add_argument("--cache-dir", help="where extracted features are cached")

    p = command("features", cmd_features, "extract and cache backbone features of a dataset")
    backbone_flags(p)

    p = command("train", cmd_train, "train a model into a run folder (resumes if it exists)")
    backbone_flags(p)
    p.add_argument("--run", type=Path, required=True, help="the run folder")
    p.add_argument("--variant", choices=VARIANTS)
    p.add_argument("--epochs", type=int)

    p = run_command("evaluate", cmd_evaluate, "evaluate a trained run against the baselines")
    p.add_argument("--split", choices=("val", "test"), default="test")
    p.add_argument("--queries", type=Path, help="an explicit query file (JSON lines) instead of a split")
    p.add_argument("--out", type=Path, help="write the metrics as JSON here")

    p = run_command("recommend", cmd_recommend, "recommend catalog products that complete a scene")
    p.add_argument("--scene", type=Path, required=True, help="the scene image (any common format)")
    p.add_argument("--box", type=float, nargs=4, metavar=("LEFT", "TOP", "RIGHT", "BOTTOM"), help="the region to fill, normalised to [0, 1] (default: none, the whole scene is context)")
    p.add_argument("--category", required=True)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--explain", type=Path, help="save the attention map over the scene as a PNG")
    p.add_argument("--strip", type=Path, help="save the scene and the ranked products as one PNG")
    p.add_argument("--index", type=Path, help="rank with this catalog index (ctl index) instead of embedding the catalog")

    p = run_command("index", cmd_index, "index a run's embeddings of the catalog for fast search (updates an existing index)")
    p.add_argument("--out", type=Path, required=True, help="the index folder")
    p.add_argument("--kind", choices=("auto", "flat", "ivf", "hnsw"), help="exact (flat) or approximate search; auto: flat up to 50k products per category, IVF above")
    p.add_argument("--rebuild", action="store_true", help="start afresh instead of updating the index in --out")

    p = run_command("serve", cmd_serve, "serve the HTTP API and the web page (example scenes from the run's dataset)")
    p.add_argument("--index", type=Path, required=True, help="the run's catalog index (ctl index)")
    p.add_argument("--examples", type=int, default=6, help="how many test-split scenes the page offers (default: 6)")
    p.add_argument("--host", default="127.0.0.1", help="the address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="the largest scene upload accepted (default: 10)")
    p.add_argument("--concurrency", type=int, help="scenes embedded at once, one core each (default: the number of cores)")

    p = command("download", cmd_download, "download the official STL images into an STL-format folder (resumable)", data=False)
    p.add_argument("--domain", choices=("fashion", "home"), help="fetch the official pairs and category files too (needs the internet)")
    p.add_argument("--pairs", type=Path, help="the pairs file (JSON lines), e.g. fashion.json")
    p.add_argument("--categories", type=Path, help="the category file, e.g. fashion-cat.json")
    p.add_argument("--out", type=Path, required=True, help="the STL folder to fill")
    p.add_argument("--url-template", default=IMAGE_URL, help="image URL with {s} for the signature and {s[a:b]} for slices")
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--rate", type=float, default=20.0, help="requests per second at most, all connections together (0: no limit)")
    p.add_argument("--retries", type=int, default=5)
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    p.add_argument("--max-failure-rate", type=float, default=0.05, help="exit 1 when more than this share of images failed")

    p = command("run", cmd_run, "the whole pipeline: features, every variant, baselines, one results table")
    backbone_flags(p)
    p.add_argument("--out", type=Path, default=Path("out"), help="where runs and results go (default: ./out)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--seeds", type=int, default=1, help="train each variant with this many seeds")
    p.add_argument("--epochs", type=int)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("interrupted: finished work is kept; run the same command again to resume", file=sys.stderr)
        return 130
    except (ValueError, KeyError, OSError) as err:
        print(f"ctl {args.command}: error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
