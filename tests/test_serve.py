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
from cells.decision import read_decision
from cells.runtime import OnnxModel
from deploy.client import (
    ClientOptions,
    ContractError,
    InferenceRejected,
    TritonModel,
    check_contract,
    classify,
)
from deploy.embedded import ServeError
from deploy.leftovers import running
from deploy.server import EmbeddedServer, free_port
from tests.conftest import run_cli, sigint_ignored
from train.data import list_samples, load_cells

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def crops(cells_dir):
    return load_cells(list_samples(cells_dir)).images


@pytest.fixture(scope="module")
def expected(repository, crops):
    return OnnxModel(repository / MODEL_NAME / "1" / "model.onnx")(crops)


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
        parameters = {key: value["string_value"] for key, value in config["parameters"].items()}
        assert float(parameters["decision_threshold"]) == read_decision(server.repository / MODEL_NAME).threshold
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
        async with TritonModel(options) as classifier:
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
        async with TritonModel(ClientOptions((server.grpc_url,), batch_size=1000)) as classifier:
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
    with EmbeddedServer(repository, names=(MODEL_NAME,), runtime="onnxruntime") as doomed:
        many = np.concatenate([crops] * 20)  # seconds of work on any CPU: the kill lands mid-way

        async def run():
            options = ClientOptions((doomed.grpc_url, server.grpc_url), batch_size=4, max_in_flight=2, backoff_s=0.05)
            async with TritonModel(options) as classifier:
                task = asyncio.create_task(classifier.classify(many))
                await asyncio.sleep(0.3)
                assert not task.done(), "the premise: the server is killed while crops are still being classified"
                await asyncio.get_running_loop().run_in_executor(None, doomed.kill)
                probabilities = await task
                return probabilities, classifier

        probabilities, classifier = asyncio.run(run())
    assert probabilities.shape == (len(many), 2)
    np.testing.assert_allclose(probabilities, np.concatenate([expected] * 20), atol=1e-5)
    assert classifier.retries_done >= 1


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs; zombies waiting for a reaper do not count."""
    return any(process.pgid == pgid for process in running())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_shutdown_is_prompt_and_leaves_no_process_or_shared_memory(repository, crops, signum):
    """Started with SIGINT ignored (as from `cmd &` in a script), after serving over HTTP with the
    connection kept alive (which held Triton's exit for its whole 30 s timeout), with a request in
    flight: that request is answered or refused as unavailable, and the server is gone promptly."""
    with sigint_ignored():
        running = EmbeddedServer(repository).start()
    pid = running.process.pid
    assert list(Path("/dev/shm").glob(f"pytrtion{pid}-*"))
    kept_alive = httpclient.InferenceServerClient(running.http_url)
    batch = np.concatenate([crops] * 4)
    http_input = httpclient.InferInput("image", list(batch.shape), "UINT8")
    http_input.set_data_from_numpy(batch)
    kept_alive.infer(MODEL_NAME, [http_input])
    in_flight = grpcclient.InferenceServerClient(running.grpc_url)
    grpc_input = grpcclient.InferInput("image", list(batch.shape), "UINT8")
    grpc_input.set_data_from_numpy(batch)
    outcomes = []
    in_flight.async_infer(MODEL_NAME, [grpc_input], lambda result, error: outcomes.append(error or result))
    time.sleep(0.1)
    started = time.monotonic()
    running.process.send_signal(signum)
    assert running.process.wait(60) == 0
    seconds = time.monotonic() - started
    print(f"{signal.Signals(signum).name} to exit: {seconds:.2f} s")
    assert seconds < 20, f"{seconds:.1f} s: the shutdown waited for the idle HTTP connection"
    deadline = time.monotonic() + 10  # children already told to exit may take a moment to be reaped
    while _group_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _group_alive(pid)
    assert not list(Path("/dev/shm").glob(f"pytrtion{pid}-*"))
    (outcome,) = outcomes
    if isinstance(outcome, InferenceServerException):
        assert "UNAVAILABLE" in str(outcome.status()) or "stopping" in str(outcome), outcome
    else:
        assert outcome.as_numpy("probabilities").shape == (len(batch), 2)
    kept_alive.close()
    in_flight.close()


def test_server_exits_when_its_launcher_is_killed(repository):
    # As when a batch run is killed with SIGKILL: nothing in the launcher gets to stop the server.
    script = ("import sys, time; from deploy.server import EmbeddedServer; "
              "print(EmbeddedServer(sys.argv[1], names=(sys.argv[2],)).start().process.pid, flush=True); time.sleep(600)")
    launcher = subprocess.Popen([sys.executable, "-c", script, str(repository), MODEL_NAME], stdout=subprocess.PIPE,
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


def test_a_server_killed_alone_is_cleaned_up_by_the_next_start(repository):
    """`smearscope serve` SIGKILLed by itself (the OOM killer's way): its Triton, stubs and shared memory
    outlive it, and the next server to start on the machine removes them and says so."""
    from deploy.leftovers import orphans

    killed = EmbeddedServer(repository, names=(MODEL_NAME,), runtime="onnxruntime").start()
    pid = killed.process.pid
    os.kill(pid, signal.SIGKILL)
    killed.process.wait()
    left = orphans()
    assert left.live_processes() and list(Path("/dev/shm").glob(f"pytrtion{pid}-*")), "the premise: leftovers"
    with EmbeddedServer(repository, names=(MODEL_NAME,), runtime="onnxruntime") as next_one:
        assert "removed what killed servers left" in Path(next_one.log.name).read_text()
        assert not _group_alive(pid) and not list(Path("/dev/shm").glob(f"pytrtion{pid}-*"))
        assert not left.live_processes() and not left.present_segments()
    killed.stop()  # nothing left of it: only its log


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
    assert empty.returncode != 0 and "no model in repository" in empty.stderr
    assert "Traceback" not in busy.stderr + empty.stderr
    launcher = EmbeddedServer(tmp_path, names=(MODEL_NAME,))  # a launcher's view: the server's own reason
    with pytest.raises(ServeError, match=f"server exited with code 1: .*no model {MODEL_NAME!r}"):
        launcher.start()
    assert not Path(launcher.log.name).exists()  # its log is read for the reason, then removed


def _raw_http(url: str, request: bytes, read: bool = True) -> bytes:
    """Bytes straight onto the server's HTTP socket: what no well-behaved client would send."""
    import socket

    host, port = url.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(request)
        if not read:
            return b""  # closed mid-body: a truncated request
        connection.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := connection.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_garbage_and_truncated_http_bodies_are_refused_and_the_server_keeps_serving(server, crops, expected):
    path = f"/v2/models/{MODEL_NAME}/infer"
    garbage = b"\x00\xffnot json at all{{"
    answers = {
        "garbage JSON": _raw_http(server.http_url, b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                                  b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                                  % len(garbage) + garbage),
        "binary header longer than the body": _raw_http(
            server.http_url, b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nInference-Header-Content-Length: 500\r\n"
            b"Content-Length: 10\r\nConnection: close\r\n\r\n0123456789"),
        "declared tensor larger than its bytes": _raw_http(
            server.http_url, b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body := (
                b'{"inputs":[{"name":"image","shape":[4,128,128,3],"datatype":"UINT8","data":[1,2,3]}]}')), body)),
    }
    for name, answer in answers.items():  # Triton answers unparsable JSON with 500, the rest with 400
        status = answer.split(b"\r\n", 1)[0]
        assert status.startswith((b"HTTP/1.1 400", b"HTTP/1.1 500")), (name, answer[:300])
        assert b'{"error":"' in answer, (name, answer[:300])
    for _ in range(3):  # bodies cut off mid-way: the connection closes with bytes still owed
        _raw_http(server.http_url, b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000000\r\n\r\n{\"inputs\":[", read=False)
    client = httpclient.InferenceServerClient(server.http_url)
    good = httpclient.InferInput("image", [2, 128, 128, 3], "UINT8")
    good.set_data_from_numpy(crops[:2])
    np.testing.assert_allclose(client.infer(MODEL_NAME, [good]).as_numpy("probabilities"), expected[:2], atol=1e-5)
    assert client.is_server_live()


def _tree_rss_mib(pgid: int) -> float:
    """Resident memory of every process of a process group, MiB."""
    total = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            stat = (status.parent / "stat").read_text().rsplit(")", 1)[1].split()
            if int(stat[2]) != pgid:
                continue
            total += next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmRSS:"))
        except (OSError, StopIteration, ValueError):
            continue
    return total / 1024


def test_overload_beyond_the_queue_gets_back_off_then_answers(repository, crops, expected, tmp_path):
    """A server whose queue holds 2 requests, and 32 clients at once: rejections, retries, every answer right."""
    import shutil

    from export.triton_config import ServingParameters, write_model_config

    small = tmp_path / "repo"
    shutil.copytree(repository, small)
    write_model_config(small, ServingParameters(max_queue_size=2))
    with EmbeddedServer(small, names=(MODEL_NAME,), threads=1, runtime="onnxruntime") as running:
        peak = _tree_rss_mib(running.process.pid)
        idle = peak

        async def one_client(index: int) -> tuple[np.ndarray, int]:
            options = ClientOptions((running.grpc_url,), batch_size=4, max_in_flight=1, backoff_s=0.05, retries=30)
            async with TritonModel(options) as classifier:
                return await classifier.classify(crops[index % 8 : index % 8 + 4]), classifier.retries_done

        async def burst():
            nonlocal peak
            tasks = [asyncio.create_task(one_client(i)) for i in range(32)]
            while not all(t.done() for t in tasks):
                peak = max(peak, _tree_rss_mib(running.process.pid))
                await asyncio.sleep(0.05)
            return [t.result() for t in tasks]

        answers = asyncio.run(burst())
        assert running.ready()
    for index, (probabilities, _) in enumerate(answers):
        np.testing.assert_allclose(probabilities, expected[index % 8 : index % 8 + 4], atol=1e-5)
    retried = sum(retries for _, retries in answers)
    assert retried > 0, "the queue limit never rejected anything"
    print(f"overload: 32 clients, queue 2: {retried} rejections retried; server RSS {idle:.0f} MiB idle, "
          f"{peak:.0f} MiB peak")


def test_openvino_serves_both_contracts_with_onnx_runtimes_calls_and_cells(released_server, crops):
    """`--runtime openvino`: the classifier's own OpenVINO INT8 model, answering as it does in process
    and with ONNX Runtime's calls; the detector's cells as ONNX Runtime's."""
    import tritonclient.grpc as grpcclient

    from cells.contract import DETECTOR_INPUT, DETECTOR_NAME, DETECTOR_OUTPUT
    from cells.detect import detector_input
    from cells.detection_eval import load_rgb, same_cells_f1
    from cells.repository import DEFAULT_REPOSITORY, openvino_model, served_onnx
    from cells.runtime import OpenVinoModel
    from tests.conftest import FIXTURES

    field = load_rgb(FIXTURES / "smears" / "PA171691.JPG")
    small, factor = detector_input(field)
    reference = OnnxModel(served_onnx(DEFAULT_REPOSITORY, DETECTOR_NAME), batch_size=1, input_name=DETECTOR_INPUT,
                          output_name=DETECTOR_OUTPUT)(small[None])[0]
    expected = OnnxModel(served_onnx(DEFAULT_REPOSITORY, MODEL_NAME))(crops)
    in_process = OpenVinoModel(openvino_model(DEFAULT_REPOSITORY, MODEL_NAME))(crops)
    running = released_server  # --runtime openvino
    assert f"{MODEL_NAME} ({openvino_model(DEFAULT_REPOSITORY, MODEL_NAME)}, openvino)" in Path(running.log.name).read_text()
    probabilities = classify(ClientOptions((running.grpc_url,), batch_size=16), crops)
    client = grpcclient.InferenceServerClient(running.grpc_url)
    request = grpcclient.InferInput(DETECTOR_INPUT, [1, *small.shape], "UINT8")
    request.set_data_from_numpy(small[None])
    maps = client.infer(DETECTOR_NAME, [request]).as_numpy(DETECTOR_OUTPUT)[0]
    client.close()
    threshold = read_decision(DEFAULT_REPOSITORY / MODEL_NAME).threshold
    assert np.abs(probabilities - in_process).max() < 1e-3  # served in streams as in one request
    assert np.mean((probabilities[:, 0] >= threshold) == (expected[:, 0] >= threshold)) >= 0.97
    assert same_cells_f1([(maps, reference, field.shape[:2], factor)]) >= 0.99
