"""Shared fixtures: the committed real NIH cells and smear fields."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
CELLS = FIXTURES / "cells"


@pytest.fixture(scope="session")
def cells_dir() -> Path:
    return CELLS


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """The real console entry point in a child process, as a user would run it."""
    return subprocess.run(
        [sys.executable, "-m", "smearscope", *args], capture_output=True, text=True, timeout=timeout
    )


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
    result = run_cli("export", "--model", str(keras_model_file), "--repository", str(repository), "--tensorrt",
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
