"""Seconds from SIGTERM to exit for `smearscope serve`, `web` and `run`, each started as a script or
`nohup … &` starts it (SIGINT ignored, its own session), idle and with work in flight.

    serve idle      models loaded, an HTTP client connected and idle (keep-alive)
    serve load      four gRPC clients sending 64 crops each, back to back
    web idle        one field analysed before, nothing in flight
    web upload      a field upload in flight
    run             `smearscope run` with its embedded Triton, signalled after its second finished field
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from batch.results import parts
from cells.contract import INPUT_NAME, MODEL_NAME
from deploy.server import free_port

CASES = ("serve-idle", "serve-load", "web-idle", "web-upload", "run")


@dataclass(frozen=True)
class ShutdownBenchOptions:
    fields: Path = Path("tests/fixtures/smears")
    out: Path = Path("bench/results/shutdown.json")
    repeats: int = 3
    cases: tuple[str, ...] = CASES


def _background(arguments: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "smearscope", *arguments], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))


def _wait_for(url: str, process: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with code {process.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(url)


def _sigterm(process: subprocess.Popen, during: Callable[[], None] | None = None) -> dict:
    """Start `during` (work in flight), SIGTERM the process and time its exit."""
    worker = threading.Thread(target=during, daemon=True) if during else None
    if worker:
        worker.start()
        time.sleep(0.5)
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    code = process.wait(120)
    seconds = time.monotonic() - started
    if worker:
        worker.join(60)
    return {"seconds": round(seconds, 2), "exit_code": code}


def _serve(load: bool, work: Path) -> dict:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    http, grpc, metrics = free_port(), free_port(), free_port()
    process = _background(["serve", "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
                          work / "serve.log")
    for name in ("malaria_resnet50v2", "rbc_detector"):
        _wait_for(f"http://127.0.0.1:{http}/v2/models/{name}/ready", process)
    crops = np.zeros((64, 128, 128, 3), np.uint8)
    idle = httpclient.InferenceServerClient(f"127.0.0.1:{http}")
    request = httpclient.InferInput(INPUT_NAME, list(crops.shape), "UINT8")
    request.set_data_from_numpy(crops)
    idle.infer(MODEL_NAME, [request])  # then left connected
    going = threading.Event()
    answered = []

    def client() -> None:
        connection = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}")
        request = grpcclient.InferInput(INPUT_NAME, list(crops.shape), "UINT8")
        request.set_data_from_numpy(crops)
        while not going.is_set():
            try:
                connection.infer(MODEL_NAME, [request])
                answered.append(time.monotonic())
            except Exception:  # refused once the server stops: the end of this client
                return

    def in_flight() -> None:
        threads = [threading.Thread(target=client) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    started = time.monotonic()
    result = _sigterm(process, in_flight if load else None)
    going.set()
    idle.close()
    return {**result, "answered_after_signal": sum(t > started + 0.5 for t in answered)} if load else result


def _web(upload: bool, field: Path, work: Path) -> dict:
    import httpx

    port = free_port()
    process = _background(["web", "--port", str(port)], work / "web.log")
    url = f"http://127.0.0.1:{port}"
    _wait_for(f"{url}/api/health", process)
    files = {"file": (field.name, field.read_bytes(), "image/jpeg")}
    httpx.post(f"{url}/api/fields", files=files, timeout=120).raise_for_status()
    statuses = []
    during = (lambda: statuses.append(httpx.post(f"{url}/api/fields", files=files, timeout=120).status_code)) if upload else None
    result = _sigterm(process, during)
    return {**result, "upload_status": statuses} if upload else result


def _run(fields: Path, work: Path) -> dict:
    inputs, output = work / "fields", work / "out"
    shutil.rmtree(output, ignore_errors=True)
    inputs.mkdir(exist_ok=True)
    for copy in range(8):
        for field in sorted(fields.glob("*.JPG")):
            shutil.copy(field, inputs / f"{copy}-{field.name}")
    process = _background(["run", "--input", str(inputs), "--output", str(output)], work / "run.log")
    deadline = time.monotonic() + 300
    while len(parts(str(output))) < 2:
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the run ended or stalled before two fields: {(work / 'run.log').read_text()[-500:]}")
        time.sleep(0.05)
    result = _sigterm(process)
    return {**result, "fields_done": len(parts(str(output))),
            "fields": len(list(inputs.glob("*.JPG")))}


def bench_shutdown(options: ShutdownBenchOptions) -> dict:
    """Each case `repeats` times, one after another; the report (`options.out`) has every run and the range."""
    from bench.batch import cpu_model_name

    field = sorted(options.fields.glob("*.JPG"))[0]
    runs: dict[str, list[dict]] = {case: [] for case in options.cases}
    with tempfile.TemporaryDirectory(prefix="bench-shutdown-") as temporary:
        work = Path(temporary)
        for _ in range(options.repeats):
            for case in options.cases:
                if case.startswith("serve"):
                    result = _serve(case == "serve-load", work)
                elif case.startswith("web"):
                    result = _web(case == "web-upload", field, work)
                else:
                    result = _run(options.fields, work)
                runs[case].append(result)
                print(f"{case}: SIGTERM to exit {result['seconds']:.2f} s, code {result['exit_code']}", flush=True)
    report = {"cpu": cpu_model_name(), "repeats": options.repeats,
              "seconds": {case: [min(r["seconds"] for r in rs), max(r["seconds"] for r in rs)] for case, rs in runs.items()},
              "runs": runs}
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(report, indent=2))
    return report
