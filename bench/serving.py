"""Embedded Triton: start-up and shutdown times, requests/s and images/s by protocol and batch size."""
from __future__ import annotations

import asyncio
import csv
import time
from pathlib import Path

import numpy as np

from cells.contract import INPUT_SHAPE
from deploy.client import ClientOptions, TritonClassifier
from deploy.server import EmbeddedServer


async def _measure(url: str, protocol: str, images: np.ndarray, batch: int, in_flight: int) -> float:
    options = ClientOptions((url,), protocol=protocol, batch_size=batch, max_in_flight=in_flight)
    async with TritonClassifier(options) as classifier:
        await classifier.classify(images[: batch * in_flight])  # warm-up: first calls allocate buffers
        started = time.perf_counter()
        await classifier.classify(images)
        return time.perf_counter() - started


def bench_serving(repository: Path, out: Path, images: int = 512, single_requests: int = 256, in_flight: int = 8,
                  threads: int = 0) -> list[dict]:
    """One server; for each protocol, batch 1 (many concurrent requests) and batch 64."""
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (images, *INPUT_SHAPE), dtype=np.uint8)
    rows = []
    started = time.perf_counter()
    server = EmbeddedServer(repository, threads=threads).start()
    startup = time.perf_counter() - started
    try:
        for protocol in ("grpc", "http"):
            url = server.grpc_url if protocol == "grpc" else server.http_url
            for batch, count in ((1, single_requests), (64, images)):
                seconds = asyncio.run(_measure(url, protocol, crops[:count], batch, in_flight))
                requests = -(-count // batch)
                rows.append({
                    "protocol": protocol, "batch": batch, "concurrency": in_flight, "images": count,
                    "requests": requests, "seconds": round(seconds, 3),
                    "requests_per_s": round(requests / seconds, 1), "images_per_s": round(count / seconds, 1),
                })
                print(f"{protocol:<5} batch {batch:>3} x{in_flight} in flight: {rows[-1]['requests_per_s']:>7} req/s "
                      f"{rows[-1]['images_per_s']:>7} img/s", flush=True)
    finally:
        stop_started = time.perf_counter()
        server.stop()
        shutdown = time.perf_counter() - stop_started
    print(f"start-up {startup:.1f}s (process start to model ready), shutdown {shutdown:.1f}s (SIGTERM to exit)")
    for row in rows:
        row.update(startup_s=round(startup, 2), shutdown_s=round(shutdown, 2))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}")
    return rows
