"""`smearscope bench serve`: the embedded Triton over a bounded grid of protocol x batch x concurrency.

Per point: images/s, request latency p50/p95/p99 (client side), and the server's own queue and
compute time per request from Triton's statistics (the difference over the point). Then Triton's
overhead at batch 64: its best images/s against the same model in-process with the server's threads.
"""
from __future__ import annotations

import asyncio
import csv
import json
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cells.contract import INPUT_NAME, INPUT_SHAPE, MODEL_NAME, OPT_BATCH_SIZE
from deploy.client import ClientOptions, TritonModel
from deploy.server import EmbeddedServer


@dataclass(frozen=True)
class ServeBenchOptions:
    repository: Path
    out: Path
    protocols: tuple[str, ...] = ("grpc", "http")
    batches: tuple[int, ...] = (1, 8, 64, 256)
    concurrencies: tuple[int, ...] = (1, 8, 32)
    images: int = 512  # crops per point (batch 1 points send a quarter: one request per crop)
    threads: int = 0
    name: str = MODEL_NAME


def _server_stats(server: EmbeddedServer, name: str) -> dict:
    """Triton's cumulative counters for the model: requests, and queue / compute nanoseconds."""
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/{name}/stats",
                                     headers={"triton-access-token": server.access_token})
    with urllib.request.urlopen(request, timeout=10) as response:
        stats = json.load(response)["model_stats"][0]["inference_stats"]
    return {key: (int(stats[key]["count"]), int(stats[key]["ns"])) for key in ("success", "queue", "compute_infer")}


async def _point(url: str, protocol: str, crops: np.ndarray, batch: int, concurrency: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    options = ClientOptions((url,), protocol=protocol, batch_size=batch, max_in_flight=concurrency)
    async with TritonModel(options, request_seconds=latencies) as classifier:
        await classifier.classify(crops[: batch * min(concurrency, 4)])  # warm-up: connections, buffers
        latencies.clear()
        started = time.perf_counter()
        await classifier.classify(crops)
        return time.perf_counter() - started, latencies


def perf_analyzer_command(url: str, name: str, batch: int, concurrency: str) -> str:
    """The equivalent perf_analyzer call (the copy inside tritonclient 2.51 runs on these machines)."""
    shape = ",".join(map(str, INPUT_SHAPE))
    return (f"perf_analyzer -m {name} -u {url} -i grpc -b {batch} --concurrency-range {concurrency} "
            f"--shape {INPUT_NAME}:{shape} --percentile 95")


def in_process_rate(model: Path, crops: np.ndarray, threads: int) -> float:
    from bench.batch import rate
    from cells.runtime import OnnxModel

    return rate(OnnxModel(model, batch_size=OPT_BATCH_SIZE, threads=threads), crops, OPT_BATCH_SIZE)["images_per_s"]


def bench_serving(options: ServeBenchOptions) -> dict:
    from cells.repository import served_onnx

    crops = np.random.default_rng(0).integers(0, 256, (options.images, *INPUT_SHAPE), dtype=np.uint8)
    rows = []
    started = time.perf_counter()
    server = EmbeddedServer(options.repository, names=(options.name,), threads=options.threads).start()
    startup = time.perf_counter() - started
    try:
        for protocol in options.protocols:
            url = server.grpc_url if protocol == "grpc" else server.http_url
            for batch in options.batches:
                for concurrency in options.concurrencies:
                    count = options.images if batch > 1 else options.images // 4
                    before = _server_stats(server, options.name)
                    seconds, latencies = asyncio.run(_point(url, protocol, crops[:count], batch, concurrency))
                    after = _server_stats(server, options.name)
                    requests = max(after["success"][0] - before["success"][0], 1)
                    queue_ms = (after["queue"][1] - before["queue"][1]) / requests / 1e6
                    compute_ms = (after["compute_infer"][1] - before["compute_infer"][1]) / requests / 1e6
                    p50, p95, p99 = (1000 * float(np.percentile(latencies, q)) for q in (50, 95, 99))
                    rows.append({
                        "protocol": protocol, "batch": batch, "concurrency": concurrency, "images": count,
                        "images_per_s": round(count / seconds, 1), "p50_ms": round(p50, 1), "p95_ms": round(p95, 1),
                        "p99_ms": round(p99, 1), "server_queue_ms": round(queue_ms, 1),
                        "server_compute_ms": round(compute_ms, 1),
                    })
                    print(" ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)
    finally:
        stop_started = time.perf_counter()
        server.stop()
        shutdown = time.perf_counter() - stop_started
    bare = in_process_rate(served_onnx(options.repository, options.name), crops, options.threads)
    best = max(r["images_per_s"] for r in rows if r["batch"] == OPT_BATCH_SIZE) if OPT_BATCH_SIZE in options.batches else None
    summary = {
        "startup_s": round(startup, 2), "shutdown_s": round(shutdown, 2),
        "in_process_images_per_s": round(bare, 1),
        "triton_best_images_per_s_at_batch_64": best,
        "triton_overhead_at_batch_64": round(1 - best / bare, 3) if best else None,
        "perf_analyzer": perf_analyzer_command(server.grpc_url, options.name, OPT_BATCH_SIZE, "1:8"),
    }
    print(json.dumps(summary, indent=2))
    options.out.parent.mkdir(parents=True, exist_ok=True)
    with open(options.out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    options.out.with_suffix(".json").write_text(json.dumps({"points": rows, **summary}, indent=2))
    print(f"wrote {options.out} and {options.out.with_suffix('.json')}")
    return {"points": rows, **summary}


def field_input_data(fields: list[Path], out: Path, url: str = "localhost:8001") -> str:
    """perf_analyzer's input data for the field model (each field's bytes as stored, base64, one request
    each) written to `out`; the perf_analyzer command that sends them, returned."""
    import base64

    from cells.contract import FIELD_INPUT, FIELD_NAME

    data = [{FIELD_INPUT: {"content": {"b64": base64.b64encode(path.read_bytes()).decode()}, "shape": [1]}}
            for path in fields]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"data": data}))
    return (f"perf_analyzer -m {FIELD_NAME} -u {url} -i grpc --input-data {out} --concurrency-range 1:8 "
            f"--percentile 95")

