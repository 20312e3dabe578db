"""The Triton client's pure parts, without a server: retry rules, the contract check, server choice."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from cells.contract import INPUT_SHAPE, MODEL_NAME
from cells.errors import BadInput
from deploy.client import (
    ClientOptions, ContractError, RequestTally, TritonModel, _Server, check_contract, is_retryable,
)


def metadata(**changes) -> dict:
    served = {
        "name": MODEL_NAME,
        "versions": ["1"],
        "inputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, *INPUT_SHAPE]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]}],
    }
    return served | changes


@pytest.mark.parametrize("status", ["StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "503", "429"])
def test_server_side_congestion_is_retried(status):
    assert is_retryable(InferenceServerException("busy", status=status))


@pytest.mark.parametrize("status", ["StatusCode.INVALID_ARGUMENT", "400", "StatusCode.NOT_FOUND"])
def test_rejected_requests_are_not_retried(status):
    assert not is_retryable(InferenceServerException("bad shape", status=status))


def test_transport_failures_are_retried_and_bugs_are_not():
    assert is_retryable(ConnectionRefusedError()) and is_retryable(asyncio.TimeoutError())
    assert is_retryable(InferenceServerException("failed to connect to all addresses"))
    assert not is_retryable(KeyError("probabilities"))


def test_contract_check_accepts_the_contract():
    check_contract(metadata(), MODEL_NAME)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"name": "other"}, "server model is 'other'"),
        ({"inputs": []}, "has 0 inputs"),
        ({"inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, *INPUT_SHAPE]}]}, "input is"),
        ({"outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}]}, "output is"),
    ],
)
def test_contract_check_names_the_mismatch(changes, message):
    with pytest.raises(ContractError, match=message):
        check_contract(metadata(**changes), MODEL_NAME)


def test_options_refuse_bad_settings():
    with pytest.raises(BadInput, match="protocol"):
        ClientOptions(("a:1",), protocol="udp")
    with pytest.raises(BadInput, match="at least one"):
        ClientOptions(())


def test_round_robin_skips_servers_marked_down_and_falls_back_to_the_soonest_back():
    classifier = TritonModel(ClientOptions(("a:1", "b:1", "c:1")))
    classifier.servers = [_Server(url, client=None) for url in ("a:1", "b:1", "c:1")]
    assert [classifier._next_server().url for _ in range(4)] == ["a:1", "b:1", "c:1", "a:1"]
    now = time.monotonic()
    classifier.servers[1].down_until = now + 60
    assert {classifier._next_server().url for _ in range(4)} == {"a:1", "c:1"}
    for index, server in enumerate(classifier.servers):
        server.down_until = now + 10 * (index + 1)
    assert classifier._next_server().url == "a:1"


def test_chunks_never_exceed_the_servers_max_batch():
    classifier = TritonModel(ClientOptions(("a:1",), batch_size=64))
    assert classifier.chunk_size() == 64
    classifier.max_batch_size = 16
    assert classifier.chunk_size() == 16


def test_first_up_sends_everything_to_the_first_server_until_it_is_down():
    classifier = TritonModel(ClientOptions(("local:1", "b:1", "c:1"), policy="first-up"))
    classifier.servers = [_Server(url, client=None) for url in ("local:1", "b:1", "c:1")]
    assert {classifier._next_server().url for _ in range(5)} == {"local:1"}
    classifier.servers[0].down_until = time.monotonic() + 60
    assert {classifier._next_server().url for _ in range(5)} == {"b:1"}


def test_a_failing_server_is_left_for_another_that_is_up(monkeypatch):
    """Retries go to the next server at once; the failing one's back-off doubles while it keeps failing."""
    sleeps = []
    real_sleep = asyncio.sleep

    async def recorded_sleep(seconds, *args):
        sleeps.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", recorded_sleep)

    class Down:
        async def infer(self, *_, **__):
            raise ConnectionRefusedError("down")

    class Up:
        async def infer(self, *_, **__):
            return "answer"

    async def run() -> tuple[TritonModel, RequestTally]:
        classifier = TritonModel(ClientOptions(("local:1", "b:1"), policy="first-up", backoff_s=10))
        classifier.servers = [_Server("local:1", Down()), _Server("b:1", Up())]
        classifier._infer = lambda server, chunk: server.client.infer()
        tally = RequestTally()
        results = [await classifier._infer_with_retries(np.zeros(1), tally) for _ in range(3)]
        assert results == ["answer"] * 3
        return classifier, tally

    classifier, tally = asyncio.run(run())
    assert sleeps == []  # no back-off sleep while a server is up
    assert tally.as_dict() == {"b:1": {"answered": 3, "failed": 0}, "local:1": {"answered": 0, "failed": 1}}
    assert classifier.servers[0].failures == 1 and classifier.servers[0].down_until > time.monotonic() + 4  # backoff_max_s caps it at 5 s
