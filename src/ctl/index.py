"""A catalog index: every product embedded once, searched per category, ranked by the full distance d.

An index folder holds ``manifest.json`` (which run and backbone made it, and per category the FAISS
structure used) and ``catalog-XXXX.npz`` (per category: product ids, image paths, embeddings ``f_p``
as float32, a live mask and the serialized FAISS index). ``save`` writes a new data file, then the
manifest that names it, then deletes the old one: a reader, or a save killed midway, always sees
one consistent generation.

Ranking is two-stage. Stage one asks FAISS for ``candidates`` products of the category by global
distance ``d_g = 2 - 2 <f_s, f_p>``; stage two re-ranks them by the full distance
``d = offset - 2 <q, f_p>`` (global plus the category-steered local term) from the stored ``f_p``.
Because d is affine in ``f_p``, searching a flat index with ``q`` itself (``first_stage="query"``)
is the exhaustive ranking by d; stage one by ``f_s`` is what the global term alone can index.

Per category the structure is exact (``flat``) up to :data:`AUTO_FLAT_MAX` products and IVF above
(``kind="auto"``), or the kind asked for. Products are added and removed without rebuilding: a
removed product's slot is masked out of every search (FAISS's HNSW cannot delete), and a category
whose dead slots outnumber its live ones is compacted when saved.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from PIL import Image

from ctl.backbones import Backbone
from ctl.data import Dataset
from ctl.images import Box
from ctl.io import atomic_path, write_text_atomic
from ctl.recommend import Recommendation, SceneQuery, embed_products, embed_scene
from ctl.train import Run

FORMAT = 1
KINDS = ("auto", "flat", "ivf", "hnsw")
AUTO_FLAT_MAX = 50_000  # products per category searched exactly with kind="auto"
DEFAULT_CANDIDATES = 200  # stage-one candidates; measured on STL-Fashion in docs/serving.md
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 128
IVF_POINTS_PER_LIST = 39  # FAISS warns when k-means has fewer training points per centroid
IVF_TRAIN_POINTS_PER_LIST = 64  # k-means trains on a sample of this many points per list (FAISS: 256)


class IndexMismatch(ValueError):
    """An index folder that cannot be used with the given run, or cannot be read."""


def run_identity(run: Run) -> dict:
    """What an index must match: the backbone, its weights, the image size and the model's weights."""
    digest = hashlib.blake2b(digest_size=16)
    for key, value in sorted(run.model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return {
        "path": str(Path(run.path).resolve()),
        "variant": run.model.variant,
        "backbone": run.backbone["name"],
        "weights_id": run.backbone["weights_id"],
        "image_size": run.config.features.image_size,
        "model": digest.hexdigest(),
    }


@dataclass(frozen=True)
class Hit:
    product: str
    category: str
    distance: float  # the full distance d


class _Shelf:
    """One category: rows (slots) of ids, image paths and f_p, and a FAISS index labelled by slot.

    f_p and the live mask sit in buffers that grow by doubling, so adding one product is not a copy of all."""

    def __init__(self, kind: str, dim: int):
        self.kind = kind
        self.ids: list[str] = []
        self.images: list[str] = []
        self._vectors = np.zeros((0, dim), np.float32)
        self._alive = np.zeros(0, bool)
        self.live = 0
        self.index: faiss.Index | None = None  # made by the first add (IVF trains on it)

    @property
    def vectors(self) -> np.ndarray:
        return self._vectors[: len(self.ids)]

    @property
    def alive(self) -> np.ndarray:
        return self._alive[: len(self.ids)]

    def fill(self, ids: list[str], images: list[str], vectors: np.ndarray, alive: np.ndarray, index: faiss.Index) -> None:
        self.ids, self.images, self._vectors, self._alive, self.index = ids, images, vectors, alive, index
        self.live = int(alive.sum())

    def add(self, ids: Sequence[str], images: Sequence[str], vectors: np.ndarray) -> range:
        """Append rows; returns their slots."""
        if self.index is None:
            self.index = _new_index(self.kind, vectors)
        used = len(self.ids)
        self._vectors = _append(self._vectors, used, vectors)
        self._alive = _append(self._alive, used, np.ones(len(ids), bool))
        self.ids += ids
        self.images += images
        self.live += len(ids)
        self.index.add(vectors)  # FAISS labels rows in the order added: label == slot
        return range(used, used + len(ids))

    def remove(self, slot: int) -> None:
        self._alive[slot] = False
        self.live -= 1

    def compact(self) -> dict[str, int]:
        """Drop dead slots and refill the FAISS index (an IVF keeps its trained centroids); new slot of each id."""
        keep = np.flatnonzero(self.alive)
        vectors = self.vectors[keep]
        self.index.reset()
        self.index.add(vectors)
        self.fill([self.ids[i] for i in keep], [self.images[i] for i in keep], vectors, np.ones(len(keep), bool), self.index)
        return {product: slot for slot, product in enumerate(self.ids)}

    def candidates(self, probe: np.ndarray, count: int) -> np.ndarray:
        """Slots of up to ``count`` live products with the largest inner product with ``probe``."""
        count = min(count, self.live)
        if count == 0:
            return np.zeros(0, np.int64)
        if count == self.live and self.kind == "flat":
            return np.flatnonzero(self.alive)  # every live product: no search needed
        if self.kind == "ivf":
            params = faiss.SearchParametersIVF(nprobe=ivf_nprobe(faiss.extract_index_ivf(self.index).nlist))
        elif self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=max(HNSW_EF_SEARCH, count))
        else:
            params = faiss.SearchParameters()
        if self.live < self.alive.size:  # removed products are masked out
            bitmap = np.packbits(self.alive, bitorder="little")  # must outlive the search
            params.sel = faiss.IDSelectorBitmap(self.alive.size, faiss.swig_ptr(bitmap))
        _, labels = self.index.search(probe[None], count, params=params)
        return labels[0][labels[0] >= 0]


def _append(buffer: np.ndarray, used: int, rows: np.ndarray) -> np.ndarray:
    """``buffer`` with ``rows`` written after its first ``used`` rows, grown (doubled) if it is too small."""
    if used + len(rows) > len(buffer):
        grown = np.zeros((max(2 * len(buffer), used + len(rows)), *buffer.shape[1:]), buffer.dtype)
        grown[:used] = buffer[:used]
        buffer = grown
    buffer[used : used + len(rows)] = rows
    return buffer


def ivf_nlist(count: int) -> int:
    return max(1, min(int(4 * math.sqrt(count)), count // IVF_POINTS_PER_LIST))


def ivf_nprobe(nlist: int) -> int:
    return max(1, min(nlist, nlist // 16))


def _new_index(kind: str, vectors: np.ndarray) -> faiss.Index:
    dim = vectors.shape[1]
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        return index
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, ivf_nlist(len(vectors)), faiss.METRIC_INNER_PRODUCT)
    index.cp.max_points_per_centroid = IVF_TRAIN_POINTS_PER_LIST
    index.train(vectors)
    return index


class CatalogIndex:
    """Catalog products per category, searchable by scene; tied to the run whose model embedded them."""

    def __init__(self, path: str | Path, run: dict, offset: float, global_weight: float, dim: int, kind: str = "auto"):
        if kind not in KINDS:
            raise ValueError(f"index kind {kind!r}: choose one of {', '.join(KINDS)}")
        self.path = Path(path)
        self.run, self.offset, self.global_weight, self.dim, self.kind = run, offset, global_weight, dim, kind
        self.shelves: dict[str, _Shelf] = {}
        self.where: dict[str, tuple[str, int]] = {}  # product id -> (category, slot) of its live row
        self._lock = threading.Lock()  # add / remove / save against each other; searches only read

    @classmethod
    def for_run(cls, path: str | Path, run: Run, kind: str = "auto") -> CatalogIndex:
        """An empty index for ``run``'s model."""
        w_g, w_l = run.model.weights
        dim = run.model.category.weight.shape[1]
        return cls(path, run_identity(run), 2.0 * (w_g + w_l), w_g, dim, kind)

    # --- contents ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.where)

    def __contains__(self, product: object) -> bool:
        return product in self.where

    @property
    def categories(self) -> dict[str, int]:
        """Category -> live products, for categories that have any."""
        return {name: shelf.live for name, shelf in sorted(self.shelves.items()) if shelf.live}

    def image_path(self, product: str) -> Path:
        category, slot = self._locate(product)
        return Path(self.shelves[category].images[slot])

    def _locate(self, product: str) -> tuple[str, int]:
        if product not in self.where:
            raise KeyError(f"product {product!r} is not in the catalog index {self.path}")
        return self.where[product]

    def check_category(self, category: str) -> None:
        if category not in self.categories:
            raise KeyError(f"unknown category {category!r}; known: {', '.join(self.categories)}")

    def add(self, ids: Sequence[str], categories: Sequence[str], images: Sequence[str | Path], embeddings: np.ndarray) -> None:
        """Add products (or replace those already in), given their embeddings f_p (n, dim)."""
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if not len(ids) == len(categories) == len(images) == len(embeddings) or embeddings.shape[1:] != (self.dim,):
            raise ValueError(f"add: {len(ids)} ids, {len(categories)} categories, {len(images)} images and embeddings of shape {embeddings.shape}; expected one each and dim {self.dim}")
        if len(set(ids)) != len(ids):
            raise ValueError("add: the same product id twice")
        with self._lock:
            self._remove(p for p in ids if p in self.where)
            for category in sorted(set(categories)):
                rows = [i for i, c in enumerate(categories) if c == category]
                shelf = self.shelves.get(category)
                if shelf is None:
                    kind = self.kind if self.kind != "auto" else "flat" if len(rows) <= AUTO_FLAT_MAX else "ivf"
                    shelf = self.shelves[category] = _Shelf(kind, self.dim)
                slots = shelf.add([ids[i] for i in rows], [str(images[i]) for i in rows], embeddings[rows])
                self.where.update((ids[i], (category, int(slot))) for i, slot in zip(rows, slots))

    def remove(self, ids: Iterable[str]) -> None:
        ids = list(ids)
        unknown = [p for p in ids if p not in self.where]
        if unknown:
            raise KeyError(f"not in the catalog index: {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
        with self._lock:
            self._remove(ids)

    def _remove(self, ids: Iterable[str]) -> None:
        for product in ids:
            category, slot = self.where.pop(product)
            self.shelves[category].remove(slot)

    # --- search -----------------------------------------------------------------------------------

    def search(self, scene: SceneQuery, category: str, k: int, candidates: int = DEFAULT_CANDIDATES, first_stage: str = "global") -> list[Hit]:
        """The k products of ``category`` nearest the scene by d, nearest first.

        first_stage: "global" takes ``candidates`` products by global distance (f_s) from the index and
        re-ranks them by d; "query" takes them by d itself (exact with a flat index). A run without a
        global term (the local variant) has no global distance to search by, so it always uses "query".
        """
        if first_stage not in ("global", "query"):
            raise ValueError(f"first_stage={first_stage!r}: 'global' or 'query'")
        self.check_category(category)
        shelf = self.shelves[category]
        q = scene.vector.detach().cpu().numpy().astype(np.float32)
        probe = scene.global_ if first_stage == "global" and self.global_weight else scene.vector
        slots = shelf.candidates(probe.detach().cpu().numpy().astype(np.float32), max(k, candidates))
        distances = self.offset - 2.0 * (shelf.vectors[slots] @ q)
        order = np.argsort(distances, kind="stable")[:k]
        return [Hit(shelf.ids[slots[i]], category, float(distances[i])) for i in order]

    # --- persistence ------------------------------------------------------------------------------

    def save(self) -> Path:
        with self._lock:
            for category, shelf in self.shelves.items():
                if shelf.alive.size - shelf.live > shelf.live:
                    self.where.update((p, (category, s)) for p, s in shelf.compact().items())
            data = f"catalog-{secrets.token_hex(8)}.npz"
            arrays, shelves = {}, {}
            for number, (category, shelf) in enumerate(sorted(self.shelves.items())):
                key = f"c{number}"
                arrays[f"{key}_ids"] = np.array(shelf.ids, dtype=str)
                arrays[f"{key}_images"] = np.array(shelf.images, dtype=str)
                arrays[f"{key}_vectors"] = shelf.vectors
                arrays[f"{key}_alive"] = shelf.alive
                arrays[f"{key}_faiss"] = faiss.serialize_index(shelf.index)
                shelves[category] = {"key": key, "kind": shelf.kind, "products": shelf.live, "slots": int(shelf.alive.size)}
            with atomic_path(self.path / data) as tmp, open(tmp, "wb") as f:
                np.savez(f, **arrays)
            manifest = {
                "format": FORMAT,
                "run": self.run,
                "offset": self.offset,
                "global_weight": self.global_weight,
                "dim": self.dim,
                "kind": self.kind,
                "data": data,
                "products": len(self.where),
                "categories": shelves,
            }
            write_text_atomic(self.path / "manifest.json", json.dumps(manifest, indent=2) + "\n")
            for old in self.path.glob("catalog-*.npz"):
                if old.name != data:
                    old.unlink(missing_ok=True)
        return self.path

    @classmethod
    def load(cls, path: str | Path, run: Run) -> CatalogIndex:
        """Open an index folder, refusing one made with another run or backbone."""
        path = Path(path)
        try:
            manifest = json.loads((path / "manifest.json").read_text())
        except FileNotFoundError:
            raise IndexMismatch(f"{path}: no catalog index here (no manifest.json); make one: ctl index --run RUN --out {path}") from None
        except (OSError, json.JSONDecodeError) as err:
            raise IndexMismatch(f"{path}/manifest.json: unreadable ({err})") from err
        if manifest.get("format") != FORMAT:
            raise IndexMismatch(f"{path}: index format {manifest.get('format')}, this version reads {FORMAT}; rebuild it with ctl index")
        _check_identity(path, manifest["run"], run_identity(run), run.path)
        index = cls(path, manifest["run"], manifest["offset"], manifest["global_weight"], manifest["dim"], manifest["kind"])
        with np.load(path / manifest["data"]) as arrays:
            for category, meta in manifest["categories"].items():
                key = meta["key"]
                shelf = _Shelf(meta["kind"], index.dim)
                shelf.fill(
                    arrays[f"{key}_ids"].tolist(),
                    arrays[f"{key}_images"].tolist(),
                    arrays[f"{key}_vectors"],
                    arrays[f"{key}_alive"],
                    faiss.deserialize_index(arrays[f"{key}_faiss"]),
                )
                index.shelves[category] = shelf
                index.where.update((shelf.ids[s], (category, int(s))) for s in np.flatnonzero(shelf.alive))
        return index


def _check_identity(path: Path, made_by: dict, current: dict, run_path: Path) -> None:
    if (made_by["backbone"], made_by["weights_id"], made_by["image_size"]) != (current["backbone"], current["weights_id"], current["image_size"]):
        raise IndexMismatch(
            f"{path}: made with backbone {made_by['backbone']} (weights {made_by['weights_id']}, {made_by['image_size']} px), "
            f"but run {run_path} uses {current['backbone']} (weights {current['weights_id']}, {current['image_size']} px); "
            f"make an index for this run: ctl index --run {run_path} --out DIR"
        )
    if made_by["model"] != current["model"]:
        raise IndexMismatch(
            f"{path}: made with the model of run {made_by['path']} ({made_by['model']}), not with run {run_path}'s "
            f"({current['model']}); make an index for this run: ctl index --run {run_path} --out DIR"
        )


@dataclass
class BuildReport:
    added: int
    removed: int
    left_out: dict[Path, str]  # product image -> why the product is not indexed (unreadable, unknown category)


def build_index(
    path: str | Path, run: Run, backbone: Backbone, dataset: Dataset, kind: str | None = None, rebuild: bool = False, progress: bool = True
) -> tuple[CatalogIndex, BuildReport]:
    """Index the dataset's catalog at ``path`` and save it.

    An index already there (made by this run) is brought up to date instead: the products it lacks are
    added and those no longer in the catalog removed; the rest are not embedded again. ``rebuild``
    starts afresh; ``kind`` (default "auto") applies to a new index only.
    """
    path = Path(path)
    if (path / "manifest.json").exists() and not rebuild:
        index = CatalogIndex.load(path, run)
        if kind not in (None, index.kind):
            raise ValueError(f"{path}: an index of kind {index.kind!r}; to make it {kind!r}, rebuild it (ctl index --rebuild)")
    else:
        index = CatalogIndex.for_run(path, run, kind or "auto")
    known = set(run.model.category.categories)  # a category the model has no e_c for cannot be queried
    gone = [p for p in index.where if p not in dataset.categories]
    new = [p for p in sorted(dataset.categories) if p not in index]
    left_out = {dataset.image_path(p): f"category {dataset.categories[p]!r} unknown to the run" for p in new if dataset.categories[p] not in known}
    new = [p for p in new if dataset.categories[p] in known]
    index.remove(gone)
    added = 0
    if new:
        images = [dataset.image_path(p) for p in new]
        embeddings, failed = embed_products(run, backbone, images, progress)
        keep = [i for i, image in enumerate(images) if image not in failed]
        index.add([new[i] for i in keep], [dataset.categories[new[i]] for i in keep], [images[i] for i in keep], embeddings[keep])
        left_out.update(failed)
        added = len(keep)
    index.save()
    return index, BuildReport(added, len(gone), left_out)


class IndexedRecommender:
    """Recommendations from a catalog index: the scene is embedded by the run, products come from the index."""

    def __init__(self, run: Run, backbone: Backbone, index: CatalogIndex, candidates: int = DEFAULT_CANDIDATES):
        self.run, self.backbone, self.index, self.candidates = run, backbone, index, candidates

    def recommend(self, image: Image.Image, box: Box | None, category: str, k: int = 10) -> Recommendation:
        if k < 1:
            raise ValueError(f"k={k}: ask for at least one product")
        self.index.check_category(category)
        scene = embed_scene(self.run, self.backbone, image, box, category)
        hits = self.index.search(scene, category, k, self.candidates)
        return Recommendation([(hit.product, hit.distance) for hit in hits], scene)
