"""The HTTP API and the web page: ``create_app(recommender)`` is a FastAPI app, ``ctl serve`` runs it on uvicorn.

    POST /v1/recommend                 multipart: image (file), category, k (1..max_k), box "l,t,r,b" (optional)
    GET  /v1/categories                categories with their product counts
    GET  /v1/products/{id}/image       a catalog product's image (looked up in the index, never a path)
    GET  /v1/attention/{key}.png       the attention map of a recent recommendation
    GET  /v1/examples                  example scenes for the page; /v1/examples/{n}/image
    GET  /v1/health                    liveness and what is served
    GET  /                             the web page;  /docs  the OpenAPI page

Every refusal is a 4xx with ``{"detail": message}`` naming what was wrong. Attention maps live in a
bounded in-memory LRU, so run one server process (one uvicorn worker) per catalog.
"""

from __future__ import annotations

import io
import itertools
import secrets
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import faiss
import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path
from PIL import Image, UnidentifiedImageError

from ctl.config import DataConfig
from ctl.data import Dataset, Query, validate_box
from ctl.images import Box, ImageError, decode_image
from ctl.index import IndexedRecommender
from ctl.visualize import attention_overlay

WEB = Path(__file__).parent / "web"
MAX_UPLOAD_BYTES = 10 * 2**20
MAX_PIXELS = 40_000_000  # a 10 MB PNG can hold a huge blank image; refuse it before decoding
MAX_K = 100
FORM_OVERHEAD = 64 * 2**10  # multipart boundaries and the other fields, on top of the image


@dataclass(frozen=True)
class Example:
    """A scene offered on the page, with a box and category to start from."""

    name: str
    image: Path
    category: str
    box: Box | None


def pick_examples(dataset: Dataset, categories: Sequence[str], count: int, data: DataConfig) -> list[Example]:
    """Up to ``count`` test-split scenes, each scene once, taking the categories in turn."""
    queues: dict[str, list[Query]] = {c: [] for c in sorted(categories)}
    for query in dataset.split(data.split, data.seed)["test"]:
        queues.get(query.category, []).append(query)
    examples, scenes = [], set()
    for turn in itertools.zip_longest(*queues.values()):
        for query in turn:
            if query is not None and query.scene not in scenes and len(examples) < count:
                scenes.add(query.scene)
                examples.append(Example(query.scene, dataset.image_path(query.scene), query.category, query.bbox))
    return examples


class AttentionMaps:
    """The last ``capacity`` (scene crop, attention) pairs, by random key; rendered to PNG when asked."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[str, tuple[Image.Image, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, crop: Image.Image, attention: np.ndarray) -> str:
        key = secrets.token_urlsafe(12)
        with self._lock:
            self._items[key] = (crop, attention)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return key

    def png(self, key: str) -> bytes | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
        if item is None:
            return None
        buffer = io.BytesIO()
        attention_overlay(*item).save(buffer, format="PNG")
        return buffer.getvalue()


class BodyLimit:
    """ASGI middleware: a POST body over ``limit`` bytes gets a 413, declared or not, before it is all read."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await JSONResponse({"detail": self.message()}, status_code=413)(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise HTTPException(413, self.message())
            return message

        await self.app(scope, counted, send)

    def message(self) -> str:
        return f"request body over {self.limit} bytes: the image upload is limited to {(self.limit - FORM_OVERHEAD) / 2**20:g} MB"


def parse_box(text: str | None) -> Box | None:
    """A box from the text "l,t,r,b" or "[l, t, r, b]", in [0, 1]; no text, no box."""
    if text is None or not text.strip():
        return None
    try:
        values: object = [float(part) for part in text.strip().strip("[]").split(",")]
    except ValueError:
        values = text  # not numbers: validate_box says so
    return validate_box(values, "box")


def read_scene(upload: UploadFile, max_bytes: int, max_pixels: int) -> Image.Image:
    name = f"image {upload.filename!r}" if upload.filename else "image"
    data = upload.file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise HTTPException(413, f"{name}: over the upload limit of {max_bytes / 2**20:g} MB")
    if not data:
        raise HTTPException(422, f"{name}: the upload is empty")
    try:
        with Image.open(io.BytesIO(data)) as header:
            width, height = header.size
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as err:
        status = 413 if isinstance(err, Image.DecompressionBombError) else 415
        raise HTTPException(status, f"{name}: not an image in a format this server reads (JPEG, PNG, WebP, ...): {err}") from None
    if width * height > max_pixels:
        raise HTTPException(413, f"{name}: {width} x {height} pixels, over the limit of {max_pixels} pixels")
    try:
        return decode_image(data, name)
    except ImageError as err:
        raise HTTPException(422, str(err)) from None


def create_app(
    recommender: IndexedRecommender,
    examples: Sequence[Example] = (),
    *,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    max_pixels: int = MAX_PIXELS,
    max_k: int = MAX_K,
    attention_capacity: int = 256,
    concurrency: int = 1,
) -> FastAPI:
    """The app; ``concurrency`` scenes go through the backbone at once (each with torch's threads: see ctl serve)."""
    index = recommender.index
    known = set(recommender.run.model.category.categories)
    categories = {c: n for c, n in index.categories.items() if c in known}  # the model needs e_c
    maps = AttentionMaps(attention_capacity)
    inference = threading.BoundedSemaphore(concurrency)

    app = FastAPI(
        title="Complete the Look",
        summary="Scene-based complementary product recommendation (Kang et al., CVPR 2019)",
        version="1",
        docs_url=None,  # served below from a local Swagger UI: FastAPI's default loads it from a CDN
    )
    app.add_middleware(BodyLimit, limit=max_upload_bytes + FORM_OVERHEAD)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        faults = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in err.errors())
        return JSONResponse({"detail": faults}, status_code=422)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(WEB / "index.html")

    app.mount("/static", StaticFiles(directory=WEB), name="static")
    app.mount("/swagger", StaticFiles(directory=swagger_ui_path), name="swagger")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url,
            title=f"{app.title} - API",
            swagger_js_url="/swagger/swagger-ui-bundle.js",
            swagger_css_url="/swagger/swagger-ui.css",
            swagger_favicon_url="/swagger/favicon-32x32.png",
        )

    @app.get("/v1/health")
    def health() -> dict:
        return {
            "status": "ok",
            "products": len(index),
            "categories": len(categories),
            "variant": index.run["variant"],
            "backbone": index.run["backbone"],
            "run": index.run["path"],
        }

    @app.get("/v1/categories")
    def list_categories() -> dict:
        return {"categories": [{"name": c, "products": n} for c, n in categories.items()]}

    @app.get("/v1/examples")
    def list_examples() -> dict:
        return {
            "examples": [
                {"name": e.name, "category": e.category, "box": e.box, "image": f"/v1/examples/{n}/image"}
                for n, e in enumerate(examples)
            ]
        }

    @app.get("/v1/examples/{number}/image")
    def example_image(number: int) -> FileResponse:
        if not 0 <= number < len(examples):
            raise HTTPException(404, f"example {number}: there are {len(examples)} examples (0..{len(examples) - 1})")
        return FileResponse(examples[number].image)

    @app.get("/v1/products/{product_id}/image")
    def product_image(product_id: str) -> FileResponse:
        try:
            path = index.image_path(product_id)  # only an id of the catalog has a path
        except KeyError:
            raise HTTPException(404, f"product {product_id!r} is not in the catalog") from None
        if not path.is_file():
            raise HTTPException(404, f"product {product_id!r}: its image is missing on the server")
        return FileResponse(path, headers={"Cache-Control": "public, max-age=86400"})

    @app.get("/v1/attention/{key}.png")
    def attention_map(key: str) -> Response:
        png = maps.png(key)
        if png is None:
            raise HTTPException(404, f"attention map {key!r} is unknown or expired (the server keeps the last {maps.capacity})")
        return Response(png, media_type="image/png")

    @app.post(
        "/v1/recommend",
        responses={413: {"description": "upload too large"}, 415: {"description": "not an image"}, 422: {"description": "bad field"}},
    )
    def recommend(
        image: UploadFile = File(description="the scene: JPEG, PNG, WebP, ..."),
        category: str = Form(description="the category of product to recommend; see /v1/categories"),
        k: str = Form("10", description=f"how many products, 1..{max_k}"),
        box: str | None = Form(None, description="the item to replace, 'left,top,right,bottom' in [0, 1]; none: the whole scene is context"),
    ) -> dict:
        if category not in categories:
            raise HTTPException(422, f"unknown category {category!r}; known: {', '.join(categories)}")
        try:
            count = int(k)
        except ValueError:
            raise HTTPException(422, f"k={k!r}: not an integer") from None
        if not 1 <= count <= max_k:
            raise HTTPException(422, f"k={count}: out of range 1..{max_k}")
        try:
            region = parse_box(box)
        except ValueError as err:
            raise HTTPException(422, str(err)) from None
        scene = read_scene(image, max_upload_bytes, max_pixels)
        # One query per search: FAISS's OpenMP threads only contend with other requests. The setting is per thread.
        faiss.omp_set_num_threads(1)
        with inference:
            result = recommender.recommend(scene, region, category, count)
        attention = result.scene.attention
        return {
            "category": category,
            "k": count,
            "box": list(region) if region else None,
            "products": [
                {"rank": rank, "id": product, "category": category, "distance": distance, "image": f"/v1/products/{quote(product, safe='')}/image"}
                for rank, (product, distance) in enumerate(result.products, 1)
            ],
            "attention": None if attention is None else f"/v1/attention/{maps.put(result.scene.crop, attention)}.png",
        }

    return app

