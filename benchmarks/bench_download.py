"""Throughput of ``ctl.download`` against a local stand-in for the image CDN with a realistic mix of faults.

    python benchmarks/bench_download.py [--images 3000] [--connections 16] [--latency 0.05]

Prints images/s, the summary, what happened to each kind of fault, and a second run over the
complete folder (which must send no request). Timeouts and backoff are scaled down from the
defaults (1 s and 0.1 s instead of 30 s and 1 s) so that a run takes seconds, not minutes.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from stl_server import STLServer, make_jpeg, signature, write_release  # noqa: E402

from ctl.download import download  # noqa: E402

# fault -> (share of the images, the server's script: one action a request, the last repeated)
MIX = {
    "404": (0.03, ["404"]),
    "410": (0.005, ["410"]),
    "500, then ok": (0.02, ["500", "ok"]),
    "503 twice, then ok": (0.01, ["503", "503", "ok"]),
    "500 forever": (0.003, ["500"]),
    "429 + Retry-After 1, then ok": (0.002, ["429", "ok"]),
    "slow, then ok": (0.005, ["slow", "ok"]),
    "slow forever": (0.001, ["slow"]),
    "trickle, then ok": (0.002, ["trickle", "ok"]),
    "cut short, then ok": (0.005, ["cut", "ok"]),
    "not an image": (0.002, ["html"]),
    "redirect": (0.01, ["redirect"]),
    "dropped, then ok": (0.005, ["drop", "ok"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rate", type=float, default=0.0, help="requests a second; 0: no limit")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds the server takes for each request")
    args = parser.parse_args()

    sigs = [signature(i) for i in range(args.images - args.images % 2)]
    images = {sig: make_jpeg(sig, (200, 250)) for sig in sigs}
    shuffled = random.Random(0).sample(sigs, len(sigs))
    kind = dict.fromkeys(sigs, "none")
    start = 0
    for name, (share, _) in MIX.items():
        count = round(share * len(sigs))
        kind.update(dict.fromkeys(shuffled[start : start + count], name))
        start += count
    faults = {sig: MIX[name][1] for sig, name in kind.items() if name != "none"}

    with tempfile.TemporaryDirectory() as tmp, STLServer(images, faults, latency=args.latency, slow=2.0) as server:
        pairs, categories = write_release(Path(tmp) / "release", sigs)
        out = Path(tmp) / "stl"
        options = dict(
            url_template=server.url_template, connections=args.connections, rate=args.rate, timeout=1.0, backoff=0.1
        )
        print(
            f"{len(sigs)} images of {sum(map(len, images.values())) / len(sigs) / 1024:.0f} KiB on average, "
            f"{args.latency * 1000:.0f} ms a request; {args.connections} connections, rate {args.rate or 'unlimited'}, "
            f"5 retries, timeout 1 s, backoff 0.1 s"
        )
        summary = download(pairs, categories, out, progress=False, **options)
        print(summary.report())

        count, intact, requests = Counter(kind.values()), Counter(), Counter()
        failed: dict[str, Counter] = defaultdict(Counter)
        for sig in sigs:
            path = out / "images" / f"{sig}.jpg"
            intact[kind[sig]] += path.is_file() and path.read_bytes() == images[sig]
            requests[kind[sig]] += len(server.requests.get(sig, []))
        for failure in summary.failures:
            failed[kind[failure.sig]][failure.reason] += 1
        print(f"\n{'fault':30} {'images':>6} {'intact':>6} {'requests':>8}  failed as")
        for name in ["none", *MIX]:
            reasons = ", ".join(f"{r} {n}" for r, n in failed[name].items()) or "-"
            print(f"{name:30} {count[name]:6} {intact[name]:6} {requests[name]:8}  {reasons}")

        server.requests = {}
        start = time.monotonic()
        again = download(pairs, categories, out, progress=False, **options)
        print(
            f"\nsecond run: {sum(map(len, server.requests.values()))} requests "
            f"(the {len(again.failures)} failures retried), {again.present} already there, {time.monotonic() - start:.1f} s"
        )


if __name__ == "__main__":
    main()
