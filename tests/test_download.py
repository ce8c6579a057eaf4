"""ctl.download against a local stand-in for the image CDN, with faults injected per signature."""

from __future__ import annotations

import email.utils
import json
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from ctl.download import (
    FAILURES_FILE,
    IMAGE_URL,
    DownloadError,
    RateLimiter,
    check_template,
    download,
    fetch_official,
    image_url,
    retry_after,
)
from stl_server import STLServer, make_jpeg, signature, write_release

FAST = dict(connections=8, rate=0, retries=3, timeout=0.5, backoff=0.01, progress=False)

# fault -> (the server's script, the failure reason or None where the image must arrive, requests made)
FAULTS = {
    "404": (["404"], "http-404", 1),
    "410": (["410"], "http-410", 1),
    "500, 503, then ok": (["500", "503", "ok"], None, 3),
    "500 forever": (["500"], "http-500", 4),
    "429 then ok": (["429", "ok"], None, 2),
    "slow then ok": (["slow", "ok"], None, 2),
    "slow forever": (["slow"], "timeout", 4),
    "trickle then ok": (["trickle", "ok"], None, 2),
    "cut short then ok": (["cut", "ok"], None, 2),
    "cut short forever": (["cut"], "truncated", 4),
    "not an image": (["html"], "not-image", 4),
    "redirect": (["redirect"], None, 1),
    "dropped then ok": (["drop", "ok"], None, 2),
}


def make_release(folder: Path, count: int) -> tuple[list[str], dict[str, bytes], Path, Path]:
    sigs = [signature(i) for i in range(count)]
    pairs, categories = write_release(folder, sigs)
    return sigs, {sig: make_jpeg(sig) for sig in sigs}, pairs, categories


def folder_names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_faults_end_as_expected_and_a_second_run_fetches_only_failures(tmp_path):
    sigs, images, pairs, categories = make_release(tmp_path / "release", len(FAULTS) + 19)
    kind = dict(zip(sigs, FAULTS))  # the first signatures carry a fault, the others none
    out = tmp_path / "stl"
    with STLServer(images, {sig: FAULTS[k][0] for sig, k in kind.items()}, slow=1.0) as server:
        summary = download(pairs, categories, out, url_template=server.url_template, **FAST)
        first = dict(server.requests)
        server.requests = {}
        again = download(pairs, categories, out, url_template=server.url_template, max_failure_rate=0.5, **FAST)

    failed = {sig: FAULTS[k][1] for sig, k in kind.items() if FAULTS[k][1]}
    arrived = [sig for sig in sigs if sig not in failed]
    assert folder_names(out / "images") == sorted(f"{sig}.jpg" for sig in arrived)  # nothing partial, no temp file
    for sig in arrived:
        assert (out / "images" / f"{sig}.jpg").read_bytes() == images[sig]
    assert {sig: len(times) for sig, times in first.items()} == {sig: FAULTS[kind[sig]][2] if sig in kind else 1 for sig in sigs}
    retried = first[sigs[list(FAULTS).index("429 then ok")]]
    assert retried[1] - retried[0] >= 0.95  # Retry-After: 1

    assert (summary.images, summary.downloaded, summary.present) == (len(sigs), len(arrived), 0)
    assert summary.reasons() == dict(Counter(failed.values()))
    assert summary.pairs == len(sigs) // 2
    assert summary.pairs_missing == sum(1 for s, p in zip(sigs[::2], sigs[1::2]) if s in failed or p in failed)
    assert not summary.passed  # 6 of 32 images failed, over the default 5%
    assert "6 failed (18.75%, OVER the 5.00% allowed)" in summary.report()
    records = [json.loads(line) for line in (out / FAILURES_FILE).read_text().splitlines()]
    assert [(r["sig"], r["reason"], r["attempts"]) for r in records] == sorted(
        (sig, reason, FAULTS[kind[sig]][2]) for sig, reason in failed.items()
    )
    assert (out / "fashion.json").read_bytes() == pairs.read_bytes()
    assert (out / "fashion-cat.json").read_bytes() == categories.read_bytes()

    assert set(server.requests) == set(failed)  # what arrived is never fetched again
    assert (again.downloaded, again.present, len(again.failures)) == (0, len(arrived), len(failed))
    assert again.passed


def test_rate_limiter_allows_a_burst_then_spaces_requests():
    limiter = RateLimiter(rate=10, burst=3)
    waits = [limiter.reserve() for _ in range(6)]
    assert waits == pytest.approx([0, 0, 0, 0.1, 0.2, 0.3], abs=0.03)
    limiter.pause(1.0)
    assert limiter.reserve() == pytest.approx(1.0, abs=0.03)
    unlimited = RateLimiter(rate=0, burst=8)
    assert [unlimited.reserve() for _ in range(100)] == [0.0] * 100
    unlimited.pause(0.5)
    assert unlimited.reserve() == pytest.approx(0.5, abs=0.03)


def test_rate_is_shared_by_all_connections(tmp_path):
    sigs, images, pairs, categories = make_release(tmp_path / "release", 12)
    with STLServer(images) as server:
        download(pairs, categories, tmp_path / "stl", url_template=server.url_template, **{**FAST, "rate": 20, "connections": 4})
    starts = sorted(t for times in server.requests.values() for t in times)
    assert starts[-1] - starts[0] >= (12 - 4) / 20 * 0.9  # a burst of 4, then 20 a second


def test_retry_after_is_capped(tmp_path):
    sigs, images, pairs, categories = make_release(tmp_path / "release", 2)
    with STLServer(images, {sigs[0]: ["429", "ok"]}, retry_after="3600") as server:
        start = time.monotonic()
        summary = download(pairs, categories, tmp_path / "stl", url_template=server.url_template, max_wait=0.2, **FAST)
    assert time.monotonic() - start < 3
    assert summary.downloaded == 2 and len(server.requests[sigs[0]]) == 2


def test_retry_after_reads_seconds_and_http_dates():
    soon = email.utils.format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert retry_after("7") == 7.0
    assert retry_after(soon) == pytest.approx(30, abs=2)
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert retry_after("later") is None
    assert retry_after(None) is None


def test_url_template():
    sig = signature(0)
    assert image_url(IMAGE_URL, sig) == f"http://i.pinimg.com/400x/{sig[:2]}/{sig[2:4]}/{sig[4:6]}/{sig}.jpg"
    assert image_url("https://mirror.example/{s[:3]}/{s}.jpg", sig) == f"https://mirror.example/{sig[:3]}/{sig}.jpg"
    for bad in ("http://mirror.example/{sig}.jpg", "ftp://mirror.example/{s}.jpg", "/images/{s}.jpg"):
        with pytest.raises(ValueError, match="URL template"):
            check_template(bad)


def test_bad_pairs_file_is_named_and_nothing_is_written(tmp_path):
    sigs, images, pairs, categories = make_release(tmp_path / "release", 4)
    pairs.write_text(pairs.read_text() + '{"product": "../../etc/passwd", "scene": "%s", "bbox": [0, 0, 1, 1]}\n' % sigs[0])
    with pytest.raises(ValueError, match=r"fashion\.json:3: .*not an image signature"):
        download(pairs, categories, tmp_path / "stl", url_template="http://127.0.0.1:9/{s}.jpg", **FAST)
    assert not (tmp_path / "stl").exists()


# The library, run in a process of its own so that it can be killed.
CHILD = (
    "import sys; from ctl.download import download; "
    "download(*sys.argv[1:4], url_template=sys.argv[4], connections=2, rate=0, progress=False)"
)


def start_child(pairs: Path, categories: Path, out: Path, server: STLServer) -> subprocess.Popen:
    args = [sys.executable, "-c", CHILD, str(pairs), str(categories), str(out), server.url_template]
    return subprocess.Popen(args, stderr=subprocess.PIPE, text=True)


def wait_for_images(folder: Path, count: int, child: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while len(list(folder.glob("*.jpg"))) < count:
        assert child.poll() is None, f"the download ended before it was interrupted: {child.stderr.read()}"
        assert time.monotonic() < deadline, "no images arrived"
        time.sleep(0.01)


def test_killed_run_leaves_no_partial_file_and_resumes_to_complete(tmp_path):
    sigs, images, pairs, categories = make_release(tmp_path / "release", 80)
    out = tmp_path / "stl"
    with STLServer(images, latency=0.03) as server:
        child = start_child(pairs, categories, out, server)
        wait_for_images(out / "images", 10, child)
        child.kill()
        child.communicate(timeout=10)
        kept = sorted((out / "images").glob("*.jpg"))
        assert 10 <= len(kept) < len(sigs)
        for path in kept:
            assert path.read_bytes() == images[path.stem]
        # what a kill in the middle of a write leaves, and a final file that another tool left corrupt
        (out / "images" / f".{sigs[-1]}.jpg.k1ll3d.tmp").write_bytes(images[sigs[-1]][:100])
        kept[0].write_bytes(b"not a jpeg")

        server.requests = {}
        summary = download(pairs, categories, out, url_template=server.url_template, **FAST)
        resumed = set(server.requests)
        server.requests = {}
        final = download(pairs, categories, out, url_template=server.url_template, **FAST)

    assert resumed == set(sigs) - {path.stem for path in kept[1:]}
    assert (summary.present, summary.downloaded, summary.failures) == (len(kept) - 1, len(sigs) - len(kept) + 1, [])
    assert folder_names(out / "images") == sorted(f"{sig}.jpg" for sig in sigs)
    for sig in sigs:
        assert (out / "images" / f"{sig}.jpg").read_bytes() == images[sig]
    assert server.requests == {} and final.present == len(sigs) and final.passed


def test_ctrl_c_stops_at_once_and_leaves_only_complete_files(tmp_path):
    sigs, images, pairs, categories = make_release(tmp_path / "release", 80)
    out = tmp_path / "stl"
    paused = sorted(sigs)[20]  # its 429 pauses every connection for 30 s
    with STLServer(images, {paused: ["429", "ok"]}, latency=0.03, retry_after="30") as server:
        child = start_child(pairs, categories, out, server)
        wait_for_images(out / "images", 5, child)
        while paused not in server.requests:
            assert child.poll() is None
            time.sleep(0.01)
        time.sleep(0.1)
        child.send_signal(signal.SIGINT)
        try:
            _, stderr = child.communicate(timeout=5)
        finally:
            child.kill()
    assert child.returncode != 0 and "KeyboardInterrupt" in stderr
    kept = sorted((out / "images").glob("*.jpg"))
    assert len(kept) < len(sigs)
    assert folder_names(out / "images") == [path.name for path in kept]  # no temporary file left
    for path in kept:
        assert path.read_bytes() == images[path.stem]


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/{{name}}"


def test_fetch_official_writes_the_release_files_once(tmp_path):
    _, _, pairs, categories = make_release(tmp_path / "release", 4)
    files = {"/fashion.json": pairs.read_bytes(), "/fashion-cat.json": categories.read_bytes()}
    out = tmp_path / "stl"
    with STLServer({}, files=files) as server:
        got = fetch_official("fashion", out, base_url=f"http://127.0.0.1:{server.port}/{{name}}")
    assert got == (out / "fashion.json", out / "fashion-cat.json")
    assert [path.read_bytes() for path in got] == [pairs.read_bytes(), categories.read_bytes()]
    assert fetch_official("fashion", out, base_url=closed_port_url()) == got  # already there: no request


def test_fetch_official_offline_says_how_to_go_on(tmp_path):
    with pytest.raises(DownloadError, match=r"STL-Dataset.*--pairs .*home\.json --categories .*home-cat\.json"):
        fetch_official("home", tmp_path, base_url=closed_port_url(), backoff=0.01)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="fashion, home"):
        fetch_official("garden", tmp_path)
