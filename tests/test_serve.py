"""A real embedded Triton answering tritonclient over HTTP and gRPC, and the project's client."""
import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from cells.contract import MODEL_NAME
from cells.runtime import OnnxClassifier
from deploy.client import (
    ClientOptions,
    ContractError,
    InferenceRejected,
    TritonClassifier,
    check_contract,
    classify,
)
from deploy.server import EmbeddedServer, free_port
from tests.conftest import run_cli
from train.data import list_samples, load_cells

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def crops(cells_dir):
    return load_cells(list_samples(cells_dir)).images


@pytest.fixture(scope="module")
def expected(repository, crops):
    return OnnxClassifier(repository / MODEL_NAME / "1" / "model.onnx")(crops)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_results_equal_onnx_runtime(server, crops, expected, protocol):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    probabilities = classify(ClientOptions((url,), protocol=protocol, batch_size=16), crops)
    assert probabilities.shape == expected.shape
    assert np.max(np.abs(probabilities - expected)) <= 1e-5


def test_sync_clients_health_metadata_config_and_metrics(server, crops, expected):
    import urllib.request

    for client in (grpcclient.InferenceServerClient(server.grpc_url), httpclient.InferenceServerClient(server.http_url)):
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL_NAME)
        assert client.get_server_metadata()
        grpc = isinstance(client, grpcclient.InferenceServerClient)
        metadata = client.get_model_metadata(MODEL_NAME, as_json=True) if grpc else client.get_model_metadata(MODEL_NAME)
        check_contract(metadata, MODEL_NAME)
        config = client.get_model_config(MODEL_NAME, as_json=True)["config"] if grpc else client.get_model_config(MODEL_NAME)
        assert int(config["max_batch_size"]) == 256
        assert config["dynamic_batching"]["preferred_batch_size"] == [16, 32, 64]
        library = grpcclient if grpc else httpclient
        request = library.InferInput("image", [2, 128, 128, 3], "UINT8")
        request.set_data_from_numpy(crops[:2])
        result = client.infer(MODEL_NAME, [request]).as_numpy("probabilities")
        np.testing.assert_allclose(result, expected[:2], atol=1e-5)
        client.close()
    with urllib.request.urlopen(server.metrics_url, timeout=5) as response:
        assert 'nv_inference_request_success{model="malaria_resnet50v2"' in response.read().decode()


def test_concurrent_single_requests_are_batched_by_the_server(server, crops, expected):
    async def run():
        options = ClientOptions((server.grpc_url,), batch_size=1, max_in_flight=48)
        async with TritonClassifier(options) as classifier:
            return await classifier.classify(np.concatenate([crops, crops]))

    probabilities = asyncio.run(run())
    np.testing.assert_allclose(probabilities, np.concatenate([expected, expected]), atol=1e-5)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException):  # statistics stay behind PyTriton's access token
        client.get_inference_statistics(MODEL_NAME)
    stats = client.get_inference_statistics(
        MODEL_NAME, headers={"triton-grpc-protocol-triton-access-token": server.access_token}, as_json=True
    )["model_stats"][0]
    assert int(stats["inference_count"]) > int(stats["execution_count"])
    assert any(int(entry["batch_size"]) > 1 for entry in stats["batch_stats"])


@pytest.mark.parametrize(
    "shape,dtype,message",
    [
        ([1, 128, 128, 3], "FP32", "data-type"),
        ([1, 64, 64, 3], "UINT8", "shape"),
        ([0, 128, 128, 3], "UINT8", ""),
        ([257, 128, 128, 3], "UINT8", "batch"),
    ],
)
def test_invalid_requests_get_clear_errors_and_the_server_keeps_serving(server, crops, expected, shape, dtype, message):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    bad = grpcclient.InferInput("image", shape, dtype)
    bad.set_data_from_numpy(np.zeros(shape, np.float32 if dtype == "FP32" else np.uint8))
    with pytest.raises(InferenceServerException) as error:
        client.infer(MODEL_NAME, [bad])
    assert message in error.value.message().lower()
    good = grpcclient.InferInput("image", [1, 128, 128, 3], "UINT8")
    good.set_data_from_numpy(crops[:1])
    np.testing.assert_allclose(client.infer(MODEL_NAME, [good]).as_numpy("probabilities"), expected[:1], atol=1e-5)


def test_client_splits_oversize_batches_and_never_retries_rejections(server, crops, expected):
    async def run():
        async with TritonClassifier(ClientOptions((server.grpc_url,), batch_size=1000)) as classifier:
            assert classifier.max_batch_size == 256 and classifier.chunk_size() == 256
            many = np.concatenate([crops] * 6)  # 288 crops: two requests
            probabilities = await classifier.classify(many)
            assert classifier.requests_sent == 2
            with pytest.raises(InferenceRejected, match="rejected"):
                await classifier._infer_with_retries(np.zeros((1, 64, 64, 3), np.uint8))
            assert classifier.requests_sent == 3 and classifier.retries_done == 0
            assert len(await classifier.classify(np.zeros((0, 128, 128, 3), np.uint8))) == 0
            with pytest.raises(InferenceRejected, match="uint8"):
                await classifier.classify(crops.astype(np.float32))
            return probabilities

    np.testing.assert_allclose(asyncio.run(run()), np.concatenate([expected] * 6), atol=1e-5)


def test_contract_mismatch_fails_at_connect(server):
    with pytest.raises(ContractError, match="no usable model"):
        classify(ClientOptions((server.grpc_url,), model="not_this_model"), np.zeros((1, 128, 128, 3), np.uint8))
    metadata = {
        "name": MODEL_NAME,
        "inputs": [{"name": "image", "datatype": "FP32", "shape": ["-1", "128", "128", "3"]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": ["-1", "2"]}],
    }
    with pytest.raises(ContractError, match="input"):
        check_contract(metadata, MODEL_NAME)
    metadata["inputs"][0]["datatype"] = "UINT8"
    check_contract(metadata, MODEL_NAME)
    metadata["outputs"][0]["shape"] = ["-1", "3"]
    with pytest.raises(ContractError, match="output"):
        check_contract(metadata, MODEL_NAME)


def test_client_fails_over_from_a_killed_server(server, repository, crops, expected):
    with EmbeddedServer(repository) as doomed:
        many = np.concatenate([crops] * 4)

        async def run():
            options = ClientOptions((doomed.grpc_url, server.grpc_url), batch_size=4, max_in_flight=2, backoff_s=0.05)
            async with TritonClassifier(options) as classifier:
                task = asyncio.create_task(classifier.classify(many))
                await asyncio.sleep(0.3)
                await asyncio.get_running_loop().run_in_executor(None, doomed.kill)
                probabilities = await task
                return probabilities, classifier

        probabilities, classifier = asyncio.run(run())
    assert probabilities.shape == (len(many), 2)
    np.testing.assert_allclose(probabilities, np.concatenate([expected] * 4), atol=1e-5)
    assert classifier.retries_done >= 1


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs; zombies waiting for a reaper do not count."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except OSError:
            continue
        if int(group) == pgid and state != "Z":
            return True
    return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_shutdown_leaves_no_process_or_shared_memory(repository, signum):
    running = EmbeddedServer(repository).start()
    pid = running.process.pid
    assert list(Path("/dev/shm").glob(f"pytrtion{pid}-*"))
    running.process.send_signal(signum)
    assert running.process.wait(30) == 0
    deadline = time.monotonic() + 10  # children already told to exit may take a moment to be reaped
    while _group_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _group_alive(pid)
    assert not list(Path("/dev/shm").glob(f"pytrtion{pid}-*"))


def test_server_exits_when_its_launcher_is_killed(repository):
    # As when a batch run is killed with SIGKILL: nothing in the launcher gets to stop the server.
    script = ("import sys, time; from deploy.server import EmbeddedServer; "
              "print(EmbeddedServer(sys.argv[1]).start().process.pid, flush=True); time.sleep(600)")
    launcher = subprocess.Popen([sys.executable, "-c", script, str(repository)], stdout=subprocess.PIPE,
                                text=True, start_new_session=True)
    server_pid = int(launcher.stdout.readline())
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()
    try:
        deadline = time.monotonic() + 60
        while _group_alive(server_pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _group_alive(server_pid)
        assert not list(Path("/dev/shm").glob(f"pytrtion{server_pid}-*"))
    finally:
        if _group_alive(server_pid):
            os.killpg(server_pid, signal.SIGKILL)


def test_busy_port_and_missing_model_are_one_line_errors(repository, tmp_path):
    import socket

    port = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        busy = run_cli("serve", "--repository", str(repository), "--http-port", str(port),
                       "--grpc-port", str(free_port()), "--metrics-port", str(free_port()), timeout=60)
    assert busy.returncode != 0 and f"127.0.0.1:{port} is not available" in busy.stderr
    empty = run_cli("serve", "--repository", str(tmp_path), timeout=60)
    assert empty.returncode != 0 and "no model 'malaria_resnet50v2'" in empty.stderr
    assert "Traceback" not in busy.stderr + empty.stderr
