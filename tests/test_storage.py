"""Archives in object storage: s3:// inputs and outputs through batch.storage, against a real S3 API
server (moto's, with signatures checked), alone, in a run, and on a cluster whose nodes share no folder."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from batch import storage
from batch.inputs import DEFAULT_MAX_BYTES, expand, iter_slides, read_slide
from cells.repository import DEFAULT_REPOSITORY
from deploy.server import EmbeddedServer
from tests.conftest import BUCKET, FIXTURES, RELEASED_RUNTIME, check_consistent, fixture_copies, shared_run
from tests.s3 import S3Server, aws_env


@pytest.fixture
def s3_env(s3, monkeypatch):
    """This process pointed at the server, as a node would be by its environment."""
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    storage._s3.cache_clear()
    yield s3
    storage._s3.cache_clear()


def _zip_with_filler(path: Path) -> Path:
    """Two fixture fields and a 4 MB member that is not an image: what a range read must skip."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for field in sorted((FIXTURES / "smears").glob("*.JPG"))[:2]:
            archive.write(field, f"fields/{field.name}")
        archive.writestr("scanner/raw.bin", np.random.default_rng(0).bytes(4 << 20))
    return path


def test_local_folders_and_s3_prefixes_through_one_interface(s3_env, tmp_path):
    for base in (str(tmp_path / "out"), f"s3://{BUCKET}/unit"):
        storage.make_output(base)
        storage.atomic_write(storage.join(base, "parts", "a.txt"), "one")
        storage.atomic_write(storage.join(base, "parts", "b.json"), b"{}")
        assert storage.kind(base) == "directory" and storage.kind(storage.join(base, "parts", "a.txt")) == "file"
        assert storage.kind(storage.join(base, "nothing")) == "missing"
        assert storage.list_files(base) == [storage.join(base, "parts", "a.txt"), storage.join(base, "parts", "b.json")]
        assert storage.list_files(storage.join(base, "parts"), "*.json") == [storage.join(base, "parts", "b.json")]
        assert storage.list_files(storage.join(base, "none")) == []
        assert storage.size(storage.join(base, "parts", "a.txt")) == 3
        assert storage.read_bytes(storage.join(base, "parts", "a.txt")) == b"one"
        storage.atomic_write(storage.join(base, "parts", "a.txt"), "two")  # written again: one file, the new one
        assert storage.read_bytes(storage.join(base, "parts", "a.txt")) == b"two"
    with pytest.raises(RuntimeError), storage.atomic_path(f"s3://{BUCKET}/unit/half.txt") as temporary:
        temporary.write_text("half")
        raise RuntimeError("the writer failed")
    assert storage.kind(f"s3://{BUCKET}/unit/half.txt") == "missing"  # whole or not at all


def test_bad_buckets_keys_and_credentials_are_one_line_errors(s3_env, monkeypatch):
    with pytest.raises(storage.StorageError, match=r"^s3://nobucket: bucket not found$"):
        storage.kind("s3://nobucket/fields/a.jpg")
    with pytest.raises(storage.StorageError, match="bucket not found"):
        storage.make_output("s3://nobucket/run")
    with pytest.raises(storage.StorageError, match="not found"):
        storage.size(f"s3://{BUCKET}/missing.jpg")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    storage._s3.cache_clear()
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    assert storage.attempts() == 3
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "none")
    assert storage.attempts() == storage.ATTEMPTS
    with pytest.raises(storage.StorageError, match="access denied") as refused:
        storage.kind(f"s3://{BUCKET}/unit/parts/a.txt")
    assert "not-the-secret" not in str(refused.value) and "\n" not in str(refused.value)


def test_archive_members_and_slide_tiles_are_read_by_range(s3_env, tmp_path):
    import tifffile

    from batch.wsi import open_slide, read_region

    archive = _zip_with_filler(tmp_path / "fields.zip")
    image = np.random.default_rng(1).integers(0, 255, (4096, 4096, 3), np.uint8)
    tifffile.imwrite(tmp_path / "slide.tif", image, tile=(256, 256), photometric="rgb")
    client = s3_env.client()
    for path in (archive, tmp_path / "slide.tif"):
        client.upload_file(str(path), BUCKET, f"range/{path.name}")

    prefix = f"s3://{BUCKET}/range"
    assert expand([f"{prefix}/"]) == [f"{prefix}/fields.zip", f"{prefix}/slide.tif"]
    assert expand([f"{prefix}/*.zip"]) == expand([f"{prefix}/fields.zip"]) == [f"{prefix}/fields.zip"]
    with pytest.raises(FileNotFoundError, match="input not found"):
        expand([f"{prefix}/*.png"])

    before = storage.bytes_read()
    slides = list(iter_slides([f"s3://{BUCKET}/range/fields.zip"]))
    members = [read_slide(slide, DEFAULT_MAX_BYTES) for slide in slides]
    fetched = storage.bytes_read() - before
    assert [len(data) for data in members] == [p.stat().st_size for p in sorted((FIXTURES / "smears").glob("*.JPG"))[:2]]
    assert fetched < sum(map(len, members)) + (64 << 10) < archive.stat().st_size / 4  # the 4 MB member never read

    before = storage.bytes_read()
    whole = open_slide(f"s3://{BUCKET}/range/slide.tif", 1_000_000)
    region = read_region(whole.path, (1000, 1000, 512, 300))
    assert np.array_equal(region, image[1000:1300, 1000:1512])
    assert storage.bytes_read() - before < (tmp_path / "slide.tif").stat().st_size / 10  # 6 of 256 tiles, and the index


def _rows(output: Path) -> dict[str, tuple]:
    """Each field's status, counts and cells (box, label, probability), keyed by its file name."""
    cells, fields = check_consistent(output)
    return {field["field"].rsplit("/", 1)[-1]: (field["status"], field["error"], field["cells"], field["parasitized"],
                                                tuple((c["x"], c["y"], c["w"], c["h"], c["label"], round(c["p_parasitized"], 5))
                                                      for c in cells if c["field"] == field["field"]))
            for field in fields}


def _run(s3: S3Server, inputs: list[str], output: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """A run that must stop before it starts anything (a bad location): no cluster or server needed."""
    return subprocess.run([sys.executable, "-m", "smearscope", "run", "--input", *inputs, "--output", output],
                          env=env or aws_env(s3), capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_a_run_from_and_to_s3_equals_the_same_run_on_local_files(s3, ray_cluster, released_server, tmp_path):
    local = tmp_path / "inputs"
    fixture_copies(local / "fields", 1)
    _zip_with_filler(local / "archives" / "fields.zip")
    (local / "bad").mkdir()
    (local / "bad" / "notes.jpg").write_text("not an image")
    (local / "bad" / "big.jpg").write_bytes(b"\xff\xd8" + bytes(3 << 20))
    s3.upload(BUCKET, local, "inputs")
    limit = ["--max-bytes", str(2 << 20)]

    def run(inputs: str, output: str) -> subprocess.CompletedProcess:
        return shared_run(ray_cluster, released_server, "--input", inputs, "--output", output, *limit)

    remote = run(f"s3://{BUCKET}/inputs/", f"s3://{BUCKET}/runs/one")
    assert remote.returncode == 0, remote.stdout[-2000:] + remote.stderr[-3000:]
    on_disk = run(str(local), str(tmp_path / "local"))
    assert on_disk.returncode == 0, on_disk.stderr[-3000:]

    downloaded = s3.download(BUCKET, "runs/one", tmp_path / "downloaded")
    rows = _rows(downloaded)
    assert rows == _rows(tmp_path / "local") and len(rows) == 3 + 2 + 2
    assert rows["notes.jpg"][1].startswith("not an image") and rows["big.jpg"][1].startswith("file too large")
    report = json.loads((downloaded / "run.json").read_text())
    members = sum(p.stat().st_size for p in sorted((FIXTURES / "smears").glob("*.JPG"))[:2])
    fields = sum(p.stat().st_size for p in (local / "fields").iterdir())
    assert fields + members <= report["input_bytes_read_by_workers"] < fields + members + (256 << 10)  # no big.jpg, no filler
    for result in (remote, on_disk):
        assert s3.env["AWS_SECRET_ACCESS_KEY"] not in result.stdout + result.stderr
    assert s3.env["AWS_SECRET_ACCESS_KEY"] not in (downloaded / "run.json").read_text()

    again = run(f"s3://{BUCKET}/inputs/", f"s3://{BUCKET}/runs/one")  # resumes: every field done
    assert again.returncode == 0 and json.loads(storage_text(s3, "runs/one/run.json"))["fields_skipped_as_finished"] == 7


def storage_text(s3: S3Server, key: str) -> str:
    return s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()


@pytest.mark.slow
def test_bad_locations_stop_a_run_at_once_in_one_line(s3):
    wrong = aws_env(s3, AWS_SECRET_ACCESS_KEY="not-the-secret")
    cases = [
        (["s3://nobucket/fields/"], f"s3://{BUCKET}/runs/x", None, "s3://nobucket: bucket not found"),
        ([f"s3://{BUCKET}/inputs/missing.jpg"], f"s3://{BUCKET}/runs/x", None, f"input not found: s3://{BUCKET}/inputs/missing.jpg"),
        ([str(FIXTURES / "smears")], "s3://nobucket/runs/x", None, "s3://nobucket: bucket not found"),
        ([f"s3://{BUCKET}/inputs/"], f"s3://{BUCKET}/runs/x", wrong, "access denied"),
    ]
    for inputs, output, env, message in cases:
        result = _run(s3, inputs, output, env=env)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1 and message in lines[0], result.stderr[-2000:]
        assert "not-the-secret" not in result.stderr + result.stdout


@pytest.mark.slow
def test_a_store_that_stops_mid_run_loses_fields_and_the_rerun_finishes_them(s3, ray_cluster, released_server, tmp_path):
    """The session's store stopped mid-run and started again (moto keeps its buckets in this process,
    so a store of the test's own would be the same store): the one test that stops a shared server."""
    folder = fixture_copies(tmp_path / "fields", 6)
    s3.upload(BUCKET, folder, "stopping")
    output = f"s3://{BUCKET}/runs/stopping"
    job = subprocess.Popen([sys.executable, "-m", "smearscope", "run", "--input", f"s3://{BUCKET}/stopping/",
                            "--output", output, "--max-pending", "2", "--ray-address", ray_cluster.address,
                            "--triton-url", released_server.grpc_url], env=ray_cluster.env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while len(s3.keys(BUCKET, "runs/stopping/parts/")) < 2:
        assert job.poll() is None and time.monotonic() < deadline, job.stdout.read()[-2000:] if job.poll() else "no part"
        time.sleep(0.1)
    s3.stop()
    try:
        log, _ = job.communicate(timeout=600)
    finally:
        s3.start()
    done = len(s3.keys(BUCKET, "runs/stopping/parts/"))
    assert job.returncode == 1 and 2 <= done < 18, log[-3000:]  # the premise: stopped with fields still to do
    assert f"storage unavailable after {s3.env['AWS_MAX_ATTEMPTS']} attempts" in log

    rerun = shared_run(ray_cluster, released_server, "--input", f"s3://{BUCKET}/stopping/", "--output", output)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    report = json.loads(storage_text(s3, "runs/stopping/run.json"))
    assert report["fields_skipped_as_finished"] == done and report["fields_processed_this_run"] == 18 - done
    check_consistent(s3.download(BUCKET, "runs/stopping", tmp_path / "downloaded"))


@pytest.mark.slow
def test_three_nodes_sharing_no_folder_read_and_write_s3_with_a_triton_killed(s3, ray_cluster, released_server, tmp_path):
    """Input and output in the bucket, each node in its own folder: the same cells as a run on local
    files, each field once, though one of the two servers (this test's own) is killed mid-run."""
    folder = fixture_copies(tmp_path / "fields", 4)
    s3.upload(BUCKET, folder, "cluster")
    cluster, kept = ray_cluster, released_server
    before = {p for node in cluster.node_dirs for p in node.rglob("*") if p.is_file()}
    with EmbeddedServer(DEFAULT_REPOSITORY, threads=1, runtime=RELEASED_RUNTIME) as doomed:
        def command(inputs: str, output: str, urls: list[str]) -> list[str]:
            return [sys.executable, "-m", "smearscope", "run", "--input", inputs, "--output", output,
                    "--ray-address", cluster.address, "--triton-url", *urls]

        local = subprocess.run(command(str(folder), str(tmp_path / "local"), [kept.grpc_url]), env=cluster.env,
                               capture_output=True, text=True, timeout=900)
        assert local.returncode == 0, local.stderr[-3000:]
        driver = tmp_path / "driver"
        driver.mkdir()
        job = subprocess.Popen(command(f"s3://{BUCKET}/cluster/", f"s3://{BUCKET}/runs/cluster",
                                       [doomed.grpc_url, kept.grpc_url]),
                               env=cluster.env, cwd=driver, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 300
        while len(s3.keys(BUCKET, "runs/cluster/parts/")) < 2:
            assert job.poll() is None and time.monotonic() < deadline, "no part written"
            time.sleep(0.1)
        doomed.kill()
        log, _ = job.communicate(timeout=900)
        assert job.returncode == 0, log[-3000:]
        node_files = {p for node in cluster.node_dirs for p in node.rglob("*") if p.is_file()} - before
    downloaded = s3.download(BUCKET, "runs/cluster", tmp_path / "downloaded")
    assert _rows(downloaded) == _rows(tmp_path / "local") and len(_rows(downloaded)) == 12
    report = json.loads((downloaded / "run.json").read_text())
    assert len(report["nodes"]) == 3 and report["triton_requests"][kept.grpc_url]["answered"] > 0
    assert not node_files and not any(driver.iterdir())  # nothing written to a node's own folder


@pytest.mark.slow
def test_bench_storage_reports_both_runs_and_the_libraries(s3, tmp_path):
    out = tmp_path / "storage.json"
    result = subprocess.run([sys.executable, "-m", "smearscope", "bench", "storage", "--fields", str(FIXTURES / "smears"),
                             "--prefix", f"s3://{BUCKET}/bench", "--max-fields", "1", "--out", str(out)],
                            env=aws_env(s3), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    field = sorted((FIXTURES / "smears").glob("*.JPG"))[0].stat().st_size
    for run in report["runs"].values():
        assert run["cells"] > 0 and run["input_bytes_per_field"] == field
    assert report["libraries"]["pyarrow"]["whole"]["mb_per_s"] > 0 and report["s3_vs_local"] > 0
