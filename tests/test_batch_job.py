"""The batch job end to end: real local Ray, real embedded Triton, real fixture fields."""
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cells.contract import MODEL_NAME
from tests.conftest import FIXTURES, check_consistent, fixture_copies, result_tables, run_cli, shared_run

pytestmark = pytest.mark.slow
FIELDS = FIXTURES / "smears"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The fixture fields, plus one of each kind of bad input and an archive holding a field."""
    folder = tmp_path_factory.mktemp("inputs")
    for field in sorted(FIELDS.glob("*.JPG")):
        shutil.copy(field, folder / field.name)
    first = sorted(FIELDS.glob("*.JPG"))[0].read_bytes()
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(first[:4000])
    (folder / "text.png").write_text("not an image")
    import zipfile

    with zipfile.ZipFile(folder / "archive.zip", "w") as archive:
        archive.writestr("inner/field.jpg", first)
    return folder


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory, inputs, repository):
    """The run a newcomer makes: its own Ray and Triton, started and stopped by the job."""
    output = tmp_path_factory.mktemp("out")
    result = run_cli("run", "--input", str(inputs), "--output", str(output), "--repository", str(repository),
                     "--overlays", timeout=900)
    return output, result


def test_embedded_default_writes_every_output(embedded_run):
    output, result = embedded_run
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    cells, slides = check_consistent(output)
    ok = [s for s in slides if s["status"] == "ok"]
    assert len(ok) == len(list(FIELDS.glob("*.JPG"))) + 1  # + the archive member
    assert all(s["cells"] >= 40 for s in ok)  # each fixture field holds ~100 red cells
    errors = {Path(s["field"]).name: s["error"] for s in slides if s["status"] == "error"}
    assert "empty file" in errors["zero.jpg"]
    assert "corrupt or truncated" in errors["truncated.jpg"]
    assert "not an image" in errors["text.png"]
    report = json.loads((output / "run.json").read_text())
    assert report["embedded_triton"] and report["cells"] == len(cells) and report["fields_error"] == 3
    assert report["model"] == MODEL_NAME and report["model_version"] == "1"  # as the server reports it
    assert (output / "slides.csv").read_text().startswith("\"slide\"")
    assert (output / "fields.csv").read_text().startswith("\"slide\",\"field\"")
    assert len(list((output / "overlays").glob("*.png"))) == len(ok)
    for slide in ok:  # overlays are named after their field, and fields.csv says which is whose
        assert slide["overlay"].startswith(f"overlays/{Path(slide['field']).stem}-") and (output / slide["overlay"]).is_file()
    assert "\"overlay\"" in (output / "fields.csv").read_text().splitlines()[0]
    assert "parasitemia %" in result.stdout


def test_rerun_skips_finished_slides(embedded_run, inputs, repository, ray_cluster, server):
    output, _ = embedded_run
    before = result_tables(output)
    again = shared_run(ray_cluster, server, "--input", str(inputs), "--output", str(output), "--repository", str(repository))
    assert again.returncode == 0, again.stderr[-2000:]
    report = json.loads((output / "run.json").read_text())
    assert report["fields_processed_this_run"] == 0 and report["fields_skipped_as_finished"] == len(before[1])
    assert result_tables(output) == before


def test_fields_regrouped_into_slides_without_reprocessing(embedded_run, inputs, repository, ray_cluster, server, tmp_path):
    """A manifest puts two good fields and a truncated one on slide S1: its counts are the good
    fields', the bad one is named, and nothing is classified again."""
    output, _ = embedded_run
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("image,slide\nPA171691.JPG,S1\nPA171772.JPG,S1\ntruncated.jpg,S1\n")
    result = shared_run(ray_cluster, server, "--input", str(inputs), "--output", str(output), "--repository",
                        str(repository), "--group", "manifest", "--manifest", str(manifest))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((output / "run.json").read_text())
    assert report["group"] == "manifest" and report["fields_processed_this_run"] == 0
    cells, fields = check_consistent(output)
    slides = {row["slide"]: row for row in pq.read_table(output / "slides.parquet").to_pylist()}
    one = slides["S1"]
    good = [f for f in fields if Path(f["field"]).name in ("PA171691.JPG", "PA171772.JPG")]
    assert (one["fields"], one["fields_ok"], one["fields_error"]) == (3, 2, 1)
    assert one["cells"] == sum(f["cells"] for f in good) and one["parasitized"] == sum(f["parasitized"] for f in good)
    assert "truncated.jpg: corrupt or truncated" in one["errors"]
    assert report["slides"] == len(slides) == len(fields) - 2
    assert "S1" in result.stdout and "95% CI" in result.stdout


def test_the_threshold_stored_with_the_model_labels_the_cells(embedded_run, repository, ray_cluster, server, tmp_path):
    """A decision.json beside the served model sets the threshold: put it at the median p(parasitized)
    of the first run, and about half the cells of a field are Parasitized, each by p >= threshold."""
    import numpy as np

    from cells.decision import DECISION_FILE, Decision

    cells, _ = result_tables(embedded_run[0])
    threshold = float(np.median([c["p_parasitized"] for c in cells]))
    copy = tmp_path / "repository"
    shutil.copytree(repository, copy)
    decision = Decision(threshold=threshold, validated_on="a test", uninfected=1000, infected=10,
                        thresholds=(threshold,), false_positives=(2,), true_positives=(9,))
    (copy / MODEL_NAME / DECISION_FILE).write_text(json.dumps(decision.to_json()))
    output = tmp_path / "out"
    result = shared_run(ray_cluster, server, "--input", str(FIELDS / "PA171691.JPG"), "--output", str(output),
                        "--repository", str(copy))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((output / "run.json").read_text())
    assert report["threshold"] == threshold and report["threshold_validated_on"] == "a test"
    rows, _ = result_tables(output)
    assert all((r["label"] == "Parasitized") == (r["p_parasitized"] >= np.float32(threshold)) for r in rows)
    assert 0.2 < np.mean([r["label"] == "Parasitized" for r in rows]) < 0.8
    slide = pq.read_table(output / "slides.parquet").to_pylist()[0]
    assert slide["call"] == "positive" and sum(report["calls"].values()) == 1  # far above 0.2 % false positives


def test_resume_after_a_killed_run(inputs, repository, ray_cluster, server, tmp_path):
    many = fixture_copies(tmp_path / "many", 4)
    output = tmp_path / "out"
    command = [sys.executable, "-m", "smearscope", "run", "--input", str(many), "--output", str(output),
               "--repository", str(repository), "--max-pending", "1", "--ray-address", ray_cluster.address,
               "--triton-url", server.grpc_url]
    process = subprocess.Popen(command, env=ray_cluster.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list((output / "parts").glob("*.parquet"))) < 2:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = len(list((output / "parts").glob("*.parquet")))
    assert 2 <= finished < 12, "the run was not interrupted mid-way"
    resumed = shared_run(ray_cluster, server, "--input", str(many), "--output", str(output), "--repository", str(repository))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    report = json.loads((output / "run.json").read_text())
    assert report["fields_skipped_as_finished"] >= finished  # a worker may have finished its field after the kill
    assert report["fields_skipped_as_finished"] + report["fields_processed_this_run"] == 12
    _, slides = check_consistent(output)
    assert len(slides) == 12 and all(s["status"] == "ok" for s in slides)


def test_nothing_processable_exits_nonzero(tmp_path, repository, ray_cluster, server):
    (tmp_path / "bad.jpg").write_bytes(b"")
    result = shared_run(ray_cluster, server, "--input", str(tmp_path / "bad.jpg"), "--output", str(tmp_path / "out"),
                        "--repository", str(repository))
    assert result.returncode != 0
    missing = run_cli("run", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "out2"), timeout=60)
    assert missing.returncode != 0 and "input not found" in missing.stderr and "Traceback" not in missing.stderr


def documented(command: str, **replace: str) -> list[str]:
    """The line of docs/usage.md that starts with `command`, as a shell splits it, placeholders replaced."""
    line = next(line for line in (ROOT / "docs" / "usage.md").read_text().splitlines() if line.startswith(command))
    return [replace.get(word, word) for word in shlex.split(line.split("  #")[0])]


def test_ray_job_submit_and_stop_as_documented(server, ray_cluster, tmp_path):
    """A real `ray start --head` with its dashboard and the project's environment first on PATH, as
    docs/usage.md says to start it; `ray job submit` and `ray job stop` exactly as written there."""
    output, stopped = tmp_path / "out", tmp_path / "stopped"
    many = fixture_copies(tmp_path / "many", 8)

    def ray(*words: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(words, env=ray_cluster.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)

    places = {"http://HEAD:8265": ray_cluster.dashboard_url, "HOST:8001": server.grpc_url}
    submit = ray(*documented("ray job submit", **places, **{"/data/smears": str(FIELDS), "/data/results": str(output)}))
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-2000:]
    job = re.search(r"Job '(\S+)' submitted successfully", submit.stdout).group(1)
    status = ray("ray", "job", "status", "--address", ray_cluster.dashboard_url, job, timeout=60)
    assert f"Job '{job}' succeeded" in status.stdout, status.stdout + status.stderr  # submit exits 0 for STOPPED jobs too
    assert "slides of" in submit.stdout  # the job's own summary line, streamed from its logs

    words = documented("ray job submit", **places, **{"/data/smears": str(many), "/data/results": str(stopped)})
    running = ray(*words[:3], "--no-wait", *words[3:])  # the same job, not waited for
    job = re.search(r"Job '(\S+)' submitted successfully", running.stdout).group(1)
    deadline = time.monotonic() + 300
    while len(list((stopped / "parts").glob("*.parquet"))) < 2:
        assert time.monotonic() < deadline, "the job made no progress"
        time.sleep(0.05)
    stop = ray(*documented("ray job stop", **places, JOB_ID=job), timeout=120)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    logs = ray("ray", "job", "logs", "--address", ray_cluster.dashboard_url, job, timeout=60).stdout
    finished = len(list((stopped / "parts").glob("*.parquet")))
    assert finished < 24, "the premise: the job was stopped mid-way"
    said = re.search(r"interrupted: (\d+) of", logs)  # stopped by its own handler, not SIGKILL
    assert said and 2 <= int(said.group(1)) <= finished, logs[-2000:]
    assert not (stopped / "cells.parquet").exists() and not list((stopped / "parts").glob(".tmp-*"))
    _, slides = check_consistent(output)
    assert len(slides) == len(list(FIELDS.glob("*.JPG"))) and all(s["status"] == "ok" for s in slides)
    report = json.loads((output / "run.json").read_text())
    assert report["triton_urls"] == [server.grpc_url] and not report["embedded_triton"]


def test_evaluate_slides_scores_the_run_against_annotations(embedded_run):
    output, _ = embedded_run
    result = run_cli("evaluate-slides", "--results", str(output), "--annotations", str(FIELDS / "annotations.json"))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((output / "evaluation.json").read_text())
    assert report["slides"] == 3  # the archive member's name is not annotated
    detection = report["detection"]
    assert detection["f1"] >= 0.93  # measured 0.960 on these three fields
    assert detection["tp"] + detection["fn"] >= 300
    kinds = detection["errors"]
    assert sum(v for k, v in kinds.items() if k.startswith("fp")) == detection["fp"]
    assert sum(v for k, v in kinds.items() if k.startswith("fn")) == detection["fn"]
    assert report["infected_cells_found"] >= 9  # 10 of 11 annotated infected cells are found
    for share in ("infected_called_parasitized", "uninfected_called_parasitized"):
        assert 0.0 <= report[share] <= 1.0
    slides = {Path(row["field"]).name: row for row in pq.read_table(output / "fields.parquet").to_pylist()}
    for row in report["per_slide"]:
        assert row["parasitemia_reported_pct"] == round(slides[row["slide"]]["parasitemia_pct"], 2)
    # infected / annotated cells clear of the edge, counted in annotations.json by hand
    annotated = {row["slide"]: row["parasitemia_annotated_pct"] for row in report["per_slide"]}
    assert annotated == {"PA171691.JPG": 2.88, "PA171772.JPG": 4.12, "PA171862.JPG": 2.24}
    errors = [abs(r["parasitemia_reported_pct"] - r["parasitemia_annotated_pct"]) for r in report["per_slide"]]
    assert report["parasitemia_pct"]["mean_absolute_error_points"] == pytest.approx(sum(errors) / 3, abs=0.01)
    close = [r for r in report["per_slide"]
             if abs(r["parasitemia_reported_pct"] - r["parasitemia_annotated_pct"]) <= 0.25 * r["parasitemia_annotated_pct"]]
    assert report["within_25_percent"] == {"fields_with_parasites": 3, "within": len(close), "share": len(close) / 3}
    assert sum(report["calls"]["with_parasites"].values()) == 3 and not report["calls"]["without_parasites"]
    annotated_fields = [slides[row["slide"]] for row in report["per_slide"]]
    pooled = 100 * sum(f["parasitized"] for f in annotated_fields) / sum(f["cells"] for f in annotated_fields)
    assert report["pooled_parasitemia_pct"]["reported"] == round(pooled, 3)
    assert report["pooled_parasitemia_pct"]["annotated"] == round(100 * 11 / 370, 3)  # 11 infected of 370 cells clear of the edge
