"""Score cell detection against annotated boxes: match on IoU, count TP/FP/FN, report P/R/F1.

The matching takes plain (x, y, w, h) boxes so any detector, and later `smearscope
evaluate-slides`, can reuse it. The IML loader and the border rule are here too, because a
score is only comparable when every run drops the same boxes.

Run `python -m cells.detection_eval --images DIR --annotations FILE` for the per-field table.
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

Box = tuple[int, int, int, int]  # x, y (top-left), width, height, in pixels

# The four P. vivax stages mark an infected red cell: a cell for detection, "infected" for recall.
INFECTED_TYPES = frozenset({"ring", "trophozoite", "schizont", "gametocyte"})
CELL_TYPES = INFECTED_TYPES | {"red blood cell"}
# Annotators could not decide what these are: matching one is neither right nor wrong.
IGNORED_TYPES = frozenset({"difficult"})
MIN_IOU = 0.5
BORDER_MARGIN = 2


@dataclass(frozen=True)
class AnnotatedBox:
    """One annotated object: its box and the annotator's type."""

    box: Box
    type: str


@dataclass(frozen=True)
class Match:
    """Counts from matching one set of predicted boxes to one set of true boxes."""

    tp: int
    fp: int
    fn: int
    pairs: tuple[tuple[int, int], ...] = ()  # (predicted index, true index) of each TP

    def __add__(self, other: Match) -> Match:
        """Sum counts over fields, so the total P/R/F1 weights every cell equally."""
        return Match(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    @property
    def f1(self) -> float:
        total = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / total if total else 1.0


def iou_matrix(first: Sequence[Box], second: Sequence[Box]) -> np.ndarray:
    """IoU of every box in `first` with every box in `second`, shape [len(first), len(second)]."""
    a = np.asarray(first, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(second, dtype=np.float64).reshape(-1, 4)
    ax0, ay0, ax1, ay1 = a[:, 0:1], a[:, 1:2], a[:, 0:1] + a[:, 2:3], a[:, 1:2] + a[:, 3:4]
    bx0, by0, bx1, by1 = b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    inter_w = np.clip(np.minimum(ax1, bx1) - np.maximum(ax0, bx0), 0, None)
    inter_h = np.clip(np.minimum(ay1, by1) - np.maximum(ay0, by0), 0, None)
    inter = inter_w * inter_h
    union = (a[:, 2:3] * a[:, 3:4]) + (b[:, 2] * b[:, 3]) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _greedy_pairs(ious: np.ndarray, min_iou: float) -> list[tuple[int, int]]:
    """One-to-one pairs, highest IoU first; with cells that barely overlap this equals Hungarian."""
    rows, cols = np.nonzero(ious >= min_iou)
    order = np.argsort(-ious[rows, cols], kind="stable")
    used_rows: set[int] = set()
    used_cols: set[int] = set()
    pairs = []
    for row, col in zip(rows[order].tolist(), cols[order].tolist()):
        if row not in used_rows and col not in used_cols:
            used_rows.add(row)
            used_cols.add(col)
            pairs.append((row, col))
    return pairs


def match_boxes(
    predicted: Sequence[Box],
    true: Sequence[Box],
    min_iou: float = MIN_IOU,
    ignored: Sequence[Box] = (),
) -> Match:
    """Match predicted to true boxes one-to-one at IoU >= min_iou (greedy, best IoU first).

    TP = matched pairs, FP = unmatched predictions, FN = unmatched true boxes. A prediction left
    unmatched that overlaps an `ignored` box (e.g. an annotated "difficult" object) at
    IoU >= min_iou is dropped instead of counted as FP.
    """
    pairs = _greedy_pairs(iou_matrix(predicted, true), min_iou)
    matched = {row for row, _ in pairs}
    unmatched = [box for index, box in enumerate(predicted) if index not in matched]
    forgiven = 0
    if unmatched and ignored:
        forgiven = int((iou_matrix(unmatched, ignored) >= min_iou).any(axis=1).sum())
    return Match(
        tp=len(pairs),
        fp=len(unmatched) - forgiven,
        fn=len(true) - len(pairs),
        pairs=tuple(pairs),
    )


def touches_border(box: Box, width: int, height: int, margin: int = BORDER_MARGIN) -> bool:
    """True if the box comes within `margin` px of any edge of a width x height field."""
    x, y, w, h = box
    return x <= margin or y <= margin or x + w >= width - margin or y + h >= height - margin


def drop_border_boxes(
    boxes: Sequence[Box], width: int, height: int, margin: int = BORDER_MARGIN
) -> list[Box]:
    """The border rule: keep only boxes farther than `margin` px from every field edge.

    Cells cut by the field edge are often left unannotated in IML, so a detector that finds them
    would be charged false positives for correct answers, and one that skips them would be charged
    misses for annotated ones. Applying this rule to BOTH the predicted and the annotated boxes
    before matching scores only whole cells inside the field, where the annotation is complete.
    """
    return [box for box in boxes if not touches_border(box, width, height, margin)]


def load_annotations(path: Path) -> dict[str, list[AnnotatedBox]]:
    """IML annotations.json -> {image name: [AnnotatedBox]}; coordinates arrive as strings."""
    fields = json.loads(Path(path).read_text())
    result = {}
    for field in fields:
        objects = []
        for obj in field["objects"]:
            bbox = obj["bbox"]
            box = (int(bbox["x"]), int(bbox["y"]), int(bbox["w"]), int(bbox["h"]))
            objects.append(AnnotatedBox(box=box, type=obj["type"]))
        result[field["image_name"]] = objects
    return result


def pad_boxes(boxes: Sequence[Box], pad: int) -> list[Box]:
    """Grow each box by `pad` px on every side (may reach outside the field)."""
    return [(x - pad, y - pad, w + 2 * pad, h + 2 * pad) for x, y, w, h in boxes]


def score_field(
    predicted: Sequence[Box],
    annotated: Sequence[AnnotatedBox],
    width: int,
    height: int,
    margin: int = BORDER_MARGIN,
    pad: int = 0,
) -> Match:
    """Match predictions to annotated cells after the border rule on both sides.

    `pad` grows the predicted boxes first, to put tight mask boxes on the annotators' convention
    (IML boxes are drawn a few px outside the cell edge); the border rule then sees both sides
    drawn the same way.
    """
    cells = [a.box for a in annotated if a.type in CELL_TYPES]
    ignored = [a.box for a in annotated if a.type in IGNORED_TYPES]
    return match_boxes(
        drop_border_boxes(pad_boxes(predicted, pad), width, height, margin),
        drop_border_boxes(cells, width, height, margin),
        ignored=ignored,
    )


def infected_recall(
    predicted: Sequence[Box], annotated: Sequence[AnnotatedBox], min_iou: float = MIN_IOU
) -> tuple[int, int]:
    """(found, annotated) infected cells: a detector that loses these is useless for screening."""
    infected = [a.box for a in annotated if a.type in INFECTED_TYPES]
    found = (iou_matrix(infected, predicted) >= min_iou).any(axis=1).sum() if predicted else 0
    return int(found), len(infected)


def load_rgb(path: Path) -> np.ndarray:
    """A field image as an H x W x 3 uint8 RGB array."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def main(argv: Sequence[str] | None = None) -> int:
    """Print found vs annotated per field, then overall P/R/F1 and mean seconds per field."""
    from cells.find import find_cells  # here, so the metrics import without scikit-image

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True, help="folder of field images")
    parser.add_argument("--annotations", type=Path, required=True, help="IML annotations.json")
    parser.add_argument("--margin", type=int, default=BORDER_MARGIN, help="border rule, px")
    args = parser.parse_args(argv)

    annotations = load_annotations(args.annotations)
    total = Match(0, 0, 0)
    infected_found = infected_total = 0
    seconds = 0.0
    print(f"{'field':<16}{'found':>6}{'annot':>6}{'tp':>5}{'fp':>4}{'fn':>4}{'f1':>7}")
    for name in sorted(annotations):
        image = load_rgb(args.images / name)
        height, width = image.shape[:2]
        start = time.perf_counter()
        cells = find_cells(image, keep_border=True)
        seconds += time.perf_counter() - start
        boxes = [cell.box for cell in cells]
        match = score_field(boxes, annotations[name], width, height, args.margin)
        found, infected = infected_recall(boxes, annotations[name])
        infected_found, infected_total = infected_found + found, infected_total + infected
        total = total + match
        print(
            f"{name:<16}{match.tp + match.fp:>6}{match.tp + match.fn:>6}"
            f"{match.tp:>5}{match.fp:>4}{match.fn:>4}{match.f1:>7.3f}"
        )
    count = len(annotations)
    print(
        f"\n{count} fields: TP {total.tp}  FP {total.fp}  FN {total.fn}  "
        f"precision {total.precision:.4f}  recall {total.recall:.4f}  F1 {total.f1:.4f}"
    )
    print(f"infected cells found: {infected_found}/{infected_total} (IoU >= {MIN_IOU}, any position)")
    print(f"mean seconds per field: {seconds / max(count, 1):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
