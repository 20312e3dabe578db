"""Results in the output (a folder or an s3:// prefix, batch.storage): one part per finished field,
whole or absent, combined into the run's tables at the end.

A field's part (`parts/<key>.parquet`: its cells as rows, the field's own row in the file's
metadata) appears only once its cells are classified, so an interrupted run resumes by
skipping fields with a part and redoing the rest: no duplicates, nothing lost, and a slide with
one bad field keeps the others. Fields are grouped into slides only when the tables are written
(`batch.grouping`), so a rerun with another `--group` regroups without reprocessing.

    cells.parquet            one row per cell: slide, field, box, area, p_parasitized, label
    fields.parquet, .csv     one row per field (image): slide, field, size, counts, status, error, overlay
    slides.parquet, .csv     one row per slide: fields, cells, parasitized, parasitemia with its 95 % interval
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from dataclasses import field as dataclass_field

import numpy as np

from batch.inputs import slide_name
from batch.storage import Location, atomic_path, basename, join, list_files, resolve
from cells.contract import CLASSES, PARASITIZED, UNINFECTED
from cells.decision import DEFAULT_THRESHOLD, Decision, slide_call
from cells.stats import wilson_interval

PARTS = "parts"
PART_SUFFIX = ".parquet"
FIELD_METADATA = "smearscope.field"  # a part's key in the Parquet metadata: the field's row, as JSON
# The columns of cells.parquet, in order.
CELL_COLUMNS = ("slide", "field", "cell_id", "x", "y", "w", "h", "area", "p_parasitized", "label")
# WHO's thin-film count is of parasitized cells among 500-2,000 red cells; the default asks for 2,000.
MIN_CELLS = 2000


@dataclass
class FieldResult:
    """One field (image) as the worker finished it; `field` is its id (a path, or archive!member)."""

    field: str
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
    cell_rows: list[dict] = dataclass_field(default_factory=list)

    def row(self) -> dict:
        row = asdict(self)
        del row["cell_rows"]
        return row

    def table_rows(self, slide: str) -> tuple[dict, list[dict]]:
        """This field's row of fields.parquet and its rows of cells.parquet, as part of `slide`."""
        return {"slide": slide, **self.row()}, [{"slide": slide, **cell} for cell in self.cell_rows]


FIELD_COLUMNS = ("slide", *(f.name for f in fields(FieldResult) if f.name != "cell_rows"))
SLIDE_COLUMNS = ("slide", "status", "complete", "fields", "fields_expected", "fields_ok", "fields_error", "cells",
                 "parasitized", "parasitemia_pct", "ci_low_pct", "ci_high_pct", "enough_cells", "call", "errors")


def classified(field_id: str, source: str, boxes: np.ndarray, areas: np.ndarray, probabilities: np.ndarray,
               width: int, height: int, seconds: float, threshold: float = DEFAULT_THRESHOLD) -> FieldResult:
    """A finished field: a cell is Parasitized when p(parasitized) >= `threshold` (cells/decision.py),
    parasitemia = share Parasitized."""
    is_parasitized = probabilities[:, PARASITIZED] >= threshold if len(probabilities) else np.zeros(0, bool)
    labels = np.where(is_parasitized, PARASITIZED, UNINFECTED)
    rows = [
        {
            "field": field_id, "cell_id": i, "x": int(x), "y": int(y), "w": int(w), "h": int(h), "area": int(area),
            "p_parasitized": float(p[PARASITIZED]), "label": CLASSES[int(label)],
        }
        for i, ((x, y, w, h), area, p, label) in enumerate(zip(boxes, areas, probabilities, labels))
    ]
    parasitized = int(np.sum(labels == PARASITIZED))
    return FieldResult(
        field=field_id, source=source, status="ok", width=width, height=height, cells=len(rows),
        parasitized=parasitized, parasitemia_pct=100.0 * parasitized / len(rows) if rows else 0.0,
        seconds=round(seconds, 3), cell_rows=rows,
    )


def failed(field_id: str, source: str, reason: str) -> FieldResult:
    return FieldResult(field=field_id, source=source, status="error", error=reason)


def slide_row(slide: str, results: list[FieldResult], min_cells: int = MIN_CELLS, expected: int | None = None,
              decision: Decision = Decision()) -> dict:
    """A slide's counts over its fields that could be read, parasitemia with its Wilson 95 % interval,
    whether enough cells were counted, and its call (positive / negative / uncertain, weighed against
    the model's validated false-positive rate: cells.decision.slide_call); the fields that could not
    be read are named in `errors`. `complete`: every field (or tile) the slide has (`expected`,
    default those present) has a result."""
    ok = [r for r in results if r.status == "ok"]
    summary = count_summary(sum(r.parasitized for r in ok), sum(r.cells for r in ok), decision)
    errors = [f"{slide_name(r.field)}: {r.error}" for r in results if r.status != "ok"]
    return {
        "slide": slide, "status": "ok" if ok else "error", "complete": expected is None or len(results) >= expected,
        "fields": len(results), "fields_expected": len(results) if expected is None else expected, "fields_ok": len(ok),
        "fields_error": len(results) - len(ok),
        **{key: summary[key] for key in ("cells", "parasitized", "parasitemia_pct", "ci_low_pct", "ci_high_pct")},
        "enough_cells": summary["cells"] >= min_cells, "call": summary["call"] if ok else "",
        "errors": "; ".join(errors)[:2000],
    }


def count_summary(parasitized: int, cells: int, decision: Decision) -> dict:
    """Counts as a slide reports them: parasitemia %, its Wilson 95 % interval and the call."""
    low, high = wilson_interval(parasitized, cells)
    return {"cells": cells, "parasitized": parasitized, "parasitemia_pct": 100.0 * parasitized / cells if cells else 0.0,
            "ci_low_pct": round(100 * low, 4), "ci_high_pct": round(100 * high, 4),
            "call": slide_call(parasitized, cells, decision)}


def _cell_schema(with_slide: bool):
    import pyarrow as pa

    types = {"slide": pa.string(), "field": pa.string(), "label": pa.string(), "p_parasitized": pa.float32()}
    return pa.schema([(name, types.get(name, pa.int32())) for name in CELL_COLUMNS if with_slide or name != "slide"])


def write_part(output: Location, key: str, result: FieldResult) -> None:
    """The field's part, whole or not at all; written by the worker that analysed it (or by the
    driver for a field no worker could). Written again with the same content if a retried task
    finishes twice: one file per field either way."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _cell_schema(with_slide=False).with_metadata({FIELD_METADATA: json.dumps(result.row())})
    with atomic_path(join(output, PARTS, f"{key}{PART_SUFFIX}")) as temporary:
        pq.write_table(pa.Table.from_pylist(result.cell_rows, schema=schema), temporary)


def parts(output: Location) -> list[str]:
    """The locations of every part in the output."""
    return list_files(join(output, PARTS), f"*{PART_SUFFIX}")


def finished_keys(output: Location) -> set[str]:
    return {basename(part).removesuffix(PART_SUFFIX) for part in parts(output)}


def read_field(part: Location) -> FieldResult:
    """A part's field row, without its cells: read from the file's footer (range requests on S3)."""
    import pyarrow.parquet as pq

    filesystem, path = resolve(part)
    return FieldResult(**json.loads(pq.read_schema(path, filesystem=filesystem).metadata[FIELD_METADATA.encode()]))


def read_cells(part: Location):
    """A part's cells, as an Arrow table."""
    import pyarrow.parquet as pq

    filesystem, path = resolve(part)
    return pq.read_table(path, filesystem=filesystem)


def read_part(part: Location) -> FieldResult:
    """A part whole: the field's row and its cells."""
    table = read_cells(part)
    result = FieldResult(**json.loads(table.schema.metadata[FIELD_METADATA.encode()]))
    result.cell_rows = table.to_pylist()
    return result


@dataclass(frozen=True)
class Tables:
    slides: list[dict]
    fields: list[dict]
    cells: int


def write_tables(output: Location, slide_of: Callable[[str], str] = str, min_cells: int = MIN_CELLS,
                 expected: dict[str, int] | None = None, decision: Decision = Decision(),
                 tidy: Callable[[list[FieldResult]], list[FieldResult]] | None = None) -> Tables:
    """cells.parquet, fields.parquet/.csv and slides.parquet/.csv from every part in `output`, each
    field in the slide `slide_of(field id)` names (default: its own); `expected`: fields each slide
    should have; `decision`: the model's, for each slide's call; `tidy`: applied to each slide's
    fields before they are counted (whole-slide seams). Streamed a slide at a time: memory holds the
    field rows and one slide's cells, whatever the run's size."""
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet as pq

    by_slide: dict[str, list[tuple[str, FieldResult]]] = {}
    for path in parts(output):
        result = read_field(path)
        by_slide.setdefault(slide_of(result.field), []).append((path, result))
    expected = expected or {}
    cell_schema, part_schema = _cell_schema(with_slide=True), _cell_schema(with_slide=False)
    field_rows, slide_rows, cells = [], [], 0
    with atomic_path(join(output, "cells.parquet")) as temporary, pq.ParquetWriter(temporary, cell_schema) as writer:
        for slide in sorted(by_slide):
            slide_parts = sorted(by_slide[slide], key=lambda part: (part[1].field, part[0]))
            if tidy:  # the cells are needed as rows: read them whole
                results = tidy([read_part(path) for path, _ in slide_parts])
                tables = [pa.Table.from_pylist(result.cell_rows, schema=part_schema) for result in results]
            else:
                results = [result for _, result in slide_parts]
                tables = [read_cells(path).replace_schema_metadata(None) for path, _ in slide_parts]
            field_rows.extend({"slide": slide, **result.row()} for result in results)
            table = pa.concat_tables(tables)
            if table.num_rows:
                writer.write_table(table.add_column(0, "slide", pa.array([slide] * table.num_rows, pa.string())))
                cells += table.num_rows
            slide_rows.append(slide_row(slide, results, min_cells, expected.get(slide), decision))
    for name, rows in (("fields", field_rows), ("slides", slide_rows)):
        table = pa.Table.from_pylist(rows)
        with atomic_path(join(output, f"{name}.parquet")) as temporary:
            pq.write_table(table, temporary)
        with atomic_path(join(output, f"{name}.csv")) as temporary:
            pa.csv.write_csv(table, temporary)
    return Tables(slide_rows, field_rows, cells)
