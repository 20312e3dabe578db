"""`smearscope bench storage`: the job on fields in S3 against the same fields on local disk, in one
run, and the S3 libraries side by side on the same objects.

The fields are uploaded under `<prefix>/fields/` (once: objects already there are kept) and the S3
run writes to `<prefix>/runs/<time>/`; the store is the one the standard AWS variables name (for a
MinIO or moto server: AWS_ENDPOINT_URL). Reported for each run: cells/s steady, bytes the workers
read per field, wall and start-up. Then each library reads every field object whole, and 64 KiB at
an offset from each (what a zip member or a slide tile costs): MB/s and CPU per object, in a process
of its own; s3fs and obstore where they are installed (they are not the job's dependencies).
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.batch import BenchOptions, cpu_model_name, field_paths, in_child, job
from batch import storage
from cells.repository import DEFAULT_REPOSITORY

RANGE_BYTES = 64 << 10


@dataclass(frozen=True)
class StorageBenchOptions:
    fields: Path
    prefix: str  # s3://bucket/prefix
    max_fields: int = 100
    repository: Path = DEFAULT_REPOSITORY
    out: Path = Path("bench/results/storage.json")


def upload(paths: list[Path], prefix: str) -> list[str]:
    """Each field under `<prefix>/fields/`, unless an object of its size is there already."""
    there = set(storage.list_files(storage.join(prefix, "fields")))
    uris = []
    for path in paths:
        uri = storage.join(prefix, "fields", path.name)
        if uri not in there or storage.size(uri) != path.stat().st_size:
            storage.atomic_write(uri, path.read_bytes())
        uris.append(uri)
    return uris


def _pyarrow(uri: str, offset: int | None) -> int:
    with storage.open_input(uri) as handle:
        if offset is None:
            return len(handle.read())
        handle.seek(offset)
        return len(handle.read(RANGE_BYTES))


def _library_reads(library: str, uris: list[str]) -> dict:
    """Every object whole, then a range of each, through `library`: MB/s and CPU ms per object."""
    import os

    if library == "s3fs":
        import s3fs

        files = s3fs.S3FileSystem(endpoint_url=os.environ.get("AWS_ENDPOINT_URL"))

        def read(uri: str, offset: int | None) -> int:
            with files.open(uri, "rb", block_size=RANGE_BYTES if offset is not None else None) as handle:
                if offset is None:
                    return len(handle.read())
                handle.seek(offset)
                return len(handle.read(RANGE_BYTES))
    elif library == "obstore":
        from urllib.parse import urlparse

        import obstore

        stores: dict = {}

        def read(uri: str, offset: int | None) -> int:
            parsed = urlparse(uri)
            store = stores.setdefault(parsed.netloc, obstore.store.S3Store(
                parsed.netloc, endpoint=os.environ.get("AWS_ENDPOINT_URL"), allow_http=True,
                region=os.environ.get("AWS_REGION", "us-east-1")))
            key = parsed.path.lstrip("/")
            if offset is None:
                return len(bytes(obstore.get(store, key).bytes()))
            return len(bytes(obstore.get_range(store, key, start=offset, length=RANGE_BYTES)))
    else:
        read = _pyarrow
    result = {}
    for mode in ("whole", "range"):
        wall, cpu = time.perf_counter(), time.process_time()
        total = sum(read(uri, None if mode == "whole" else 1000) for uri in uris)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        result[mode] = {"mb_per_s": total / 1e6 / wall, "cpu_ms_per_object": 1000 * cpu / len(uris),
                        "wall_ms_per_object": 1000 * wall / len(uris)}
    return result


def _installed(library: str) -> bool:
    import importlib.util

    return library == "pyarrow" or importlib.util.find_spec(library) is not None


def bench_storage(options: StorageBenchOptions) -> dict:
    paths = field_paths(options.fields, options.max_fields)
    storage.make_output(options.prefix)
    uris = upload(paths, options.prefix)
    job_options = BenchOptions(fields=options.fields, repository=options.repository, out=options.out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs = {}
    with tempfile.TemporaryDirectory(prefix="smearscope-bench-storage-") as local:
        for where, inputs, output in (("local", paths, Path(local)),
                                      ("s3", [storage.join(options.prefix, "fields/")], storage.join(options.prefix, "runs", stamp))):
            run = job(inputs, job_options, output)
            run["input_bytes_per_field"] = run["input_bytes_read_by_workers"] / max(run["fields"], 1)
            runs[where] = run
            print(f"{where}: {run['steady_cells_per_s']:.1f} cells/s steady, {run['input_bytes_per_field']:,.0f} bytes "
                  f"read a field, start-up {run['startup_s']:.1f} s", flush=True)
    libraries = {library: in_child(_library_reads, library, uris)
                 for library in ("pyarrow", "s3fs", "obstore") if _installed(library)}
    for library, reads in libraries.items():
        print(f"{library}: whole objects {reads['whole']['mb_per_s']:.1f} MB/s, {reads['whole']['cpu_ms_per_object']:.2f} "
              f"CPU ms each; 64 KiB ranges {reads['range']['wall_ms_per_object']:.2f} ms each", flush=True)
    report = {
        "cpu": cpu_model_name(), "fields": len(paths),
        "field_bytes_mean": sum(p.stat().st_size for p in paths) / len(paths),
        "runs": runs, "s3_vs_local": runs["s3"]["steady_cells_per_s"] / runs["local"]["steady_cells_per_s"],
        "libraries": libraries,
    }
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(report, indent=2))
    return report

