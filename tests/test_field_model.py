"""The field model: one encoded field in, its cells out, through a real `smearscope serve`; the crop graph
against the NumPy/PIL crops it reproduces, and against TensorRT's list of ONNX operators."""
from __future__ import annotations

import asyncio
import io
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cells.contract import CROPS_NAME, DETECTOR_INPUT, DETECTOR_NAME, DETECTOR_OUTPUT, FIELD_NAME, MODEL_NAME
from cells.repository import DEFAULT_REPOSITORY, served_onnx
from bench.field_model import field_model_statistics
from deploy.client import FIELD, ClientOptions, InferenceRejected, TritonModel

SMEARS = Path(__file__).parent / "fixtures" / "smears"
FIELDS = sorted(SMEARS.glob("*.JPG"))
ONE_CELL = sorted((Path(__file__).parent / "fixtures" / "cells" / "Uninfected").glob("*.png"))[0]  # an NIH crop
OPS_FILE = Path(__file__).parents[1] / "export" / "tensorrt_onnx_ops.txt"


def _tensorrt_ops() -> dict[str, set[str]]:
    """Operator -> the types listed for it (empty: any) from the checked-in list."""
    ops = {}
    for line in OPS_FILE.read_text().splitlines():
        if line and not line.startswith("#"):
            name, *types = line.split()
            ops[name] = set(types)
    return ops


def test_crop_graph_uses_only_operators_tensorrt_imports(tmp_path):
    import onnx
    from onnx import TensorProto

    from export.crop_graph import build_crop_graph

    ops = _tensorrt_ops()
    built = onnx.shape_inference.infer_shapes(onnx.load(build_crop_graph(tmp_path / "crops.onnx")), strict_mode=True)
    committed = onnx.load(served_onnx(DEFAULT_REPOSITORY, CROPS_NAME))
    assert [n.op_type for n in committed.graph.node] == [n.op_type for n in built.graph.node], "regenerate: export writes it"
    types = {v.name: v.type.tensor_type.elem_type for v in (*built.graph.value_info, *built.graph.input, *built.graph.output)}
    types.update({t.name: t.data_type for t in built.graph.initializer})
    names = {getattr(TensorProto, name): name for name in ("FLOAT", "INT32", "INT64", "BOOL", "UINT8", "FLOAT16")}
    short = {"FLOAT": "FP32", "FLOAT16": "FP16"}
    uint8 = set()
    for node in built.graph.node:
        assert node.op_type in ops, f"{node.op_type} is not imported by TensorRT 10"
        for name in node.input:
            kind = short.get(names[types[name]], names[types[name]])
            if kind == "UINT8":
                uint8.add(name)
            elif ops[node.op_type]:
                assert kind in ops[node.op_type], f"{node.op_type} on {kind} ({name}) is not supported by TensorRT 10"
    network_io = {v.name for v in (*built.graph.input, *built.graph.output)}
    assert uint8 <= network_io, "UINT8 must only be a network input or output for TensorRT"
    assert any(n.op_type == "MatMul" for n in built.graph.node)


@pytest.fixture(scope="module")
def fixture_cells():
    """Each fixture field decoded, with the released detector's cells, labels and factor."""
    from cells.detect import detector_input, labelled_cells
    from cells.runtime import OnnxModel
    from fields.slides import decode

    detector = OnnxModel(served_onnx(DEFAULT_REPOSITORY, DETECTOR_NAME), batch_size=1, input_name=DETECTOR_INPUT,
                         output_name=DETECTOR_OUTPUT)
    found = []
    for path in FIELDS:
        image = decode(path.read_bytes())
        small, factor = detector_input(image)
        found.append((image, *labelled_cells(detector(small[None])[0], image.shape[:2], factor), factor))
    return found


def test_crop_graph_gives_the_crops_of_cut_cell_and_normalise_stain(fixture_cells):
    """The gate of the graph, as FP16 parity gates a model: every pixel within one level of the NumPy/PIL crops."""
    from cells.find import cell_crops
    from cells.runtime import OnnxGraph
    from cells.stain import normalise_stain
    from fields.pipeline import crop_graph_inputs

    graph = OnnxGraph(served_onnx(DEFAULT_REPOSITORY, CROPS_NAME))
    for image, cells, labels, ids, factor in fixture_cells:
        for normalise in (True, False):
            crops = graph(crop_graph_inputs(image, cells, labels, ids, factor, normalise))
            expected = cell_crops(image, cells)
            expected = normalise_stain(expected) if normalise else expected
            difference = np.abs(crops.astype(int) - expected.astype(int))
            assert crops.shape == expected.shape and difference.max() <= 1, (normalise, difference.max())
            assert (difference == 0).mean() > 0.97


def _grpc_field(server, data: bytes, model: str = FIELD_NAME):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    encoded = grpcclient.InferInput("encoded", [1, 1], "BYTES")
    encoded.set_data_from_numpy(np.array([[data]], dtype=np.object_))
    return client.infer(model, [encoded])


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_jpeg_over_grpc_and_http_gives_the_cells_of_the_pipeline_in_process(server):
    """The ten-line example of the README, over gRPC and over HTTP, against fields.pipeline in process."""
    import tritonclient.http as httpclient

    from cells.decision import read_decision
    from cells.runtime import OnnxModel
    from fields.pipeline import FieldPipeline, FieldRequest

    data = FIELDS[0].read_bytes()
    over_grpc = _grpc_field(server, data)
    http = httpclient.InferenceServerClient(server.http_url)
    encoded = httpclient.InferInput("encoded", [1, 1], "BYTES")
    encoded.set_data_from_numpy(np.array([[data]], dtype=np.object_))
    over_http = http.infer(FIELD_NAME, [encoded])

    repository = server.repository
    pipeline = FieldPipeline(
        OnnxModel(served_onnx(repository, DETECTOR_NAME), batch_size=1, input_name=DETECTOR_INPUT, output_name=DETECTOR_OUTPUT),
        OnnxModel(served_onnx(repository, MODEL_NAME)), None, read_decision(repository / MODEL_NAME).threshold, crops="numpy")
    [expected] = pipeline([FieldRequest(data)])
    assert len(expected.boxes) > 50 and not expected.error
    for result in (over_grpc, over_http):
        assert np.array_equal(result.as_numpy("boxes")[0], expected.boxes)
        assert np.array_equal(result.as_numpy("areas")[0], expected.areas)
        np.testing.assert_allclose(result.as_numpy("probabilities")[0], expected.probabilities, atol=1e-5)
        assert np.array_equal(result.as_numpy("calls")[0], expected.calls)
        assert result.as_numpy("counts")[0].tolist() == expected.counts.tolist()
        assert result.as_numpy("size")[0].tolist() == [expected.width, expected.height]
        assert result.as_numpy("error")[0][0] == b""


def test_eight_concurrent_clients_share_classifier_calls(released_server):
    """Fields arriving together are one call of the field model: its classifier call holds the crops of
    several fields, more than a field's cells."""
    server = released_server
    fields_before, calls_before = field_model_statistics(server)
    options = ClientOptions((server.grpc_url,), model=FIELD_NAME)

    async def one(data: bytes) -> int:
        async with TritonModel(options, contract=FIELD) as model:
            return len((await model.analyse(data))["boxes"])

    async def eight() -> list[int]:
        return await asyncio.gather(*(one(FIELDS[i % len(FIELDS)].read_bytes()) for i in range(8)))

    cells = asyncio.run(eight())
    fields, calls = (after - before for after, before in zip(field_model_statistics(server), (fields_before, calls_before)))
    assert fields == 8 and calls < 8, (fields, calls)
    crops_per_call = sum(cells) / calls
    assert crops_per_call > np.mean(cells), (crops_per_call, cells)


@pytest.mark.parametrize("kind", ["not an image", "truncated", "bomb", "empty"])
def test_bad_input_gets_its_own_error_and_the_server_answers_others(released_server, kind):
    from fields.slides import DEFAULT_MAX_PIXELS

    server, jpeg, cell = released_server, FIELDS[0].read_bytes(), ONE_CELL.read_bytes()
    bomb = bytearray(_png(np.zeros((1, 1, 3), np.uint8)))
    bomb[16:24] = (100_000).to_bytes(4, "big") * 2  # the header claims 100,000 x 100,000 px
    bomb[29:33] = zlib.crc32(bomb[12:29]).to_bytes(4, "big")
    data = {"not an image": b"hello, this is text", "truncated": jpeg[: len(jpeg) // 3], "bomb": bytes(bomb),
            "empty": b""}[kind]
    options = ClientOptions((server.grpc_url,), model=FIELD_NAME)

    async def both() -> tuple[dict, dict]:
        async with TritonModel(options, contract=FIELD) as model:
            return await asyncio.gather(model.analyse(data), model.analyse(cell))

    bad, good = asyncio.run(both())
    error = bad["error"][0].decode()
    expected = {"not an image": "not an image", "truncated": "corrupt or truncated", "bomb": "image too large",
                "empty": "empty file"}[kind]
    assert error.startswith(expected) and "\n" not in error, error
    assert len(bad["boxes"]) == 0 and bad["counts"].tolist() == [0, 0]
    assert good["error"][0] == b"" and len(good["boxes"]) == 1  # a cell crop is classified whole
    assert 100_000 * 100_000 > DEFAULT_MAX_PIXELS


def test_a_200_mb_body_gets_a_clear_error_and_the_server_answers_others(released_server):
    options = ClientOptions((released_server.grpc_url,), model=FIELD_NAME, retries=0)

    async def run() -> tuple[str, dict]:
        async with TritonModel(options, contract=FIELD) as model:
            try:
                reason = (await model.analyse(b"\xff\xd8" + bytes(200 << 20)))["error"][0].decode()
            except InferenceRejected as error:  # a server whose gRPC limit is lower than 200 MB
                reason = str(error)
            return reason, await model.analyse(ONE_CELL.read_bytes())

    reason, good = asyncio.run(run())
    assert reason and "\n" not in reason, reason
    assert len(good["boxes"]) == 1


@pytest.mark.parametrize("image", [np.zeros((1, 1, 3), np.uint8), np.full((960, 1280, 3), 235, np.uint8)],
                         ids=["1x1", "blank"])
def test_a_tiny_or_blank_image_has_no_cells(released_server, image):
    result = _grpc_field(released_server, _png(image))
    assert result.as_numpy("error")[0][0] == b""
    assert result.as_numpy("boxes")[0].shape == (0, 4) and result.as_numpy("counts")[0].tolist() == [0, 0]
    assert result.as_numpy("size")[0].tolist() == [image.shape[1], image.shape[0]]
