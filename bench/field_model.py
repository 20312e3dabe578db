"""`smearscope bench field-model`: the field model under 1 and 8 concurrent clients.

Real fields, the repository's models in the embedded Triton; each client sends its share of the
fields one at a time, as a Ray worker does. From Triton's own statistics: fields per call of the
field model and crops per classifier call (one classifier call per field-model call), beside the
mean cells per field; with several clients, fields that arrive together share a call.
"""
from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cells.contract import FIELD_NAME
from cells.repository import DEFAULT_REPOSITORY


@dataclass(frozen=True)
class FieldModelBenchOptions:
    fields: Path = Path("tests/fixtures/smears")
    repository: Path = DEFAULT_REPOSITORY
    out: Path = Path("bench/results/field-model.json")
    max_fields: int = 40
    clients: tuple[int, ...] = (1, 8)
    runtime: str = "auto"


def field_model_statistics(server) -> tuple[int, int]:
    """(fields answered, calls made) by the field model so far."""
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/{FIELD_NAME}/stats",
                                     headers={"triton-access-token": server.access_token})
    with urllib.request.urlopen(request, timeout=10) as response:
        stats = json.load(response)["model_stats"][0]
    return int(stats["inference_count"]), int(stats["execution_count"])


async def _clients(url: str, fields: list[Path], clients: int) -> list[int]:
    from deploy.client import FIELD, ClientOptions, TritonModel

    cells: list[int] = []

    async def one(paths: list[Path]) -> None:
        async with TritonModel(ClientOptions((url,), model=FIELD_NAME), contract=FIELD) as model:
            for path in paths:
                cells.append(len((await model.analyse(path.read_bytes()))["boxes"]))

    await asyncio.gather(*(one(fields[i::clients]) for i in range(clients)))
    return cells


def bench_field_model(options: FieldModelBenchOptions) -> dict:
    from bench.batch import cpu_model_name, field_paths
    from deploy.server import EmbeddedServer

    fields = field_paths(options.fields, options.max_fields)
    rows = []
    with EmbeddedServer(options.repository, runtime=options.runtime) as server:
        for clients in options.clients:
            before, started = field_model_statistics(server), time.perf_counter()
            cells = asyncio.run(_clients(server.grpc_url, fields, clients))
            wall = time.perf_counter() - started
            answered, calls = (after - earlier for after, earlier in zip(field_model_statistics(server), before))
            rows.append({"clients": clients, "fields": answered, "calls": calls, "fields_per_call": answered / calls,
                         "mean_cells_per_field": sum(cells) / len(cells), "crops_per_classifier_call": sum(cells) / calls,
                         "cells_per_s": sum(cells) / wall})
    result = {"cpu": cpu_model_name(), "repository": str(options.repository), "runtime": options.runtime, "runs": rows}
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result
