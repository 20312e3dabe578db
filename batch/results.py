"""Results on disk: one atomic file per finished slide, combined into the run's tables at the end.

A slide's part file appears only once its cells are classified, so an interrupted run resumes by
skipping slides with a part and redoing the rest: no duplicates, nothing lost.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from cells.contract import CLASSES, PARASITIZED

PARTS = "parts"
# The columns of cells.parquet, in order; slides.parquet and slides.csv have SlideResult.row()'s.
CELL_COLUMNS = ("slide", "cell_id", "x", "y", "w", "h", "area", "p_parasitized", "label")


@dataclass
class SlideResult:
    slide: str
    source: str
    status: str  # "ok" or "error"
    error: str = ""
    width: int = 0
    height: int = 0
    cells: int = 0
    parasitized: int = 0
    parasitemia_pct: float = 0.0
    seconds: float = 0.0
    overlay: str = ""  # the overlay PNG, relative to the output folder, when one was drawn
    cell_rows: list[dict] = field(default_factory=list)

    def row(self) -> dict:
        row = asdict(self)
        del row["cell_rows"]
        return row


SLIDE_COLUMNS = tuple(f.name for f in fields(SlideResult) if f.name != "cell_rows")


def classified(slide: str, source: str, boxes: np.ndarray, areas: np.ndarray, probabilities: np.ndarray,
               width: int, height: int, seconds: float) -> SlideResult:
    """A finished slide: each cell labelled by the larger probability, parasitemia = share Parasitized."""
    labels = probabilities.argmax(axis=1) if len(probabilities) else np.zeros(0, int)
    rows = [
        {
            "slide": slide, "cell_id": i, "x": int(x), "y": int(y), "w": int(w), "h": int(h), "area": int(area),
            "p_parasitized": float(p[PARASITIZED]), "label": CLASSES[int(label)],
        }
        for i, ((x, y, w, h), area, p, label) in enumerate(zip(boxes, areas, probabilities, labels))
    ]
    parasitized = int(np.sum(labels == PARASITIZED))
    return SlideResult(
        slide=slide, source=source, status="ok", width=width, height=height, cells=len(rows),
        parasitized=parasitized, parasitemia_pct=100.0 * parasitized / len(rows) if rows else 0.0,
        seconds=round(seconds, 3), cell_rows=rows,
    )


def failed(slide: str, source: str, reason: str) -> SlideResult:
    return SlideResult(slide=slide, source=source, status="error", error=reason)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; it replaces `path` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    os.close(handle)
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


def atomic_write(path: Path, text: str | bytes) -> None:
    with atomic_path(path) as temporary:
        temporary.write_bytes(text.encode() if isinstance(text, str) else text)


def write_part(output: Path, key: str, result: SlideResult) -> None:
    atomic_write(output / PARTS / f"{key}.json", json.dumps(asdict(result)))


def finished_keys(output: Path) -> set[str]:
    return {p.stem for p in (output / PARTS).glob("*.json")}


def read_parts(output: Path) -> list[SlideResult]:
    return [SlideResult(**json.loads(p.read_text())) for p in sorted((output / PARTS).glob("*.json"))]


def write_tables(output: Path, results: list[SlideResult]) -> tuple[int, int]:
    """cells.parquet, slides.parquet and slides.csv from every part; returns (slides, cells)."""
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet as pq

    results = sorted(results, key=lambda r: r.slide)
    cell_rows = [row for result in results for row in result.cell_rows]
    types = {"slide": pa.string(), "label": pa.string(), "p_parasitized": pa.float32()}
    cell_schema = pa.schema([(name, types.get(name, pa.int32())) for name in CELL_COLUMNS])
    slides = pa.Table.from_pylist([r.row() for r in results])
    for name, table in (("cells", pa.Table.from_pylist(cell_rows, schema=cell_schema)), ("slides", slides)):
        with atomic_path(output / f"{name}.parquet") as temporary:
            pq.write_table(table, temporary)
    with atomic_path(output / "slides.csv") as temporary:
        pa.csv.write_csv(slides, temporary)
    return len(results), len(cell_rows)
