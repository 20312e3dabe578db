"""Whole-slide images: a pyramidal tiled BigTIFF of 419 MP built from the fixture fields, read tile
by tile through the batch job; every annotated cell found once, none twice at a seam."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from batch.wsi import TILE, open_slide, read_region, smear_tiles
from cells.detection_eval import iou_matrix, load_annotations, load_rgb, score_field
from tests.conftest import FIXTURES, shared_run

pytestmark = pytest.mark.slow
SIDE = 20_480  # 419 MP: far too large to decode whole (1.2 GB as RGB)
TILE_PX = 512  # the file's own tiles
# Each fixture field straddles the job's tile seams (multiples of TILE): a corner, an edge, a middle.
PLACES = ((TILE - 640, TILE - 480), (3 * TILE - 200, TILE + 300), (5 * TILE + 100, 4 * TILE - 700))
MPP = 7.5 / 70  # so a red cell (7.5 µm) is 70 px, as in the IML fields


def _fields() -> list[tuple[str, np.ndarray, tuple[int, int]]]:
    paths = sorted((FIXTURES / "smears").glob("*.JPG"))
    return [(p.name, load_rgb(p), place) for p, place in zip(paths, PLACES)]


def _region(fields, x: int, y: int, w: int, h: int, factor: int) -> np.ndarray:
    """The mosaic (white, with the fields pasted) over level-0 region x, y, w, h, seen at 1/factor."""
    out = np.full((h // factor, w // factor, 3), 255, np.uint8)
    for _, image, (fx, fy) in fields:
        x0, y0 = max(x, fx), max(y, fy)
        x1, y1 = min(x + w, fx + image.shape[1]), min(y + h, fy + image.shape[0])
        if x1 <= x0 or y1 <= y0:
            continue
        # level-0 pixels on this level's grid: multiples of factor
        gx0, gy0 = -(-x0 // factor) * factor, -(-y0 // factor) * factor
        patch = image[gy0 - fy : y1 - fy : factor, gx0 - fx : x1 - fx : factor]
        oy, ox = (gy0 - y) // factor, (gx0 - x) // factor
        out[oy : oy + patch.shape[0], ox : ox + patch.shape[1]] = patch
    return out


def write_mosaic(path: Path, fields) -> None:
    import tifffile

    def tiles(factor: int):
        side = SIDE // factor
        for y in range(0, side, TILE_PX):
            for x in range(0, side, TILE_PX):
                yield _region(fields, x * factor, y * factor, TILE_PX * factor, TILE_PX * factor, factor)

    options = {"tile": (TILE_PX, TILE_PX), "compression": "zlib", "photometric": "rgb", "dtype": np.uint8}
    with tifffile.TiffWriter(path, bigtiff=True) as writer:
        writer.write(tiles(1), shape=(SIDE, SIDE, 3), subifds=2, resolution=(1e4 / MPP, 1e4 / MPP),
                     resolutionunit="CENTIMETER", **options)
        for factor in (4, 16):
            writer.write(tiles(factor), shape=(SIDE // factor, SIDE // factor, 3), subfiletype=1, **options)


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("wsi") / "mosaic.tif"
    write_mosaic(path, _fields())
    return path


def test_the_slide_is_read_by_region_and_its_smear_tiles_found(slide):
    whole = open_slide(str(slide), 50_000_000)
    assert (whole.width, whole.height) == (SIDE, SIDE) and whole.mpp == pytest.approx(MPP)
    assert len(whole.levels) == 3
    name, image, (fx, fy) = _fields()[1]
    region = read_region(str(slide), (fx - 10, fy - 10, 300, 200))
    assert np.array_equal(region[10:, 10:], image[:190, :290]) and (region[:10] == 255).all()
    tiles = smear_tiles(whole, 70.0)
    assert 6 <= len(tiles) <= 20  # only where the fields are: of 100 tiles
    assert all(t.read[2] - t.core[2] >= 2 * 105 for t in tiles)  # overlap 1.5 cell diameters a side


def _peak_worker_rss(stop: threading.Event, peak: list[float]) -> None:
    while not stop.is_set():
        for status in Path("/proc").glob("[0-9]*/status"):
            try:
                text = status.read_text()
                command = (status.parent / "cmdline").read_bytes()
            except OSError:
                continue
            if b"ray::" in command or "ray::" in text.split("\n", 1)[0]:
                rss = next((int(line.split()[1]) for line in text.splitlines() if line.startswith("VmRSS:")), 0)
                peak[0] = max(peak[0], rss / 1024)
        time.sleep(0.2)


def test_every_annotated_cell_is_found_once_in_the_whole_slide(slide, ray_cluster, released_server, tmp_path):
    output = tmp_path / "out"
    peak, stop = [0.0], threading.Event()
    sampler = threading.Thread(target=_peak_worker_rss, args=(stop, peak), daemon=True)
    sampler.start()
    run = shared_run(ray_cluster, released_server, "--input", str(slide), "--output", str(output), "--overlays")
    stop.set()
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    report = json.loads((output / "run.json").read_text())
    (row,) = pq.read_table(output / "slides.parquet").to_pylist()
    assert row["slide"] == str(slide) and row["complete"] and row["fields"] == row["fields_expected"] == report["fields"]
    assert (output / report["overviews"][str(slide)]).is_file()
    cells = pq.read_table(output / "cells.parquet").to_pylist()
    boxes = [(c["x"], c["y"], c["w"], c["h"]) for c in cells]
    duplicates = np.triu(iou_matrix(boxes, boxes) > 0.5, k=1).sum()
    assert duplicates == 0  # no cell counted by two tiles
    annotations = load_annotations(FIXTURES / "smears" / "annotations.json")
    for name, image, (fx, fy) in _fields():
        height, width = image.shape[:2]
        inside = [(x - fx, y - fy, w, h) for x, y, w, h in boxes
                  if fx <= x + w / 2 < fx + width and fy <= y + h / 2 < fy + height]
        field_match = score_field(inside, annotations[name], width, height)
        assert field_match.recall >= 0.95 and field_match.f1 >= 0.93, (name, field_match)
    print(f"whole slide {SIDE}x{SIDE}: {report['fields']} tiles, {len(cells)} cells, {report['cells_per_second']} cells/s, "
          f"peak worker RSS {peak[0]:.0f} MiB")
    assert 0 < peak[0] < 1500  # far below the 1.2 GB the slide's pixels would take
