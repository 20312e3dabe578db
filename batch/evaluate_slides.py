"""`smearscope evaluate-slides`: a batch run's cells against IML-format annotations.

Detection is scored with the shared matcher, border rule and error kinds (cells.detection_eval);
classification is reported for the annotated cells the run found: the share of infected cells
(ring, trophozoite, schizont, gametocyte) called Parasitized, and the share of uninfected red
cells called Parasitized. Per slide, the parasitemia the run reported (all its cells) is set
against the annotated one (infected / all annotated cells clear of the edge): the number a
microscopist would read off the report, and its mean absolute error in percentage points.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from batch.inputs import slide_name
from cells.contract import CLASSES, PARASITIZED
from cells.errors import BadInput, MissingInput
from cells.stats import count_agreement, ratio
from cells.detection_eval import (
    BORDER_MARGIN,
    INFECTED_TYPES,
    Match,
    clear_cells,
    explain_errors,
    load_annotations,
    score_field,
)


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 2)


def evaluate_slides(results: Path, annotations_path: Path, margin: int = BORDER_MARGIN) -> dict:
    import pyarrow.parquet as pq

    cells_table = results / "cells.parquet"
    if not cells_table.is_file():
        raise MissingInput(f"no cells.parquet in {results} (run the batch job first)")
    annotations = load_annotations(annotations_path)
    fields = pq.read_table(results / "fields.parquet").to_pylist()
    slides = [s for s in fields if s["status"] == "ok"]
    calls_by_field = _calls_by_field(results, fields)
    cells_by_slide: dict[str, list[dict]] = {}
    for row in pq.read_table(cells_table).to_pylist():
        cells_by_slide.setdefault(row["field"], []).append(row)

    total = Match(0, 0, 0)
    errors: Counter[str] = Counter()
    calls: Counter[tuple[str, str]] = Counter()  # (annotated kind, predicted label)
    per_slide = []
    pooled: Counter[str] = Counter()  # every field as one slide
    for slide in slides:
        name = slide_name(slide["field"])
        if name not in annotations:
            continue
        width, height = slide["width"], slide["height"]
        rows = cells_by_slide.get(slide["field"], [])
        boxes = [_box(r) for r in rows]
        match = score_field(boxes, annotations[name], width, height, margin)
        errors += explain_errors(boxes, annotations[name], match, width, height, margin)
        truth = clear_cells(annotations[name], width, height, margin)
        total = total + match
        for predicted, true in match.pairs:
            kind = "infected" if truth[true].type in INFECTED_TYPES else "uninfected"
            calls[kind, rows[predicted]["label"]] += 1
        annotated_infected = sum(cell.type in INFECTED_TYPES for cell in truth)
        pooled.update(annotated_infected=annotated_infected, annotated=len(truth), parasitized=slide["parasitized"],
                      cells=slide["cells"])
        per_slide.append({"slide": name, "found": match.tp + match.fp, "annotated": match.tp + match.fn,
                          "tp": match.tp, "fp": match.fp, "fn": match.fn, "f1": round(match.f1, 4),
                          "parasitemia_annotated_pct": round(100.0 * (ratio(annotated_infected, len(truth)) or 0.0), 2),
                          "parasitemia_reported_pct": round(slide["parasitemia_pct"], 2),
                          "call": calls_by_field.get(slide["field"], "")})
    if not per_slide:
        raise BadInput(f"no slide of {results} is named in {annotations_path}")
    positive = CLASSES[PARASITIZED]
    infected = sum(v for (kind, _), v in calls.items() if kind == "infected")
    uninfected = sum(v for (kind, _), v in calls.items() if kind == "uninfected")
    report = {
        "slides": len(per_slide),
        "border_rule": f"boxes within {margin}px of the field edge are don't-care on both sides (cells.detection_eval.score_field)",
        "detection": {"tp": total.tp, "fp": total.fp, "fn": total.fn, "precision": round(total.precision, 4),
                      "recall": round(total.recall, 4), "f1": round(total.f1, 4),
                      "errors": dict(sorted(errors.items()))},
        "infected_cells_found": infected,
        "infected_called_parasitized": ratio(calls["infected", positive], infected),
        "uninfected_cells_found": uninfected,
        "uninfected_called_parasitized": ratio(calls["uninfected", positive], uninfected),
        "parasitemia_pct": {
            "annotated_mean": _mean([s["parasitemia_annotated_pct"] for s in per_slide]),
            "reported_mean": _mean([s["parasitemia_reported_pct"] for s in per_slide]),
            "mean_absolute_error_points": _mean(
                [abs(s["parasitemia_reported_pct"] - s["parasitemia_annotated_pct"]) for s in per_slide]
            ),
        },
        "pooled_parasitemia_pct": {  # all fields as one slide, as a slide's many fields are counted
            "annotated": round(100.0 * (ratio(pooled["annotated_infected"], pooled["annotated"]) or 0.0), 3),
            "reported": round(100.0 * (ratio(pooled["parasitized"], pooled["cells"]) or 0.0), 3),
        },
        "within_25_percent": count_agreement(
            [(s["parasitemia_annotated_pct"], s["parasitemia_reported_pct"]) for s in per_slide]),
        "calls": _call_table(per_slide),
        "per_slide": per_slide,
    }
    (results / "evaluation.json").write_text(json.dumps(report, indent=2))
    return report


def _calls_by_field(results: Path, fields: list[dict]) -> dict[str, str]:
    """Each field's call where each field is its own slide (`--group file`); otherwise none."""
    import pyarrow.parquet as pq

    if any(f["slide"] != f["field"] for f in fields) or not (results / "slides.parquet").is_file():
        return {}
    return {row["slide"]: row.get("call", "") for row in pq.read_table(results / "slides.parquet").to_pylist()}


def _call_table(per_slide: list[dict]) -> dict[str, dict[str, int]]:
    """Calls (positive / negative / uncertain) of the fields with and without annotated parasites."""
    table: dict[str, Counter] = {"with_parasites": Counter(), "without_parasites": Counter()}
    for s in per_slide:
        table["with_parasites" if s["parasitemia_annotated_pct"] > 0 else "without_parasites"][s["call"] or "none"] += 1
    return {kind: dict(sorted(counts.items())) for kind, counts in table.items()}


def _box(row: dict) -> tuple[int, int, int, int]:
    return (row["x"], row["y"], row["w"], row["h"])
