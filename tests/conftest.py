"""Fixtures shared by several test modules."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from ctl.backbones import Backbone, create_backbone
from ctl.config import Config
from ctl.data import Dataset, load_dataset
from ctl.synthetic import generate
from ctl.train import Run, build_model, load_run, save_checkpoint


@dataclass
class CatalogRun:
    """A run folder holding an untrained (seeded) model over a small generated dataset, and its index."""

    run: Run
    backbone: Backbone
    dataset: Dataset
    index_dir: Path


@pytest.fixture(scope="session")
def catalog_run(tmp_path_factory) -> CatalogRun:
    from ctl.index import build_index

    root = tmp_path_factory.mktemp("catalog")
    dataset = load_dataset(generate(root / "data", scenes=24, products_per_category=8, categories=3))
    cfg = Config().override([
        'features.backbone="efficientnet-lite0"',
        "features.image_size=128",
        f"features.cache_dir={json.dumps(str(root / 'cache'))}",
        f"data.root={json.dumps(str(root / 'data'))}",
        "model.embed_dim=32",
        "model.hidden_dim=64",
    ])
    backbone = create_backbone("efficientnet-lite0")
    side = backbone.local_size(cfg.features.image_size)
    info = {"name": backbone.name, "weights_id": backbone.weights_id, "global_dim": backbone.global_dim,
            "local_dim": backbone.local_dim, "grid": [side, side]}
    torch.manual_seed(0)
    model = build_model(cfg, info, dataset.category_names)
    run_dir = root / "run"
    cfg.save(run_dir / "config.json")
    (run_dir / "backbone.json").write_text(json.dumps(info))
    (run_dir / "categories.json").write_text(json.dumps(dataset.category_names))
    save_checkpoint(run_dir / "best.pt", {"model": model.state_dict()})
    run = load_run(run_dir)
    build_index(root / "index", run, backbone, dataset, progress=False)
    return CatalogRun(run, backbone, dataset, root / "index")


@pytest.fixture(scope="session")
def live_server():
    """A context manager: ``with live_server(app) as url`` serves the app for the block."""
    return _live_server


@contextlib.contextmanager
def _live_server(app) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yields its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@dataclass
class Prepared:
    """A generated dataset with its backbone features, ready for training."""

    cfg: Config
    dataset: Dataset
    features: object  # ctl.features.DatasetFeatures


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Prepared:
    from ctl.pipeline import prepare

    root = tmp_path_factory.mktemp("prepared")
    generate(root / "data", scenes=160, products_per_category=15, categories=3)
    cfg = Config().override([
        f"data.root={json.dumps(str(root / 'data'))}",
        'features.backbone="efficientnet-lite0"',
        "features.image_size=128",
        f"features.cache_dir={json.dumps(str(root / 'cache'))}",
        "train.epochs=12",
        "train.batch_size=64",
    ])
    dataset, features = prepare(cfg, progress=False)
    return Prepared(cfg, dataset, features)
