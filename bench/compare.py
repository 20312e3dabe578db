"""`smearscope bench compare-runs`: do two runs of the job on the same fields give the same answers?

For a change of the path a field takes (e.g. the field model against the two-request path of an
earlier commit, or the crop graph against NumPy crops), on every field both runs analysed: the
cells of one matched to the other's at IoU >= 0.5 (cells F1), the share of matched cells both call
the same, and the share of fields whose parasitized count is identical. Numbers, with the gate of
issue 36 beside them: cells F1 >= 0.99, calls >= 99 %, counts identical on >= 95 % of fields.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

GATES = {"cells_f1": 0.99, "calls_agree": 0.99, "counts_identical": 0.95}


def _cells(run: Path) -> dict[str, list[dict]]:
    import pyarrow.parquet as pq

    by_field: dict[str, list[dict]] = defaultdict(list)
    for row in pq.read_table(run / "cells.parquet").to_pylist():
        by_field[row["field"]].append(row)
    fields = {row["field"] for row in pq.read_table(run / "fields.parquet").to_pylist() if row["status"] == "ok"}
    return {field: by_field.get(field, []) for field in fields}


def _parasitized(rows: list[dict]) -> int:
    return sum(row["label"] == "Parasitized" for row in rows)


def compare_runs(baseline: Path, candidate: Path) -> dict:
    """The agreement of `candidate`'s cells with `baseline`'s on the fields both analysed."""
    from cells.detection_eval import match_boxes

    before, after = _cells(baseline), _cells(candidate)
    common = sorted(set(before) & set(after))
    tp = fp = fn = agree = 0
    identical = 0
    differences = []
    for field in common:
        boxes = [[(r["x"], r["y"], r["w"], r["h"]) for r in rows] for rows in (before[field], after[field])]
        match = match_boxes(boxes[1], boxes[0])
        tp, fp, fn = tp + match.tp, fp + match.fp, fn + match.fn
        agree += sum(after[field][i]["label"] == before[field][j]["label"] for i, j in match.pairs)
        counts = [_parasitized(before[field]), _parasitized(after[field])]
        identical += counts[0] == counts[1]
        if counts[0] != counts[1]:
            differences.append({"field": field, "parasitized": counts})
    result = {
        "baseline": str(baseline), "candidate": str(candidate), "fields": len(common),
        "fields_only_in_one": len(set(before) ^ set(after)),
        "cells_baseline": int(sum(len(before[f]) for f in common)), "cells_candidate": int(sum(len(after[f]) for f in common)),
        "cells_f1": 2 * tp / max(2 * tp + fp + fn, 1),
        "calls_agree": agree / max(tp, 1),
        "counts_identical": identical / max(len(common), 1),
        "parasitized_baseline": sum(_parasitized(before[f]) for f in common),
        "parasitized_candidate": sum(_parasitized(after[f]) for f in common),
        "fields_with_other_counts": differences,
        "gates": GATES,
    }
    result["passed"] = all(result[key] >= gate for key, gate in GATES.items())
    return result


def write_comparison(baseline: Path, candidate: Path, out: Path) -> dict:
    result = compare_runs(baseline, candidate)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "fields_with_other_counts"}, indent=2))
    return result
