import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from ctl.index import CatalogIndex, IndexedRecommender
from ctl.serve import create_app, pick_examples

MAX_UPLOAD = 200_000


@pytest.fixture(scope="module")
def app(catalog_run):
    index = CatalogIndex.load(catalog_run.index_dir, catalog_run.run)
    examples = pick_examples(catalog_run.dataset, list(index.categories), 3, catalog_run.run.config.data)
    recommender = IndexedRecommender(catalog_run.run, catalog_run.backbone, index)
    return create_app(recommender, examples, max_upload_bytes=MAX_UPLOAD, max_pixels=1_000_000, attention_capacity=4)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="module")
def scene(catalog_run):
    """(JPEG bytes, box as text, category) of a dataset query."""
    query = catalog_run.dataset.queries[0]
    return catalog_run.dataset.image_path(query.scene).read_bytes(), ",".join(map(str, query.bbox)), query.category


def post(client, image: bytes, category: str, k="5", box: str | None = None, name="scene.jpg"):
    data = {"category": category, "k": k} | ({"box": box} if box is not None else {})
    return client.post("/v1/recommend", files={"image": (name, image, "image/jpeg")}, data=data)


def png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", size).save(buffer, format="PNG")
    return buffer.getvalue()


def test_health_categories_examples(client, catalog_run):
    health = client.get("/v1/health").json()
    assert health["status"] == "ok" and health["products"] == len(catalog_run.dataset.categories)
    categories = client.get("/v1/categories").json()["categories"]
    assert [c["name"] for c in categories] == catalog_run.dataset.category_names
    examples = client.get("/v1/examples").json()["examples"]
    assert 1 <= len(examples) <= 3 and len({e["name"] for e in examples}) == len(examples)
    response = client.get(examples[0]["image"])
    assert response.status_code == 200 and response.content[:2] == b"\xff\xd8"
    assert client.get("/v1/examples/99/image").status_code == 404
    docs = client.get("/docs")
    assert docs.status_code == 200 and "cdn" not in docs.text  # works offline
    assert client.get("/swagger/swagger-ui-bundle.js").status_code == 200
    assert "/v1/recommend" in client.get("/openapi.json").json()["paths"]


def test_recommend(client, scene):
    image, box, category = scene
    answer = post(client, image, category, box=box).json()
    assert answer["k"] == 5 and answer["category"] == category and len(answer["products"]) == 5
    distances = [p["distance"] for p in answer["products"]]
    assert distances == sorted(distances)
    assert [p["rank"] for p in answer["products"]] == [1, 2, 3, 4, 5]
    product = client.get(answer["products"][0]["image"])
    assert product.status_code == 200 and product.headers["content-type"] == "image/jpeg"
    attention = client.get(answer["attention"])
    assert attention.status_code == 200 and attention.content.startswith(b"\x89PNG")
    assert Image.open(io.BytesIO(attention.content)).size[0] > 0
    no_box = post(client, image, category, box=None).json()
    assert no_box["box"] is None and len(no_box["products"]) == 5
    bracketed = post(client, image, category, box=f"[{box}]").json()["products"]
    assert [p["id"] for p in bracketed] == [p["id"] for p in answer["products"]]
    assert [p["distance"] for p in bracketed] == pytest.approx(distances, abs=1e-5)


@pytest.mark.parametrize(
    ("fields", "status", "message"),
    [
        ({"category": "Nope"}, 422, "unknown category 'Nope'; known: "),
        ({"k": "0"}, 422, "k=0: out of range 1..100"),
        ({"k": "101"}, 422, "k=101: out of range 1..100"),
        ({"k": "ten"}, 422, "k='ten': not an integer"),
        ({"box": "0.2,0.2,1.5,0.9"}, 422, "outside [0, 1]"),
        ({"box": "0.5,0.2,0.5,0.9"}, 422, "is empty"),
        ({"box": "0.5,0.2"}, 422, "box must be four numbers"),
        ({"box": "a,b,c,d"}, 422, "box must be four numbers"),
        ({"image": b"just some text"}, 415, "not an image"),
        ({"image": b""}, 422, "the upload is empty"),
        ({"image": "truncated"}, 422, "not a readable image"),
        ({"image": "huge"}, 413, "over the limit of 1000000 pixels"),
        ({"image": "large"}, 413, "request body over"),
    ],
)
def test_bad_requests_get_a_4xx_naming_the_fault(client, scene, fields, status, message):
    image, box, category = scene
    image = {"truncated": image[: len(image) // 2], "huge": png((2000, 1000)), "large": b"\xff" * (MAX_UPLOAD + 70_000)}.get(
        fields.get("image"), fields.get("image", image)
    )
    args = {"category": category, "k": "5", "box": box} | {k: v for k, v in fields.items() if k != "image"}
    response = post(client, image, **args)
    assert response.status_code == status
    assert message in response.json()["detail"]
    assert post(client, scene[0], category).status_code == 200  # still serving


def test_upload_limit_without_content_length(client, scene):
    """A chunked upload (no Content-Length) is cut off once it passes the limit."""
    boundary = "x" * 16
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.jpg"\r\n\r\n'.encode()

    def body():
        yield head
        for _ in range(40):
            yield b"\xff" * 10_000

    response = client.post("/v1/recommend", content=body(), headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 413 and "request body over" in response.json()["detail"]
    assert post(client, scene[0], scene[2]).status_code == 200


def test_missing_fields_are_named(client, scene):
    response = client.post("/v1/recommend", data={"k": "3"})
    assert response.status_code == 422
    assert "image: Field required" in response.json()["detail"] and "category: Field required" in response.json()["detail"]


@pytest.mark.parametrize("path", ["nope", "..", "..%2F..%2Fetc%2Fpasswd", "../../etc/passwd", "%2Fetc%2Fpasswd", "..%5C..%5Cwin.ini"])
def test_product_image_only_from_the_catalog(client, path):
    response = client.get(f"/v1/products/{path}/image")
    assert response.status_code == 404
    assert "root:" not in response.text


def test_unknown_attention_map(client, scene):
    assert client.get("/v1/attention/nothing.png").status_code == 404
    keys = [post(client, scene[0], scene[2], box=scene[1]).json()["attention"] for _ in range(5)]
    assert client.get(keys[0]).status_code == 404  # the capacity is 4: the oldest is gone
    assert client.get(keys[-1]).status_code == 200


def test_page_is_served(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="results"' in page.text
    assert client.get("/static/app.js").status_code == 200


def test_concurrent_requests(app, scene, live_server):
    image, box, category = scene

    def one(i: int) -> int:
        with httpx.Client(base_url=url, timeout=60) as http:
            if i % 3 == 2:  # a bad request among the good ones
                return http.post("/v1/recommend", files={"image": ("x.jpg", b"junk")}, data={"category": category}).status_code
            response = http.post("/v1/recommend", files={"image": ("s.jpg", image)}, data={"category": category, "box": box, "k": "3"})
            return response.status_code if len(response.json()["products"]) == 3 else -1

    with live_server(app) as url:
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(one, range(24)))
        assert httpx.get(f"{url}/v1/health").status_code == 200
    assert statuses == [415 if i % 3 == 2 else 200 for i in range(24)]
