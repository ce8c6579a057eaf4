"""Backbone features for image regions, computed once and cached on disk.

Cache layout, under ``cache_dir``::

    {backbone name}-{backbone key}/        one folder per backbone key: hash(name, weights_id, image size,
                                           mean/std, PREPROCESS_VERSION)
        shard-{hash of its item keys}.npz  keys (n,) item keys; global_ (n, global_dim) float16;
                                           local (n, h, w, local_dim) float16 if extracted with_local

An item key hashes the image file's bytes, the box (6 decimals) and with_local, so an edited image, another
backbone, other weights or other preprocessing never reuse stale rows. Shards are written atomically, one per
batch, and the index is rebuilt from them at every call: an interrupted extraction resumes where it stopped.
Rows of images that cannot be read are zero, flagged in ``ok`` and explained in ``failed``; they are never cached.
"""

from __future__ import annotations

import functools
import hashlib
import json
import warnings
import zipfile
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ctl.backbones import PREPROCESS_VERSION, Backbone, preprocess
from ctl.config import FeatureConfig
from ctl.data import Dataset, Query
from ctl.images import Box, ImageError, ImageRef, load_region
from ctl.io import atomic_path

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class FeatureSet:
    global_: np.ndarray  # (N, global_dim) float16, row i for refs[i]
    local: np.ndarray | None  # (N, h, w, local_dim) float16, channels last; None unless with_local
    ok: np.ndarray  # (N,) bool: False where the image could not be read (the row is zeros)
    failed: dict[ImageRef, str]  # unreadable ref -> reason, naming the file


def cache_folder(backbone: Backbone, cache_dir: str | Path, image_size: int) -> Path:
    spec = [backbone.name, backbone.weights_id, image_size, backbone.mean, backbone.std, PREPROCESS_VERSION]
    key = hashlib.blake2b(json.dumps(spec).encode(), digest_size=8).hexdigest()
    return Path(cache_dir).expanduser() / f"{backbone.name}-{key}"


def extract_features(
    backbone: Backbone,
    refs: Sequence[ImageRef],
    *,
    cache_dir: str | Path,
    image_size: int = 224,
    batch_size: int = 32,
    num_workers: int = 2,
    with_local: bool,
    progress: bool = True,
) -> FeatureSet:
    """Features of ``refs`` (rows aligned with them), computing only what the cache lacks."""
    folder = cache_folder(backbone, cache_dir, image_size)
    side = backbone.local_size(image_size)
    result = FeatureSet(
        global_=np.zeros((len(refs), backbone.global_dim), np.float16),
        local=np.zeros((len(refs), side, side, backbone.local_dim), np.float16) if with_local else None,
        ok=np.zeros(len(refs), bool),
        failed={},
    )
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        paths = list(dict.fromkeys(ref.path for ref in refs))
        digests = dict(zip(paths, pool.map(_file_digest, paths)))
        rows: dict[str, list[int]] = defaultdict(list)  # item key -> rows of refs (a region may repeat)
        for i, ref in enumerate(refs):
            digest = digests[ref.path]
            if isinstance(digest, ImageError):
                result.failed[ref] = str(digest)
                continue
            key = _item_key(digest, ref.box, with_local)
            rows[key].append(i)

        for keys, arrays in _cached(folder, rows, with_local):
            _fill(result, [rows[k] for k in keys], arrays)

        todo = [(key, refs[rows[key][0]]) for key in rows if not result.ok[rows[key][0]]]
        load = functools.partial(_load, size=image_size, mean=backbone.mean, std=backbone.std)
        bar = tqdm(total=len(todo), unit="img", desc=f"{backbone.name} features", disable=not (progress and todo))
        with bar:
            for batch in _batches(_bounded_map(pool, load, todo, 2 * batch_size), batch_size):
                good = []
                for key, x in batch:
                    if isinstance(x, str):
                        result.failed.update((refs[i], x) for i in rows[key])
                    else:
                        good.append((key, x))
                if good:
                    keys = [key for key, _ in good]
                    arrays = _forward(backbone, torch.stack([x for _, x in good]), with_local)
                    _write_shard(folder, keys, arrays)
                    _fill(result, [rows[k] for k in keys], arrays)
                bar.update(len(batch))
    return result


@dataclass
class DatasetFeatures:
    """Backbone features of a dataset: every catalog product, and the context crop of every query."""

    backbone: dict  # name, weights_id, global_dim, local_dim, grid: what a trained run must match
    product_index: dict[str, int]
    product_global: np.ndarray  # (P, global_dim) float16
    scene_index: dict[tuple[str, Box], int]  # (scene, crop) -> row
    scene_global: np.ndarray  # (S, global_dim) float16
    scene_local: np.ndarray  # (S, H, W, local_dim) float16

    def has_scene(self, query: Query) -> bool:
        return (query.scene, query.crop) in self.scene_index

    def scene_row(self, query: Query) -> int:
        return self.scene_index[(query.scene, query.crop)]

    def scene_tensors(self, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (B, global_dim) global vectors and (B, H*W, local_dim) region vectors."""
        local = torch.from_numpy(self.scene_local[rows]).float()
        return torch.from_numpy(self.scene_global[rows]).float(), local.flatten(1, 2)


def encode_dataset(dataset: Dataset, backbone: Backbone, cfg: FeatureConfig, queries: Sequence[Query] | None = None, progress: bool = True) -> DatasetFeatures:
    """Features of the whole catalog and of the queries' scene crops (all queries by default).

    Images that cannot be read are dropped from the dataset and reported in its SkipReport."""
    options = dict(cache_dir=cfg.cache_dir, image_size=cfg.image_size, batch_size=cfg.batch_size, num_workers=cfg.num_workers, progress=progress)
    products = sorted(dataset.categories)
    product_features = extract_features(backbone, [ImageRef(dataset.image_path(p)) for p in products], with_local=False, **options)
    scene_keys = sorted({(q.scene, q.crop) for q in (dataset.queries if queries is None else queries)})
    scene_refs = [ImageRef(dataset.image_path(scene), crop) for scene, crop in scene_keys]
    scene_features = extract_features(backbone, scene_refs, with_local=True, **options)
    dataset.discard({**product_features.failed, **scene_features.failed})
    side = backbone.local_size(cfg.image_size)
    info = {"name": backbone.name, "weights_id": backbone.weights_id, "global_dim": backbone.global_dim, "local_dim": backbone.local_dim, "grid": [side, side]}
    return DatasetFeatures(
        backbone=info,
        product_index={p: i for i, p in enumerate(products) if product_features.ok[i]},
        product_global=product_features.global_,
        scene_index={key: i for i, key in enumerate(scene_keys) if scene_features.ok[i]},
        scene_global=scene_features.global_,
        scene_local=scene_features.local,
    )


def _file_digest(path: Path) -> str | ImageError:
    try:
        return hashlib.blake2b(Path(path).read_bytes(), digest_size=16).hexdigest()
    except OSError as err:
        return ImageError(f"{path}: cannot read ({err.strerror or err})")


def _item_key(file_digest: str, box: tuple[float, ...] | None, with_local: bool) -> str:
    box_text = "whole" if box is None else ",".join(f"{v:.6f}" for v in box)
    return hashlib.blake2b(f"{file_digest}|{box_text}|{with_local}".encode(), digest_size=16).hexdigest()


def _load(
    item: tuple[str, ImageRef], size: int, mean: Sequence[float], std: Sequence[float]
) -> tuple[str, torch.Tensor | str]:
    key, ref = item
    try:
        return key, preprocess(load_region(ref), size, mean, std)
    except ImageError as err:
        return key, str(err)
    except Image.DecompressionBombError as err:
        return key, f"{ref.path}: {err}"


def _forward(backbone: Backbone, x: torch.Tensor, with_local: bool) -> dict[str, np.ndarray]:
    with torch.inference_mode():
        global_, local = backbone(x.contiguous(memory_format=torch.channels_last))
    arrays = {"global_": global_.to(torch.float16).numpy()}
    if with_local:
        arrays["local"] = local.permute(0, 2, 3, 1).to(torch.float16).numpy()
    return arrays


def _fill(result: FeatureSet, targets: list[list[int]], arrays: Mapping[str, np.ndarray]) -> None:
    """Copy row j of ``arrays`` (a shard's or a fresh batch's) into the result rows ``targets[j]``."""
    for j, dest in enumerate(targets):
        result.global_[dest] = arrays["global_"][j]
        if result.local is not None:
            result.local[dest] = arrays["local"][j]
        result.ok[dest] = True


def _write_shard(folder: Path, keys: list[str], arrays: dict[str, np.ndarray]) -> None:
    name = hashlib.blake2b("".join(keys).encode(), digest_size=8).hexdigest()
    with atomic_path(folder / f"shard-{name}.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, keys=np.array(keys), **arrays)


def _cached(
    folder: Path, wanted: Iterable[str], with_local: bool
) -> Iterator[tuple[list[str], dict[str, np.ndarray]]]:
    """For each shard holding wanted keys: those keys and their rows' arrays."""
    wanted = set(wanted)
    members = ["global_", "local"] if with_local else ["global_"]
    for path in sorted(folder.glob("shard-*.npz")):
        try:
            with np.load(path) as shard:
                hits = [(row, str(k)) for row, k in enumerate(shard["keys"]) if k in wanted]
                if not hits:
                    continue
                rows = [row for row, _ in hits]
                arrays = {m: shard[m][rows] for m in members}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            warnings.warn(f"{path}: unreadable feature shard, its rows are computed again ({err})", stacklevel=3)
            continue
        keys = [k for _, k in hits]
        wanted.difference_update(keys)
        yield keys, arrays


def _bounded_map(pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T], ahead: int) -> Iterator[R]:
    """pool.map in order, with at most ``ahead`` results waiting, so decoded images never pile up in memory."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) > ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
