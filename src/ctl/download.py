"""Download the official Shop-The-Look release into an STL-format folder, resumably.

The release is two JSON files per domain, ``<domain>.json`` (pairs) and ``<domain>-cat.json``
(product categories), and one image per signature on Pinterest's CDN. :func:`download` fetches
every image the two files name into ``out/images/SIG.jpg``: concurrently, at a polite rate,
retrying what may recover. Each image is written under a hidden temporary name and renamed only
once its bytes decode, so a killed run leaves no partial file under a final name; an image that is
already there and decodes is never fetched again, so a run can be repeated or resumed at will.
What could not be fetched is listed in ``out/download-failures.jsonl``; the loader skips the pairs
that lack an image and reports them.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import random
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from ctl import __version__
from ctl.images import ImageError, decode_image, load_image
from ctl.io import write_bytes_atomic, write_text_atomic

# {s} is the signature, {s[a:b]} a slice of it.
IMAGE_URL = "http://i.pinimg.com/400x/{s[0:2]}/{s[2:4]}/{s[4:6]}/{s}.jpg"
OFFICIAL_URL = "https://raw.githubusercontent.com/kang205/STL-Dataset/master/{name}"
DOMAINS = ("fashion", "home")
FAILURES_FILE = "download-failures.jsonl"
USER_AGENT = f"ctl/{__version__} (Complete the Look research code)"

_SIG = re.compile(r"[0-9a-f]{32}")
_FIELD = re.compile(r"\{s(?:\[(\d*):(\d*)\])?\}")


class DownloadError(OSError):
    """A download that cannot go on; the message says what to do instead."""


@dataclass(frozen=True)
class Failure:
    """An image that could not be fetched, and why.

    ``reason`` is one of ``http-<code>``, ``timeout``, ``connection``, ``truncated`` (fewer bytes
    than announced) or ``not-image`` (the body does not decode)."""

    sig: str
    url: str
    reason: str
    detail: str
    attempts: int


@dataclass
class DownloadSummary:
    images: int  # distinct signatures named by the pairs and the category map
    downloaded: int  # fetched by this run
    present: int  # already there and decoding: not fetched
    failures: list[Failure]
    pairs: int
    pairs_missing: int  # pairs that lack their scene or product image: the loader skips them
    seconds: float
    max_failure_rate: float
    failures_file: Path

    @property
    def failure_rate(self) -> float:
        return len(self.failures) / self.images if self.images else 0.0

    @property
    def passed(self) -> bool:
        """True unless failures exceed ``max_failure_rate`` of the images: then a caller exits non-zero."""
        return self.failure_rate <= self.max_failure_rate

    def reasons(self) -> dict[str, int]:
        return dict(Counter(f.reason for f in self.failures).most_common())

    def report(self) -> str:
        verdict = "within" if self.passed else "OVER"
        lines = [
            f"{self.images} images: {self.downloaded} downloaded, {self.present} already there, "
            f"{len(self.failures)} failed ({self.failure_rate:.2%}, {verdict} the {self.max_failure_rate:.2%} allowed)",
            f"{self.seconds:.1f} s, {self.downloaded / max(self.seconds, 1e-9):.1f} images downloaded a second",
        ]
        if self.failures:
            lines.append("failed by reason: " + ", ".join(f"{r} {n}" for r, n in self.reasons().items()))
            lines.append(f"{self.pairs_missing} of {self.pairs} pairs lack an image; the loader skips them")
        lines.append(f"failures listed in {self.failures_file}")
        return "\n".join(lines)


def image_url(template: str, sig: str) -> str:
    """``template`` with ``{s}`` replaced by the signature and ``{s[a:b]}`` by a slice of it."""

    def field(match: re.Match) -> str:
        if match[1] is None:
            return sig
        start, stop = (int(x) if x else None for x in (match[1], match[2]))
        return sig[start:stop]

    return _FIELD.sub(field, template)


def check_template(template: str) -> None:
    url = urllib.parse.urlsplit(image_url(template, "0" * 32))
    if "{s}" not in template or url.scheme not in ("http", "https") or not url.netloc:
        raise ValueError(f"URL template {template!r} must be an http(s) URL containing {{s}}, e.g. {IMAGE_URL}")


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delay in seconds, or an HTTP date); None if absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


class RateLimiter:
    """A token bucket shared by all threads: ``rate`` requests a second on average, bursts of up to
    ``burst``; ``rate <= 0`` means no limit. Written in its virtual-time form: ``due`` is when the
    bucket would be full again if nothing more were taken."""

    def __init__(self, rate: float, burst: int):
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.slack = (burst - 1) * self.interval
        self.due = 0.0
        self.lock = threading.Lock()

    def reserve(self) -> float:
        """Take a token; return how long to wait before using it."""
        with self.lock:
            now = time.monotonic()
            start = max(now, self.due - self.slack)
            self.due = max(self.due, start) + self.interval
        return start - now

    def pause(self, seconds: float) -> None:
        """No request starts for ``seconds``: the host asked every connection to wait."""
        with self.lock:
            self.due = max(self.due, time.monotonic() + seconds + self.slack)


class _AttemptFailed(Exception):
    def __init__(self, reason: str, detail: str, retry: bool, wait: float | None = None):
        super().__init__(detail)
        self.reason, self.detail, self.retry, self.wait = reason, detail, retry, wait


class _GaveUp(Exception):
    def __init__(self, reason: str, detail: str, attempts: int):
        super().__init__(detail)
        self.reason, self.detail, self.attempts = reason, detail, attempts


class _Stopped(Exception):
    """The run is being interrupted: a worker drops its image."""


def _get_once(url: str, timeout: float) -> bytes:
    """One GET, redirects followed: no connect or read may take over ``timeout`` seconds, and a
    response still arriving ``timeout`` seconds after the request is abandoned."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    deadline = time.monotonic() + timeout
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = bytearray()
            while chunk := response.read1(1 << 16):  # one receive at a time, so that the deadline holds
                body += chunk
                if time.monotonic() > deadline:
                    raise _AttemptFailed("timeout", f"response not complete after {timeout:g} s", retry=True)
            if response.length:  # http.client does not raise when a read with a size comes up short
                raise _AttemptFailed("truncated", f"body cut short, {response.length} bytes missing", retry=True)
            return bytes(body)
    except urllib.error.HTTPError as err:
        err.close()
        retry = err.code in (408, 429) or err.code >= 500
        wait = retry_after(err.headers.get("Retry-After")) if retry else None
        raise _AttemptFailed(f"http-{err.code}", f"HTTP {err.code} {err.reason}", retry, wait) from None
    except http.client.IncompleteRead as err:
        raise _AttemptFailed("truncated", f"body cut short ({err})", retry=True) from None
    except (OSError, http.client.HTTPException) as err:
        cause = err.reason if isinstance(err, urllib.error.URLError) else err
        reason = "timeout" if isinstance(cause, TimeoutError) else "connection"
        raise _AttemptFailed(reason, f"{type(cause).__name__}: {cause}", retry=True) from None


class _Fetcher:
    """GETs with retries for all worker threads: one rate limiter, one stop signal.

    Timeouts, connection errors, 408, 5xx, short bodies and bodies that fail ``check`` are retried
    up to ``retries`` times after an exponential backoff with jitter (``backoff`` seconds doubling);
    a 429 or 503 with Retry-After pauses every connection that long instead. Any other 4xx is
    final at once. No single wait exceeds ``max_wait`` seconds."""

    def __init__(self, *, rate: float, burst: int, retries: int, timeout: float, backoff: float, max_wait: float):
        self.limiter = RateLimiter(rate, burst)
        self.stop = threading.Event()
        self.retries, self.timeout, self.backoff, self.max_wait = retries, timeout, backoff, max_wait

    def get(self, url: str, check: Callable[[bytes], object], invalid: str) -> bytes:
        """The body of ``url`` once ``check`` accepts it (raises ValueError otherwise, recorded as ``invalid``)."""
        attempt = 0
        while True:
            attempt += 1
            self._sleep(self.limiter.reserve())
            try:
                body = _get_once(url, self.timeout)
                try:
                    check(body)
                except ValueError as err:
                    raise _AttemptFailed(invalid, str(err), retry=True) from None
                return body
            except _AttemptFailed as err:
                if not err.retry or attempt > self.retries:
                    raise _GaveUp(err.reason, err.detail, attempt) from None
                if err.wait is not None:
                    self.limiter.pause(min(err.wait, self.max_wait))
                else:
                    self._sleep(min(self.max_wait, self.backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0))

    def _sleep(self, seconds: float) -> None:
        if self.stop.wait(seconds):
            raise _Stopped


def parse_pairs(text: str, source: str) -> list[tuple[str, str]]:
    """(scene, product) of each line of a pairs file (JSON lines)."""
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        try:
            record = json.loads(line)
            pair = (record["scene"], record["product"])
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{where}: not a pair {{\"product\", \"scene\", \"bbox\"}} ({err!r})") from None
        _check_sigs(pair, where)
        pairs.append(pair)
    return pairs


def parse_categories(text: str, source: str) -> list[str]:
    """The products of a category file (one JSON object, product -> category path)."""
    try:
        categories = json.loads(text)
    except ValueError as err:
        raise ValueError(f"{source}: not JSON ({err})") from None
    if not isinstance(categories, dict):
        raise ValueError(f"{source}: expected one JSON object mapping product signature -> category path")
    _check_sigs(categories, source)
    return list(categories)


def _check_sigs(sigs: Iterable[object], where: str) -> None:
    for sig in sigs:
        if not (isinstance(sig, str) and _SIG.fullmatch(sig)):
            raise ValueError(f"{where}: {sig!r} is not an image signature (32 hex digits)")


def _is_image(path: Path) -> bool:
    try:
        load_image(path)
    except ImageError:
        return False
    return True


def _place(data: bytes, dest: Path) -> None:
    if not dest.is_file() or dest.read_bytes() != data:
        write_bytes_atomic(dest, data)


def download(
    pairs: str | Path,
    categories: str | Path,
    out: str | Path,
    *,
    url_template: str = IMAGE_URL,
    connections: int = 8,
    rate: float = 20.0,
    retries: int = 5,
    timeout: float = 30.0,
    max_failure_rate: float = 0.05,
    backoff: float = 1.0,
    max_wait: float = 60.0,
    progress: bool = True,
) -> DownloadSummary:
    """Fetch every image that ``pairs`` and ``categories`` name into ``out/images/SIG.jpg``.

    The two files are copied into ``out`` as ``<name>.json`` and ``<name>-cat.json``, ``<name>``
    being the stem of ``pairs`` (``fashion.json`` -> ``fashion``), unless already there. Images:
    every scene and product of the pairs and every product of the category map (the catalog
    negatives are drawn from). Defaults: 8 connections, at most 20 requests a second in all
    (``rate <= 0``: no limit), 5 retries after 1, 2, 4, 8, 16 s (each jittered down by up to half),
    a 30 s timeout (for each connect or read; a response still arriving after it is abandoned), no
    wait over 60 s (Retry-After included). The summary passes unless
    more than ``max_failure_rate`` of the images failed (default 5%).

    Stale temporary files of a killed run are removed first, so two runs must not write into one
    folder at once. Ctrl-C stops every connection within ``timeout`` and raises KeyboardInterrupt;
    images already renamed stay, and the next run resumes from them."""
    pairs, categories, out = Path(pairs), Path(categories), Path(out)
    check_template(url_template)
    for name, ok in [
        ("connections", connections >= 1),
        ("retries", retries >= 0),
        ("timeout", timeout > 0),
        ("backoff", backoff >= 0),
        ("max_wait", max_wait >= 0),
        ("max_failure_rate", 0 <= max_failure_rate <= 1),
    ]:
        if not ok:
            raise ValueError(f"{name} out of range")
    pairs_data, categories_data = pairs.read_bytes(), categories.read_bytes()
    pair_list = parse_pairs(pairs_data.decode(), str(pairs))
    sigs = sorted({sig for pair in pair_list for sig in pair} | set(parse_categories(categories_data.decode(), str(categories))))
    _place(pairs_data, out / f"{pairs.stem}.json")
    _place(categories_data, out / f"{pairs.stem}-cat.json")
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for stale in images.glob(".*.jpg.*.tmp"):  # left by a run that was killed mid-write
        stale.unlink()

    fetcher = _Fetcher(rate=rate, burst=connections, retries=retries, timeout=timeout, backoff=backoff, max_wait=max_wait)

    def fetch(sig: str) -> str | Failure:
        path = images / f"{sig}.jpg"
        if _is_image(path):
            return "present"
        url = image_url(url_template, sig)
        try:
            body = fetcher.get(url, lambda data: decode_image(data, url), invalid="not-image")
        except _GaveUp as err:
            return Failure(sig, url, err.reason, err.detail, err.attempts)
        write_bytes_atomic(path, body)
        return "downloaded"

    start = time.monotonic()
    counts: Counter[str] = Counter()
    failures: list[Failure] = []
    pool = ThreadPoolExecutor(connections, thread_name_prefix="download")
    try:
        with tqdm(total=len(sigs), unit="img", desc="images", disable=not progress) as bar:
            for future in as_completed([pool.submit(fetch, sig) for sig in sigs]):
                result = future.result()
                if isinstance(result, Failure):
                    failures.append(result)
                    bar.set_postfix(failed=len(failures), refresh=False)
                else:
                    counts[result] += 1
                bar.update()
    finally:  # on Ctrl-C or an error (a full disk) stop the other connections before leaving
        fetcher.stop.set()
        pool.shutdown(wait=True, cancel_futures=True)

    failures.sort(key=lambda f: f.sig)
    failures_file = out / FAILURES_FILE
    write_text_atomic(failures_file, "".join(json.dumps(asdict(f)) + "\n" for f in failures))
    failed = {f.sig for f in failures}
    return DownloadSummary(
        images=len(sigs),
        downloaded=counts["downloaded"],
        present=counts["present"],
        failures=failures,
        pairs=len(pair_list),
        pairs_missing=sum(1 for scene, product in pair_list if scene in failed or product in failed),
        seconds=time.monotonic() - start,
        max_failure_rate=max_failure_rate,
        failures_file=failures_file,
    )


def fetch_official(
    domain: str,
    out: str | Path,
    *,
    base_url: str = OFFICIAL_URL,
    retries: int = 2,
    timeout: float = 30.0,
    backoff: float = 1.0,
) -> tuple[Path, Path]:
    """Fetch the official ``<domain>.json`` and ``<domain>-cat.json`` into ``out``; return their paths.

    A file already in ``out`` is kept (both are written only once they parse). Raises
    DownloadError, saying how to proceed offline, when the release cannot be reached."""
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {', '.join(DOMAINS)}, not {domain!r}")
    out = Path(out)
    paths = (out / f"{domain}.json", out / f"{domain}-cat.json")
    fetcher = _Fetcher(rate=0, burst=1, retries=retries, timeout=timeout, backoff=backoff, max_wait=60.0)
    for path, parse in zip(paths, (parse_pairs, parse_categories)):
        if path.is_file():
            continue
        url = base_url.format(name=path.name)
        try:
            body = fetcher.get(url, lambda data: parse(data.decode(), url), invalid="not-json")
        except _GaveUp as err:
            raise DownloadError(
                f"cannot fetch {url} ({err.detail}). Without access to it, download {paths[0].name} and "
                f"{paths[1].name} from https://github.com/kang205/STL-Dataset elsewhere, copy them into {out} "
                f"and run: ctl download --pairs {paths[0]} --categories {paths[1]} --out {out}"
            ) from None
        write_bytes_atomic(path, body)
    return paths
