"""Serving benchmarks: two-stage overlap on real scenes, HTTP latency on loopback, and a one-million-product index.

    python benchmarks/bench_serve.py overlap --run RUN --index DIR [--data DIR]
    python benchmarks/bench_serve.py latency --run RUN --index DIR [--data DIR] [--requests 200]
    python benchmarks/bench_serve.py million [--products 1000000] [--kinds ivf hnsw]

overlap: for every test-split query of the dataset, the two-stage top-k (stage one by global distance, C
candidates, re-ranked by d) against the exhaustive top-k by d over the whole category (ctl.recommend).
latency: starts ``ctl serve`` on 127.0.0.1 and posts real test scenes to /v1/recommend, one client and then
several at once. million: a generated catalog of clustered unit vectors in one category, searched with the
approximate index and with exact search; recall at k is against exact search.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import httpx
import numpy as np
import torch

from ctl.data import Query, load_dataset
from ctl.images import load_image
from ctl.index import DEFAULT_CANDIDATES, CatalogIndex
from ctl.recommend import Recommender, SceneQuery, embed_scene, load_backbone
from ctl.train import load_run


def test_queries(run, data: Path | None) -> tuple[object, list[Query]]:
    dataset = load_dataset(data or run.config.data.root, run.config.data.domain, run.config.data.min_crop_px)
    return dataset, dataset.split(run.config.data.split, run.config.data.seed)["test"]


def overlap(args: argparse.Namespace) -> None:
    run = load_run(args.run)
    index = CatalogIndex.load(args.index, run)
    dataset, queries = test_queries(run, args.data)
    backbone = load_backbone(run)
    exhaustive = Recommender.from_dataset(run, dataset, progress=False)
    shares: dict[tuple[str, int], list[float]] = {}
    seconds: dict[tuple[str, int], list[float]] = {}
    stages = [("global", c) for c in args.candidates] + [("query", args.k)]
    for query in queries:
        scene = embed_scene(run, backbone, load_image(dataset.image_path(query.scene)), query.bbox, query.category)
        rows = exhaustive.rows[query.category]
        d = run.model.distance_matrix(scene.vector[None], exhaustive.embeddings[rows])[0].numpy()
        truth = {exhaustive.products[rows[i]] for i in np.argsort(d, kind="stable")[: args.k]}
        for stage in stages:
            started = time.perf_counter()
            hits = index.search(scene, query.category, args.k, candidates=stage[1], first_stage=stage[0])
            seconds.setdefault(stage, []).append(time.perf_counter() - started)
            shares.setdefault(stage, []).append(len({h.product for h in hits} & truth) / min(args.k, len(rows)))
    sizes = index.categories
    print(f"{len(queries)} test queries; catalog {len(index)} products, {min(sizes.values())}-{max(sizes.values())} per category")
    print(f"\n| first stage | candidates C | overlap@{args.k} mean | min | queries with full overlap | search ms (mean) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for stage in stages:
        values = np.array(shares[stage])
        default = " (default)" if stage == ("global", DEFAULT_CANDIDATES) else ""
        print(f"| {stage[0]} | {stage[1]}{default} | {values.mean():.3f} | {values.min():.1f} | {(values == 1).mean():.1%} | {1000 * np.mean(seconds[stage]):.2f} |")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def latency(args: argparse.Namespace) -> None:
    run = load_run(args.run)
    _, queries = test_queries(run, args.data)
    dataset_root = Path(args.data or run.config.data.root).expanduser()
    scenes = [((dataset_root / "images" / f"{q.scene}.jpg").read_bytes(), q) for q in queries[: args.scenes]]
    port = free_port()
    command = [sys.executable, "-m", "ctl.cli", "serve", "--run", str(args.run), "--index", str(args.index), "--port", str(port), "--examples", "0"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                health = httpx.get(f"{url}/v1/health").json()
                break
            except httpx.TransportError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the server did not start: {server.stderr.read().decode()[-2000:]}") from None
                time.sleep(0.5)
        print(f"serving {health['products']} products ({health['variant']}, {health['backbone']}); {os.cpu_count()} CPUs; k={args.k}")
        print("\n| clients | requests | p50 ms | p99 ms | requests/s |")
        print("| --- | --- | --- | --- | --- |")
        load(url, scenes, 10, 1, args.k)  # warm-up
        for clients in args.clients:
            times, wall = load(url, scenes, args.requests, clients, args.k)
            print(f"| {clients} | {len(times)} | {1000 * np.percentile(times, 50):.0f} | {1000 * np.percentile(times, 99):.0f} | {len(times) / wall:.1f} |")
    finally:
        server.terminate()
        server.wait(10)


def load(url: str, scenes: list[tuple[bytes, Query]], requests: int, clients: int, k: int) -> tuple[list[float], float]:
    """Post ``requests`` recommendations from ``clients`` threads, each with its own connection: latencies, wall time."""
    counter = iter(range(requests))
    lock = threading.Lock()
    times: list[float] = []

    def client(_: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            while (n := next_number()) is not None:
                started = time.perf_counter()
                post(http, scenes[n % len(scenes)], k)
                with lock:
                    times.append(time.perf_counter() - started)

    def next_number() -> int | None:
        with lock:
            return next(counter, None)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return times, time.perf_counter() - started


def post(http: httpx.Client, scene: tuple[bytes, Query], k: int) -> None:
    image, query = scene
    response = http.post("/v1/recommend", files={"image": ("scene.jpg", image, "image/jpeg")},
                         data={"category": query.category, "k": str(k), "box": ",".join(map(str, query.bbox))})
    response.raise_for_status()


def clustered(count: int, dim: int, centres: np.ndarray, rng: np.random.Generator, spread: float) -> np.ndarray:
    x = centres[rng.integers(len(centres), size=count)] + spread * rng.standard_normal((count, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def million(args: argparse.Namespace) -> None:
    faiss.omp_set_num_threads(1)  # as in the server: one query per search
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((args.clusters, args.dim), dtype=np.float32)
    vectors = clustered(args.products, args.dim, centres, rng, args.spread)
    queries = clustered(args.queries, args.dim, centres, rng, args.spread)
    ids = [f"p{i}" for i in range(args.products)]
    identity = {"path": "", "variant": "full", "backbone": "generated", "weights_id": "", "image_size": 0, "model": ""}
    print(f"{args.products} generated products ({args.clusters} clusters, {args.dim}-d, float32), {args.queries} queries; "
          f"{os.cpu_count()} CPUs, FAISS {faiss.__version__}, one thread per query")
    results, truth = {}, None
    for kind in ["flat", *args.kinds]:
        before = rss_mb()
        started = time.perf_counter()
        index = CatalogIndex(Path("."), identity, offset=2.0, global_weight=0.5, dim=args.dim, kind=kind)
        index.add(ids, ["c"] * args.products, [""] * args.products, vectors)
        build = time.perf_counter() - started
        shelf = index.shelves["c"]
        structure = faiss.serialize_index(shelf.index).nbytes
        found, seconds = [], []
        for q in queries:
            scene = SceneQuery(None, torch.from_numpy(q), None, torch.from_numpy(q))
            started = time.perf_counter()
            hits = index.search(scene, "c", args.k, candidates=args.k, first_stage="query")
            seconds.append(time.perf_counter() - started)
            found.append({h.product for h in hits})
        truth = truth or found
        recall = np.mean([len(f & t) / args.k for f, t in zip(found, truth)])
        results[kind] = (build, structure, rss_mb() - before, seconds, recall)
        del index, shelf
    print(f"\n| index | build s | FAISS structure MB | process memory added MB | query ms p50 | p99 | recall@{args.k} |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for kind, (build, structure, added, seconds, recall) in results.items():
        print(f"| {kind} | {build:.0f} | {structure / 2**20:.0f} | {added:.0f} | {1000 * np.percentile(seconds, 50):.2f} | {1000 * np.percentile(seconds, 99):.2f} | {recall:.3f} |")
    print(f"\n(process memory includes the {args.products * args.dim * 4 / 2**20:.0f} MB of f_p every index keeps for re-ranking)")


def main() -> None:
    top = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", required=True)
    for name, func in (("overlap", overlap), ("latency", latency)):
        p = sub.add_parser(name)
        p.set_defaults(func=func)
        p.add_argument("--run", type=Path, required=True)
        p.add_argument("--index", type=Path, required=True)
        p.add_argument("--data", type=Path, help="the STL folder (default: the run's dataset)")
        p.add_argument("--k", type=int, default=10)
    sub.choices["overlap"].add_argument("--candidates", type=int, nargs="+", default=[10, 20, 50, 100, 200, 400])
    sub.choices["latency"].add_argument("--requests", type=int, default=200, help="timed requests per client count")
    sub.choices["latency"].add_argument("--clients", type=int, nargs="+", default=[1, 4])
    sub.choices["latency"].add_argument("--scenes", type=int, default=50, help="distinct test scenes to cycle through")
    p = sub.add_parser("million")
    p.set_defaults(func=million)
    p.add_argument("--products", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--spread", type=float, default=0.5, help="noise around each cluster centre, per dimension (0.5: a product's 10th neighbour at cosine ~0.84, as in the real catalog)")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--kinds", nargs="+", choices=("ivf", "hnsw"), default=["ivf", "hnsw"])
    args = top.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
