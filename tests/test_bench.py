"""The benchmark commands produce well-formed reports on the fixtures (numbers are not asserted: no timing here)."""
from __future__ import annotations

import csv
import json

import pytest

from tests.conftest import FIXTURES, run_cli

pytestmark = pytest.mark.slow


def test_bench_serve_reports_the_grid_with_latencies_and_server_times(repository, tmp_path):
    out = tmp_path / "serving.csv"
    result = run_cli("bench", "serve", "--repository", str(repository), "--out", str(out), "--protocols", "grpc", "http",
                     "--batches", "1", "64", "--concurrencies", "2", "--images", "128", timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    assert {(r["protocol"], r["batch"]) for r in rows} == {("grpc", "1"), ("grpc", "64"), ("http", "1"), ("http", "64")}
    for row in rows:
        assert float(row["images_per_s"]) > 0
        assert float(row["p50_ms"]) <= float(row["p95_ms"]) <= float(row["p99_ms"])
        assert float(row["server_compute_ms"]) > 0 and float(row["server_queue_ms"]) >= 0
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["in_process_images_per_s"] > 0 and summary["triton_overhead_at_batch_64"] is not None
    assert "perf_analyzer -m malaria_resnet50v2" in summary["perf_analyzer"] and "-b 64" in summary["perf_analyzer"]


def test_bench_batch_sets_the_job_beside_the_bare_models(repository, tmp_path):
    out = tmp_path / "batch.json"
    result = run_cli("bench", "batch", "--fields", str(FIXTURES / "smears"), "--repository", str(repository),
                     "--out", str(out), "--max-fields", "1", "--tutorial-images", "4", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["fields"] == 1 and report["stages"]["cells"] == report["job"]["cells"] > 0
    assert set(report["stages"]["core_ms_per_cell"]) == {"decode", "find", "crop", "stain"}
    for key in ("shipped", "onnx_fp32", "tutorial"):
        assert report[key]["images_per_s"] > 0 and report[key]["peak_rss_mib"] > 0
    assert 0 < report["job"]["startup_s"] < report["job"]["wall_s"] and report["job"]["peak_rss_mib"] > 0
    assert (report["runtime"], report["baseline_runtime"]) == ("auto", "onnxruntime")  # today's default against ONNX Runtime
    for run in (report["job"], report["job_baseline"]):
        assert run["cells"] > 0 and run["peak_rss_mib_by_process"]["smearscope serve (the models)"] > 0
    assert set(report["ratios"]) == set(report["targets"]) and report["cpu"]
    table = out.with_suffix(".md").read_text()
    assert "| job_vs_shipped |" in table and "| job_vs_baseline_runtime |" in table
    assert "smearscope run --runtime auto" in table and "| `--runtime onnxruntime` |" in table


def test_bench_shutdown_times_a_signalled_server_and_run(tmp_path):
    out = tmp_path / "shutdown.json"
    result = run_cli("bench", "shutdown", "--out", str(out), "--repeats", "1", "--cases", "serve-idle", "run",
                     timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    (served,) = report["runs"]["serve-idle"]
    assert served["exit_code"] == 0 and served["seconds"] > 0 and report["cpu"]
    (run,) = report["runs"]["run"]  # stopped once two of its fields' parts were written
    assert run["exit_code"] == 143 and 2 <= run["fields_done"] < run["fields"]


def test_bench_feed_reports_the_pipeline_around_stand_in_models(tmp_path):
    out = tmp_path / "feed.json"
    result = run_cli("bench", "feed", "--fields", str(FIXTURES / "smears"), "--out", str(out), "--distinct", "3",
                     "--total", "6", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    for key in ("cpu", "cores", "feed_core_ms_per_cell", "driver_us_per_cell", "driver_bytes_per_cell", "busy_cores",
                "core_ms_per_cell_by_process", "stages_core_ms_per_cell"):
        assert report[key], key
    assert report["fields"] == 6 and report["cells"] > 0
    assert report["crops"] == "graph" and report["graph_core_ms_per_cell"] > 0
    for key in ("host_core_ms_per_cell", "host_core_ms_per_cell_by_component", "steady_core_ms_per_cell_by_process"):
        assert key in report, key
    # The workers send each field as stored (a JPEG of ~100 cells), not 49 KB crops per cell.
    assert 0 < report["wire_bytes_per_cell"] < 4096


def test_bench_runtimes_reports_both_runtimes_on_both_models(tmp_path):
    out = tmp_path / "runtimes.json"
    result = run_cli("bench", "runtimes", "--fields", str(FIXTURES / "smears"), "--out", str(out), "--max-fields", "1",
                     "--annotations", str(FIXTURES / "smears" / "annotations.json"), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["cpu"] and report["crops"] > 0
    assert set(report["models"]) == {"classifier INT8 (shipped)", "classifier FP32", "detector FP32"}
    for row in report["models"].values():
        assert row["onnxruntime"]["per_s"] > 0 and row["openvino"]["per_s"] > 0
    assert report["models"]["detector FP32"]["openvino_cells_f1_vs_onnxruntime"] > 0
    # The served decision of each classifier file on the three annotated fixture fields' cells.
    assert report["lab_fields"] == 3 and report["lab_cells"] > 300 and report["lab_infected"] > 0
    for label in ("classifier INT8 (shipped)", "classifier FP32"):
        for calls in report["models"][label]["operating_point"].values():
            assert 0 < calls["infected_called_parasitized"] <= 1 and 0 <= calls["uninfected_called_parasitized"] < 0.05
            assert calls["parasitemia_mae_points"] >= 0


def test_compare_runs_counts_moved_cells_changed_calls_and_counts(tmp_path):
    """Two runs of the same two fields: one cell moved out of reach, one call changed."""
    import numpy as np

    from batch.results import classified, write_part, write_tables
    from bench.compare import compare_runs

    boxes = np.array([[0, 0, 50, 50], [100, 0, 50, 50], [200, 0, 50, 50], [300, 0, 50, 50]], np.int32)
    areas = np.full(4, 2000, np.int32)
    p = np.array([[0.9, 0.1], [0.1, 0.9], [0.2, 0.8], [0.95, 0.05]], np.float32)
    moved, recalled = boxes.copy(), p.copy()
    moved[3] = [300, 200, 50, 50]  # no overlap with its old box: unmatched on both sides
    recalled[1] = [0.9, 0.1]  # Uninfected -> Parasitized
    for run, (a_boxes, b_p) in {"a": (boxes, p), "b": (moved, recalled)}.items():
        write_part(tmp_path / run, "f1", classified("f1", "f1.jpg", a_boxes, areas, p, 640, 480, 0.1, 0.5))
        write_part(tmp_path / run, "f2", classified("f2", "f2.jpg", boxes, areas, b_p, 640, 480, 0.1, 0.5))
        write_tables(tmp_path / run)
    result = compare_runs(tmp_path / "a", tmp_path / "b")
    assert result["fields"] == 2 and result["cells_baseline"] == result["cells_candidate"] == 8
    assert result["cells_f1"] == 2 * 7 / (2 * 7 + 1 + 1)
    assert result["calls_agree"] == 6 / 7
    assert result["counts_identical"] == 0.5 and not result["passed"]
    assert result["fields_with_other_counts"] == [{"field": "f2", "parasitized": [2, 3]}]
