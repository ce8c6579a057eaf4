"""A local stand-in for the STL image CDN, with faults injected per signature.

Shared by tests/test_download.py and benchmarks/bench_download.py. Images are served at
``/400x/aa/bb/cc/SIG.jpg``; each signature follows a script of actions, one per request, the last
repeated: ``ok``, ``404``/``410``/``500``/``503`` (that status), ``429`` (with Retry-After),
``slow`` (answers after ``slow`` seconds), ``trickle`` (sends the image in ten pieces over
``slow`` seconds), ``cut`` (announces the whole body, sends half),
``html`` (200 with an HTML page), ``redirect`` (302 to ``/moved/SIG.jpg``, which serves the
image) and ``drop`` (closes the connection without answering).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import sys
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

_IMAGE_PATH = re.compile(r"/(400x|moved)/(?:[0-9a-f]{2}/){0,3}([0-9a-f]{32})\.jpg")


def signature(i: int) -> str:
    return hashlib.md5(str(i).encode()).hexdigest()


def make_jpeg(sig: str, size: tuple[int, int] = (64, 48)) -> bytes:
    """A small JPEG of noise, the same for the same signature."""
    rng = np.random.default_rng(int(sig[:8], 16))
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_release(folder: Path, sigs: Sequence[str], name: str = "fashion") -> tuple[Path, Path]:
    """Pairs and categories naming ``sigs``: pair i is scene sigs[2i] with product sigs[2i + 1]."""
    assert len(sigs) % 2 == 0, "pairs need an even number of signatures"
    folder.mkdir(parents=True, exist_ok=True)
    scenes, products = sigs[0::2], sigs[1::2]
    pairs, categories = folder / f"{name}.json", folder / f"{name}-cat.json"
    pairs.write_text("".join(json.dumps({"product": p, "scene": s, "bbox": [0.1, 0.2, 0.6, 0.9]}) + "\n" for s, p in zip(scenes, products)))
    categories.write_text(json.dumps({p: "Apparel & Accessories|Shoes" for p in products}))
    return pairs, categories


class _Server(ThreadingHTTPServer):
    block_on_close = False  # do not wait for handlers still sleeping in a slow answer
    request_queue_size = 128  # the default of 5 drops connections when many arrive at once
    stl: STLServer

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # clients that gave up are expected
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        stl = self.server.stl
        time.sleep(stl.latency)
        if self.path in stl.files:
            return self._send(200, stl.files[self.path], "application/json")
        match = _IMAGE_PATH.fullmatch(self.path)
        if not match or match[2] not in stl.images:
            return self._send(404, b"not found", "text/plain")
        sig = match[2]
        if match[1] == "moved":
            return self._send(200, stl.images[sig], "image/jpeg")
        action = stl.next_action(sig)
        if action == "ok":
            self._send(200, stl.images[sig], "image/jpeg")
        elif action == "429":
            self._send(429, b"slow down", "text/plain", {"Retry-After": stl.retry_after})
        elif action.isdigit():
            self._send(int(action), b"error", "text/plain")
        elif action == "slow":
            time.sleep(stl.slow)
            self._send(200, stl.images[sig], "image/jpeg")
        elif action == "trickle":
            body = stl.images[sig]
            self._send(200, b"", "image/jpeg", {"Content-Length": str(len(body))})
            piece = len(body) // 10 + 1
            for start in range(0, len(body), piece):
                time.sleep(stl.slow / 10)
                self.wfile.write(body[start : start + piece])
        elif action == "cut":
            body = stl.images[sig]
            self._send(200, body[: len(body) // 2], "image/jpeg", {"Content-Length": str(len(body))})
        elif action == "html":
            self._send(200, b"<html><body>Sorry, try later</body></html>", "text/html")
        elif action == "redirect":
            self._send(302, b"", "text/plain", {"Location": f"/moved/{sig}.jpg"})
        elif action == "drop":
            self.close_connection = True
        else:
            raise ValueError(f"unknown action {action!r}")

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        headers = {"Content-Type": content_type, "Content-Length": str(len(body)), **(headers or {})}
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)


class STLServer:
    """Serves ``images`` (SIG -> JPEG bytes) and ``files`` (URL path -> bytes) on 127.0.0.1.

    ``requests`` records, per signature, the monotonic time of each request for its image
    (redirect targets not counted). Use as a context manager."""

    def __init__(
        self,
        images: dict[str, bytes],
        faults: dict[str, Sequence[str]] | None = None,
        *,
        files: dict[str, bytes] | None = None,
        latency: float = 0.0,
        slow: float = 1.0,
        retry_after: str = "1",
    ):
        self.images, self.faults, self.files = images, faults or {}, files or {}
        self.latency, self.slow, self.retry_after = latency, slow, retry_after
        self.requests: dict[str, list[float]] = {}
        self.lock = threading.Lock()
        self.httpd = _Server(("127.0.0.1", 0), _Handler)
        self.httpd.stl = self
        self.port = self.httpd.server_address[1]
        self.url_template = f"http://127.0.0.1:{self.port}/400x/{{s[0:2]}}/{{s[2:4]}}/{{s[4:6]}}/{{s}}.jpg"

    def next_action(self, sig: str) -> str:
        with self.lock:
            times = self.requests.setdefault(sig, [])
            times.append(time.monotonic())
            script = self.faults.get(sig, ("ok",))
            return script[min(len(times), len(script)) - 1]

    def __enter__(self) -> STLServer:
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
