"""Scale-out and faults on a real local cluster: the session's head and two worker nodes, two Triton
servers (the session's released server and one of this module's). What a test kills is its own: a
server it started, a node it added, a worker process of its own job.

Every fault run must end with each slide once, each cell once, and the same results as a clean run.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cells.repository import DEFAULT_REPOSITORY
from deploy.server import EmbeddedServer
from tests.cluster import LocalCluster
from tests.conftest import RELEASED_RUNTIME, check_consistent, fixture_copies

pytestmark = pytest.mark.slow
COPIES = 4  # 3 fixture fields x 4 = 12 slides: at most 6 in flight (2 a CPU), so a run stopped after 2 is mid-way


@pytest.fixture(scope="module")
def cluster(ray_cluster):
    return ray_cluster


@pytest.fixture(scope="module")
def servers(released_server):
    with EmbeddedServer(DEFAULT_REPOSITORY, threads=1, runtime=RELEASED_RUNTIME) as second:
        yield released_server, second


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    return fixture_copies(tmp_path_factory.mktemp("slides"), COPIES)


def command(cluster: LocalCluster, slides: Path, output: Path, urls: list[str], *extra: str) -> list[str]:
    return [sys.executable, "-m", "smearscope", "run", "--input", str(slides), "--output", str(output),
            "--ray-address", cluster.address, "--triton-url", *urls, *extra]


def run_job(cluster: LocalCluster, slides: Path, output: Path, urls: list[str], *extra: str) -> dict:
    result = subprocess.run(command(cluster, slides, output, urls, *extra), env=cluster.env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return json.loads((output / "run.json").read_text())


def start_job(cluster: LocalCluster, slides: Path, output: Path, urls: list[str]) -> subprocess.Popen:
    return subprocess.Popen(command(cluster, slides, output, urls), env=cluster.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for_parts(output: Path, count: int, job: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while len(list((output / "parts").glob("*.parquet"))) < count:
        assert job.poll() is None, f"the job ended before {count} slides were done: {job.stdout.read()[-2000:]}"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.1)


def finish(job: subprocess.Popen) -> str:
    output, _ = job.communicate(timeout=900)
    assert job.returncode == 0, output[-3000:]
    return output


def by_slide(output: Path) -> dict[str, tuple]:
    """Each field's counts and cells (box, label, probability), keyed by file name."""
    cells, fields = check_consistent(output)
    rows = {}
    for field in fields:
        mine = [(c["x"], c["y"], c["w"], c["h"], c["label"], round(c["p_parasitized"], 5))
                for c in cells if c["field"] == field["field"]]
        rows[Path(field["field"]).name] = (field["status"], field["cells"], field["parasitized"], tuple(mine))
    return rows


@pytest.fixture(scope="module")
def clean(cluster, servers, slides, tmp_path_factory):
    """A run with nothing going wrong, over both servers: the reference for every fault run."""
    output = tmp_path_factory.mktemp("clean")
    report = run_job(cluster, slides, output, [servers[0].grpc_url, servers[1].grpc_url])
    return output, report, by_slide(output)


def test_a_clean_run_spreads_over_three_nodes_and_two_servers(clean, servers):
    _, report, rows = clean
    assert len(rows) == 3 * COPIES and all(status == "ok" for status, *_ in rows.values())
    assert len(report["nodes"]) == 3 and all(node["slides"] > 0 for node in report["nodes"].values())
    assert sum(node["cells"] for node in report["nodes"].values()) == report["cells"]
    requests = report["triton_requests"]
    assert set(requests) == {s.grpc_url for s in servers} and all(r["answered"] > 0 for r in requests.values())
    assert report["driver_bytes_per_cell"] < 1000  # rows, not crops (a crop is 49,152 bytes)
    print(f"three-node run: {json.dumps({k: report[k] for k in ('nodes', 'triton_requests', 'driver_cpu_ms_per_cell', 'driver_bytes_per_cell', 'cells_per_second')})}")


def test_node_local_server_first(cluster, servers, tmp_path):
    """{node}:PORT with first-up: every request goes to the server on the worker's own node."""
    (address,) = set(cluster.node_addresses())  # one machine: every node has the same address
    output = tmp_path / "out"
    with EmbeddedServer(DEFAULT_REPOSITORY, host=address, threads=1, runtime=RELEASED_RUNTIME) as local:
        report = run_job(cluster, fixture_copies(tmp_path / "slides", 1), output,
                         [f"{{node}}:{local.grpc_port}", servers[1].grpc_url], "--triton-policy", "first-up")
    requests = report["triton_requests"]
    assert list(requests) == [local.grpc_url] and requests[local.grpc_url]["failed"] == 0


def test_one_of_two_triton_servers_killed_mid_run(cluster, servers, slides, clean, tmp_path):
    output = tmp_path / "out"
    with EmbeddedServer(DEFAULT_REPOSITORY, threads=1, runtime=RELEASED_RUNTIME) as doomed:
        job = start_job(cluster, slides, output, [doomed.grpc_url, servers[1].grpc_url])
        wait_for_parts(output, 2, job)
        doomed.kill()
        finish(job)
    assert by_slide(output) == clean[2]
    requests = json.loads((output / "run.json").read_text())["triton_requests"]
    assert requests[servers[1].grpc_url]["answered"] > 0


def test_a_killed_worker_process_has_its_slide_retried(cluster, servers, slides, clean, tmp_path):
    output = tmp_path / "out"
    job = start_job(cluster, slides, output, [servers[0].grpc_url])
    wait_for_parts(output, 2, job)
    busy = subprocess.run(["pgrep", "-f", "ray::analyse_slide"], capture_output=True, text=True).stdout.split()
    assert busy, "no worker was running a slide"
    os.kill(int(busy[0]), signal.SIGKILL)
    finish(job)
    assert by_slide(output) == clean[2]


def test_a_killed_worker_node_has_its_slides_retried_elsewhere(cluster, servers, slides, clean, tmp_path):
    output = tmp_path / "out"
    doomed = cluster.add_node()
    try:
        job = start_job(cluster, slides, output, [servers[0].grpc_url, servers[1].grpc_url])
        wait_for_parts(output, 2, job)
        cluster.kill_node(doomed)
        finish(job)
    finally:
        cluster.nodes.remove(doomed)
    assert by_slide(output) == clean[2]


@pytest.mark.parametrize("signum,sigint", [(signal.SIGINT, "ignored"), (signal.SIGINT, "default"),
                                           (signal.SIGTERM, "default"), (signal.SIGKILL, "default")])
def test_an_interrupted_driver_stops_at_once_and_resumes(cluster, servers, slides, clean, tmp_path, signum, sigint):
    """SIGINT or SIGTERM, with SIGINT inherited ignored (`cmd &` in a script, nohup, CI) or not: the
    driver abandons the slides in flight, says how far it got and exits 130/143, leaving only whole
    parts and no tables; SIGKILL leaves whole parts too. The rerun finishes the rest, equal to a clean run."""
    output = tmp_path / "out"
    disposition = signal.SIG_IGN if sigint == "ignored" else signal.SIG_DFL
    job = subprocess.Popen(command(cluster, slides, output, [servers[0].grpc_url]), env=cluster.env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, disposition))
    wait_for_parts(output, 2, job)
    started = time.monotonic()
    os.killpg(job.pid, signum)
    printed, _ = job.communicate(timeout=120)
    seconds = time.monotonic() - started
    finished = len(list((output / "parts").glob("*.parquet")))
    total = 3 * COPIES
    assert 2 <= finished < total, "the run was not interrupted mid-way"
    assert not list((output / "parts").glob(".tmp-*")) and not (output / "cells.parquet").exists()
    assert not (output / "run.json").exists()
    if signum != signal.SIGKILL:
        assert job.returncode == 128 + signum, printed[-2000:]
        said = re.search(r"interrupted: (\d+) of (at least )?\d+ slides done; rerun the same command to resume", printed)
        assert said and 2 <= int(said.group(1)) <= finished, printed[-2000:]  # a worker may finish a part after
        print(f"{signal.Signals(signum).name} (SIGINT {sigint}) to exit: {seconds:.2f} s, {finished} of {total} done")
        assert seconds < 60, "the driver did not stop promptly"
    report = run_job(cluster, slides, output, [servers[0].grpc_url])
    # Every field either found finished or processed now, once; a worker of the stopped run that
    # finished its field after the count above only adds a part the rerun then skips.
    assert report["fields_skipped_as_finished"] >= finished
    assert report["fields_skipped_as_finished"] + report["fields_processed_this_run"] == total
    resumed = by_slide(output)
    assert len(resumed) == total
    for name, row in resumed.items():  # each copy as the clean run's first copy of the same field
        assert row == clean[2]["0-" + name.split("-", 1)[1]], name
