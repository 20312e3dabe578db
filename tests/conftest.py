"""Shared fixtures: the committed real NIH cells and smear fields, and the servers and the cluster
the whole session shares.

Shared for the session (started when a test first asks, stopped at its end). No test stops, kills,
signals or reconfigures one of them: a test that does (a killed server, a node that dies, a server
with another config) starts its own beside them. One exception: test_storage.py's stopping store
stops `s3` and starts it again on the same port, since moto keeps every in-process server's buckets
in one place (a store of its own would be the same store).
- `server`: Triton on `repository` (the untrained export beside the released detector), ONNX Runtime.
- `released_server`: Triton on model_repository/ (the released models), OpenVINO.
- `s3`: moto's S3 server with signatures checked, bucket `BUCKET`.
- `ray_cluster`: a head (with its dashboard, for `ray job submit`) and two worker nodes of one CPU,
  each in a folder of its own, with `s3`'s credentials: nodes that share no disk.
`shared_run()` runs `smearscope run` on them (`--ray-address`, `--triton-url`). The embedded start
(a run's own Ray and Triton) is what `test_batch_job.py::embedded_run`, `test_web.py`'s SIGTERM test
and the benchmarks of `test_bench.py` and `test_storage.py` exercise; everything else uses the shared ones.

Nothing is left behind: `nothing_left_behind` marks every process the suite starts (through its
environment), points TMPDIR into pytest's own folder, and fails the session, naming them, if a
marked process, a `/dev/shm` entry or a new file in /tmp or PyTriton's workspace outlives it.
It assumes one session at a time on the machine: another's files would be counted as this one's.
"""
from __future__ import annotations

import io
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
CELLS = FIXTURES / "cells"
SESSION_MARK = "SMEARSCOPE_TEST_SESSION"
BUCKET = "lab"
# The runtime of every server of the released models in the suite: runs compared cell for cell must
# not depend on which of them answered (auto would differ between CPUs).
RELEASED_RUNTIME = "openvino"
WATCHED = (Path("/tmp"), Path("/dev/shm"), Path.home() / ".cache" / "pytriton")


def _entries(folder: Path) -> set[Path]:
    return set(folder.iterdir()) if folder.is_dir() else set()


def _marked_processes(mark: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live process whose environment carries this session's mark."""
    from deploy.leftovers import running

    found = []
    for process in running():
        try:
            environ = Path(f"/proc/{process.pid}/environ").read_bytes()
            command = Path(f"/proc/{process.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"{SESSION_MARK}={mark}".encode() in environ.split(b"\0") and process.pid != os.getpid():
            found.append((process.pid, command.strip()[:200]))
    return found


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind(tmp_path_factory) -> Iterator[None]:
    """Set up before, and torn down after, every other session fixture (servers, the cluster)."""
    mark = secrets.token_hex(8)
    temporary = tmp_path_factory.getbasetemp() / "tmp"  # short: Ray's Unix sockets live below TMPDIR
    temporary.mkdir()
    os.environ.update({SESSION_MARK: mark, "TMPDIR": str(temporary)})
    tempfile.tempdir = None  # this process too
    before = {folder: _entries(folder) for folder in WATCHED}
    yield
    deadline = time.monotonic() + 30  # Ray's and Triton's processes may take a moment to exit
    while True:
        processes = _marked_processes(mark)
        files = sorted(str(path) for folder in WATCHED for path in _entries(folder) - before[folder]
                       if not path.name.startswith("pytest-of-"))
        if not (processes or files) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for pid, _ in processes:  # killed, so the next run starts clean; the files are only named
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if processes or files:
        pytest.fail("the suite left behind: " + "; ".join([f"process {pid} ({command})" for pid, command in processes]
                                                          + [f"file {path}" for path in files]), pytrace=False)


@pytest.fixture(scope="session")
def cells_dir() -> Path:
    return CELLS


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """The real console entry point in a child process, as a user would run it."""
    return subprocess.run(
        [sys.executable, "-m", "smearscope", *args], capture_output=True, text=True, timeout=timeout
    )


def call_cli(*args: str) -> subprocess.CompletedProcess:
    """The console command's own main() in this process, its output captured: what `run_cli` runs,
    without a new interpreter importing TensorFlow again (about 5 s a call). For the training and
    export commands; the entry points themselves are run as processes in test_cli.py."""
    from smearscope.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exit:  # argparse's refusals
            code = exit.code if isinstance(exit.code, int) else 1
    return subprocess.CompletedProcess(["smearscope", *args], code, out.getvalue(), err.getvalue())


def fixture_copies(folder: Path, copies: int) -> Path:
    """`folder` holding `copies` copies of the three fixture fields, named `<copy>-<field>`."""
    folder.mkdir(parents=True, exist_ok=True)
    for copy in range(copies):
        for field in sorted((FIXTURES / "smears").glob("*.JPG")):
            shutil.copy(field, folder / f"{copy}-{field.name}")
    return folder


@contextmanager
def sigint_ignored() -> Iterator[None]:
    """Children started inside inherit SIGINT ignored, as from `cmd &` in a script, `nohup` or CI."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="session")
def keras_model_file(tmp_path_factory) -> Path:
    """An untrained model with a widened output layer, so its classes are not coin flips at 0.5."""
    import keras

    from train.model import build_model

    keras.utils.set_random_seed(0)
    model = build_model("none")
    layer = model.get_layer("probabilities")
    kernel, bias = layer.get_weights()
    layer.set_weights([kernel * 20, bias])
    path = tmp_path_factory.mktemp("model") / "model.keras"
    model.save(path)
    return path


@pytest.fixture(scope="session")
def exported(tmp_path_factory, keras_model_file):
    """One real export through the CLI (with --tensorrt, which fails here and must keep the ONNX model).

    --no-int8: the INT8 gate is tested on the released model (test_cpu_model.py); this untrained one
    has no accuracy to keep."""
    repository = tmp_path_factory.mktemp("repo")
    result = call_cli("export", "--model", str(keras_model_file), "--repository", str(repository), "--tensorrt",
                      "--no-int8")
    return repository, keras_model_file, result


@pytest.fixture(scope="session")
def repository(exported) -> Path:
    """The exported classifier, with the released detector beside it as in every served repository."""
    import shutil

    from cells.contract import DETECTOR_NAME
    from cells.repository import DEFAULT_REPOSITORY

    repository, _, result = exported
    assert (repository / "malaria_resnet50v2" / "1" / "model.onnx").is_file(), result.stderr[-2000:]
    if not (repository / DETECTOR_NAME).exists():
        shutil.copytree(DEFAULT_REPOSITORY / DETECTOR_NAME, repository / DETECTOR_NAME)
    return repository


@pytest.fixture(scope="session")
def server(repository):
    """A real embedded Triton on free loopback ports, shared by the serving tests."""
    from deploy.server import EmbeddedServer

    with EmbeddedServer(repository, runtime="onnxruntime") as running:  # answers equal to ONNX Runtime in-process
        yield running


@pytest.fixture(scope="session")
def released_server():
    """The released models served as `--runtime openvino` serves them (test_serve.py checks that runtime)."""
    from cells.repository import DEFAULT_REPOSITORY
    from deploy.server import EmbeddedServer

    with EmbeddedServer(DEFAULT_REPOSITORY, runtime=RELEASED_RUNTIME) as running:
        yield running


@pytest.fixture(scope="session")
def s3():
    from tests.s3 import S3Server

    with S3Server() as running:
        running.client().create_bucket(Bucket=BUCKET)
        yield running


@pytest.fixture(scope="session")
def ray_cluster(s3):
    from tests.cluster import LocalCluster

    with LocalCluster(workers=2, dashboard=True, env=s3.env, own_dirs=True) as cluster:
        yield cluster


def shared_run(cluster, server, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """`smearscope run ARGS` on the shared cluster and server, as a user would run it."""
    return subprocess.run([sys.executable, "-m", "smearscope", "run", *args, "--ray-address", cluster.address,
                           "--triton-url", server.grpc_url], env=cluster.env, capture_output=True, text=True,
                          timeout=timeout)


def result_tables(output: Path) -> tuple[list[dict], list[dict]]:
    """A batch run's cells.parquet and fields.parquet as rows."""
    import pyarrow.parquet as pq

    return pq.read_table(output / "cells.parquet").to_pylist(), pq.read_table(output / "fields.parquet").to_pylist()


def check_consistent(output: Path) -> tuple[list[dict], list[dict]]:
    """Every field once, every cell once, each field's counts equal to its cells', and each slide's
    to its fields'. Returns the cells and the fields."""
    import pyarrow.parquet as pq

    import json

    cells, fields = result_tables(output)
    threshold = json.loads((output / "run.json").read_text())["threshold"]  # the model's or --threshold
    assert len({f["field"] for f in fields}) == len(fields)
    assert len({(c["field"], c["cell_id"]) for c in cells}) == len(cells)
    for slide in pq.read_table(output / "slides.parquet").to_pylist():
        mine = [f for f in fields if f["slide"] == slide["slide"]]
        assert slide["fields"] == len(mine) and slide["fields_ok"] == sum(f["status"] == "ok" for f in mine)
        assert slide["cells"] == sum(f["cells"] for f in mine if f["status"] == "ok")
        assert slide["ci_low_pct"] <= slide["parasitemia_pct"] <= slide["ci_high_pct"]
    slides = fields
    for slide in slides:
        mine = [c for c in cells if c["field"] == slide["field"]]
        assert slide["cells"] == len(mine)
        parasitized = sum(c["label"] == "Parasitized" for c in mine)
        assert slide["parasitized"] == parasitized
        assert slide["parasitemia_pct"] == pytest.approx(100 * parasitized / len(mine) if mine else 0.0)
        for c in mine:
            assert 0 <= c["x"] and c["x"] + c["w"] <= slide["width"] and 0 <= c["y"] and c["y"] + c["h"] <= slide["height"]
            assert (c["label"] == "Parasitized") == (c["p_parasitized"] >= threshold)
    return cells, slides
