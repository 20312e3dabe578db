"""The web page and its API: a real `smearscope web` (embedded Triton, released model), real HTTP,
and a real headless Chromium driven by Playwright."""
from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from batch.results import CELL_COLUMNS, FIELD_COLUMNS
from cells.decision import CALLS
from cells.repository import DEFAULT_REPOSITORY
from deploy.server import free_port
from tests.cluster import stop_group
from tests.conftest import FIXTURES, shared_run, sigint_ignored

pytestmark = pytest.mark.slow
FIELD = FIXTURES / "smears" / "PA171691.JPG"
MAX_UPLOAD_MIB = 4
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def start_web(spool: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """`smearscope web` on a free loopback port, started as from a script (SIGINT ignored), with TMPDIR `spool`."""
    port = free_port()
    with sigint_ignored():
        process = subprocess.Popen(
            [sys.executable, "-m", "smearscope", "web", "--port", str(port), "--repository", str(DEFAULT_REPOSITORY),
             "--max-upload-mib", str(MAX_UPLOAD_MIB), *extra],
            env={**os.environ, "TMPDIR": str(spool)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail(f"smearscope web did not start: {process.stdout.read()[-2000:]}")
    return process, url


@pytest.fixture(scope="module")
def web(tmp_path_factory, released_server):
    """The page's server on the session's Triton; its TMPDIR watched for anything an upload leaves behind."""
    spool = tmp_path_factory.mktemp("spool")
    process, url = start_web(spool, "--triton-url", released_server.grpc_url)
    yield url, spool
    stop_group(process)


def upload(url: str, name: str, data: bytes, content_type: str = "image/jpeg", **params) -> httpx.Response:
    return httpx.post(f"{url}/api/fields", files={"file": (name, data, content_type)}, params=params, timeout=120)


def test_a_field_gives_cells_and_counts_in_the_batch_job_s_columns(web):
    url, _ = web
    response = upload(url, FIELD.name, FIELD.read_bytes())
    assert response.status_code == 200, response.text
    body = response.json()
    assert list(body["field"]) == list(FIELD_COLUMNS) and body["field"]["status"] == "ok"
    assert body["field"]["slide"] == body["field"]["field"] == FIELD.name  # an upload is a slide of its own
    assert body["cells"] and all(list(cell) == list(CELL_COLUMNS) for cell in body["cells"])
    parasitized = sum(cell["label"] == "Parasitized" for cell in body["cells"])
    counts = body["counts"]
    assert (counts["cells"], counts["parasitized"]) == (len(body["cells"]), parasitized)
    assert counts["parasitemia_pct"] == pytest.approx(100 * parasitized / len(body["cells"]))
    assert counts["ci_low_pct"] <= counts["parasitemia_pct"] <= counts["ci_high_pct"] and counts["call"] in CALLS
    info = httpx.get(f"{url}/api/info").json()
    assert all((cell["label"] == "Parasitized") == (cell["p_parasitized"] >= info["threshold"]) for cell in body["cells"])
    total = httpx.get(f"{url}/api/call", params={"parasitized": parasitized, "cells": len(body["cells"])}).json()
    assert total == counts  # the page's total over fields is called by the same rule
    assert httpx.get(f"{url}/api/call", params={"parasitized": 5, "cells": 2}).status_code == 422
    assert (body["field"]["width"], body["field"]["height"]) == Image.open(FIELD).size
    assert info["cell_columns"] == list(CELL_COLUMNS) and "not validated for clinical use" in info["disclaimer"]
    assert body["model_version"] == info["model_version"] == "1"
    schema = httpx.get(f"{url}/openapi.json").json()
    assert "/api/fields" in schema["paths"] and "/api/health" in schema["paths"]


def test_the_page_and_the_batch_job_agree_on_a_field(web, ray_cluster, released_server, tmp_path):
    url, _ = web
    api = upload(url, FIELD.name, FIELD.read_bytes()).json()
    result = shared_run(ray_cluster, released_server, "--input", str(FIELD), "--output", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-2000:]
    batch = pq.read_table(tmp_path / "out" / "cells.parquet").to_pylist()
    slide = pq.read_table(tmp_path / "out" / "fields.parquet").to_pylist()[0]
    assert len(batch) == len(api["cells"]) > 40
    for mine, theirs in zip(api["cells"], batch):
        assert {k: v for k, v in mine.items() if k not in ("slide", "field", "p_parasitized")} == \
               {k: v for k, v in theirs.items() if k not in ("slide", "field", "p_parasitized")}
        assert mine["p_parasitized"] == pytest.approx(theirs["p_parasitized"], abs=1e-6)  # parquet keeps float32
    assert (slide["cells"], slide["parasitized"]) == (api["counts"]["cells"], api["counts"]["parasitized"])


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_uploads_are_refused_with_a_reason_and_the_right_status(web):
    url, _ = web
    field = FIELD.read_bytes()
    cases = {
        "empty": (upload(url, "empty.jpg", b""), 422, "empty file"),
        "not an image": (upload(url, "notes.jpg", b"hello, not a picture"), 415, "not an image"),
        "wrong content type": (upload(url, "notes.txt", b"hello", "text/plain"), 415, "unsupported content type"),
        "truncated": (upload(url, "cut.jpg", field[:5000]), 422, "corrupt or truncated"),
        "too large": (upload(url, "big.jpg", field * (MAX_UPLOAD_MIB * 2 ** 20 // len(field) + 2)), 413, "larger than"),
        "decompression bomb": (upload(url, "bomb.png", _png(Image.new("L", (8000, 8000))), "image/png"), 413,
                               "too large"),
        "1x1": (upload(url, "dot.png", _png(Image.new("RGB", (1, 1))), "image/png"), 422, "too small"),
    }
    for name, (response, status, reason) in cases.items():
        assert response.status_code == status, (name, response.text)
        assert reason in response.json()["detail"], (name, response.text)
    missing = httpx.post(f"{url}/api/fields", timeout=30)
    assert missing.status_code == 422


def test_a_chunked_upload_without_length_is_cut_off_at_the_limit(web):
    url, _ = web
    chunk = b"\0" * 2 ** 20

    def body():
        yield b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n"
        for _ in range(MAX_UPLOAD_MIB * 4):
            yield chunk

    response = httpx.post(f"{url}/api/fields", content=body(), timeout=60,
                          headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert response.status_code == 413, response.text


def test_names_are_labels_and_nothing_uploaded_is_kept(web):
    url, spool = web
    tiff = io.BytesIO()
    Image.open(FIELD).save(tiff, format="TIFF")  # uncompressed, 3.7 MB: spooled to disk while parsed
    before = set(spool.rglob("*"))
    response = upload(url, "../../../tmp/evil name.tif", tiff.getvalue(), "image/tiff")
    assert response.status_code == 200, response.text
    assert response.json()["field"]["field"] == "evil name.tif"
    assert set(spool.rglob("*")) == before


def test_two_concurrent_uploads_are_both_served_and_health_answers_meanwhile(web):
    url, _ = web
    reference = upload(url, FIELD.name, FIELD.read_bytes()).json()["cells"]
    answers: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda: answers.append(upload(url, FIELD.name, FIELD.read_bytes())))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    health = []
    while any(t.is_alive() for t in threads):
        health.append(httpx.get(f"{url}/api/health", timeout=5).status_code)
        time.sleep(0.1)
    for thread in threads:
        thread.join()
    assert [a.status_code for a in answers] == [200, 200]
    assert all(a.json()["cells"] == reference for a in answers)
    assert health and set(health) == {200}


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: `make test` installs Debian's chromium where apt can run")
def test_the_page_in_a_real_browser(web, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    url, _ = web
    api = upload(url, FIELD.name, FIELD.read_bytes()).json()
    artifacts = tmp_path_factory.mktemp("web-page")  # screenshots to look at: pytest keeps its last three sessions
    flags = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=flags)
        page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        page.goto(url)
        page.wait_for_selector("body[data-ready=true]")
        started = time.monotonic()
        page.set_input_files("#file-input", str(FIELD))
        page.wait_for_selector("#summary-rows tr", timeout=120_000)
        seconds = time.monotonic() - started
        assert page.inner_text("#total-cells") == str(api["counts"]["cells"])
        assert page.inner_text("#total-parasitized") == str(api["counts"]["parasitized"])
        assert page.inner_text("#total-parasitemia") == f"{api['counts']['parasitemia_pct']:.2f}"
        page.wait_for_function("document.querySelector('#total-call').textContent !== ''")
        assert page.inner_text("#total-call") == api["counts"]["call"]
        assert page.inner_text("#summary-rows tr td:nth-child(6)") == api["counts"]["call"]
        info = httpx.get(f"{url}/api/info").json()
        note = page.inner_text("#threshold-note")
        assert f"called Parasitized from p(parasitized) ≥ {info['threshold']:.3f}, chosen on " in note
        assert "/" not in note.split("chosen on")[1].split(".")[0]  # a data set's name and counts, not a path
        boxes = page.locator(".field-svg rect")
        assert boxes.count() == api["counts"]["cells"]
        boxes.nth(3).hover()
        assert page.inner_text(".cell-readout").startswith(f"Cell {api['cells'][3]['cell_id']}: {api['cells'][3]['label']}")
        assert "p(parasitized) = " in page.inner_text(".cell-readout")
        whole = f"0 0 {api['field']['width']} {api['field']['height']}"
        page.locator(".zoom-in").click()
        assert page.get_attribute(".field-svg", "viewBox") != whole
        page.locator(".zoom-reset").click()
        page.focus(".viewer")
        page.keyboard.press("+")
        assert page.get_attribute(".field-svg", "viewBox") != whole
        page.keyboard.press("0")
        assert page.get_attribute(".field-svg", "viewBox") == whole
        page.screenshot(path=str(artifacts / "web-page.png"), full_page=True)
        with page.expect_download() as download:
            page.locator("#download-cells").click()
        rows = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
        assert list(rows[0]) == list(CELL_COLUMNS) and len(rows) == len(api["cells"])
        for row, cell in zip(rows, api["cells"]):
            assert row["label"] == cell["label"] and int(row["x"]) == cell["x"] and int(row["area"]) == cell["area"]
            assert float(row["p_parasitized"]) == pytest.approx(cell["p_parasitized"])
        with page.expect_download() as download:
            page.locator(".download-overlay").click()
        overlay = np.asarray(Image.open(download.value.path()).convert("RGB"))
        assert overlay.shape == (api["field"]["height"], api["field"]["width"], 3)
        page.locator("#only-parasitized").check()
        visible = page.locator(".field-svg rect.Uninfected").first.is_visible()
        assert not visible
        page.set_viewport_size({"width": 820, "height": 1180})  # a tablet, portrait
        page.screenshot(path=str(artifacts / "web-page-tablet.png"), full_page=True)
        browser.close()
    print(f"upload to result in the browser: {seconds:.2f} s; screenshots in {artifacts}")


def test_sigterm_answers_the_upload_in_flight_and_stops_everything(tmp_path):
    """Its own embedded Triton: the page stops it too."""
    process, url = start_web(tmp_path)
    answers = []
    in_flight = threading.Thread(target=lambda: answers.append(upload(url, FIELD.name, FIELD.read_bytes())))
    in_flight.start()
    time.sleep(0.2)
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0
    seconds = time.monotonic() - started
    in_flight.join()
    print(f"smearscope web, SIGTERM to exit: {seconds:.2f} s")
    assert [a.status_code for a in answers] == [200]
    assert seconds < 20  # not Triton's 30 s wait for connections (4-5 s measured: docs/performance.md)
    assert subprocess.run(["pgrep", "-g", str(process.pid)], capture_output=True).returncode == 1  # nothing left
