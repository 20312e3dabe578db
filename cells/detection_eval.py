"""Score cell detection against annotated boxes: match on IoU, count TP/FP/FN, report P/R/F1.

`match_boxes` takes plain (x, y, w, h) boxes so any detector, and `smearscope
evaluate-slides`, can reuse it. The IML loader and the border rule live here too, because scores
are only comparable when every run leaves out the same boxes.

    smearscope evaluate-detection --images DIR --annotations FILE

prints found vs annotated per field, then overall P/R/F1, what the errors are
(`explain_errors`) and mean seconds per field.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cells.errors import MissingInput

Box = tuple[int, int, int, int]  # x, y (top-left), width, height, in pixels

# The four P. vivax stages mark an infected red cell: a cell to detect, and one that must be found.
INFECTED_TYPES = frozenset({"ring", "trophozoite", "schizont", "gametocyte"})
CELL_TYPES = INFECTED_TYPES | {"red blood cell"}
IGNORED_TYPES = frozenset({"difficult"})  # annotators could not tell; finding it is no error
MIN_IOU = 0.5
BORDER_MARGIN = 2  # px


@dataclass(frozen=True)
class AnnotatedBox:
    """One annotated object: its box and the annotator's type."""

    box: Box
    type: str


@dataclass(frozen=True)
class Match:
    """Counts from matching predicted to true boxes; add them up over fields."""

    tp: int
    fp: int
    fn: int
    pairs: tuple[tuple[int, int], ...] = ()  # (predicted index, true index) of each TP
    false_positives: tuple[int, ...] = ()  # predicted index of each FP

    def __add__(self, other: Match) -> Match:
        """Counts summed over fields (pairs index one field, so they are not carried)."""
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


def _areas(first: Sequence[Box], second: Sequence[Box]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Intersections [len(first), len(second)] and the two boxes' areas, broadcast to that shape."""
    a = np.asarray(first, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(second, dtype=np.float64).reshape(-1, 4)
    inter_w = np.minimum(a[:, None, 0] + a[:, None, 2], b[None, :, 0] + b[None, :, 2]) - np.maximum(
        a[:, None, 0], b[None, :, 0]
    )
    inter_h = np.minimum(a[:, None, 1] + a[:, None, 3], b[None, :, 1] + b[None, :, 3]) - np.maximum(
        a[:, None, 1], b[None, :, 1]
    )
    inter = np.clip(inter_w, 0, None) * np.clip(inter_h, 0, None)
    area_a = np.broadcast_to(a[:, None, 2] * a[:, None, 3], inter.shape)
    area_b = np.broadcast_to(b[None, :, 2] * b[None, :, 3], inter.shape)
    return inter, area_a, area_b


def iou_matrix(first: Sequence[Box], second: Sequence[Box]) -> np.ndarray:
    """IoU of every box in `first` with every box in `second`, shape [len(first), len(second)]."""
    inter, area_first, area_second = _areas(first, second)
    union = area_first + area_second - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def covered_matrix(first: Sequence[Box], second: Sequence[Box]) -> np.ndarray:
    """Share of each box in `second` that lies inside each box in `first`, [len(first), len(second)]."""
    inter, _, area_second = _areas(first, second)
    return np.divide(inter, area_second, out=np.zeros_like(inter), where=area_second > 0)


def _greedy_pairs(ious: np.ndarray, min_iou: float) -> list[tuple[int, int]]:
    """One-to-one (row, col) pairs at IoU >= min_iou, best IoU first.

    At IoU >= 0.5 a box rarely has two candidates: on the 100 IML fields greedy and Hungarian
    matching pair the same number of boxes (10,251).
    """
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
    predicted_optional: Sequence[bool] | None = None,
) -> Match:
    """Match predicted to true boxes one-to-one at IoU >= min_iou: TP, FP and FN counts.

    TP = matched pairs, FP = unmatched predictions, FN = unmatched true boxes. Two kinds of
    don't-care: predictions left unmatched may then match an `ignored` box (an object nobody should
    be charged for, e.g. "difficult") and drop out, and an unmatched prediction flagged in
    `predicted_optional` is not an FP.
    """
    pairs = _greedy_pairs(iou_matrix(predicted, true), min_iou)
    left = np.ones(len(predicted), dtype=bool)
    left[[row for row, _ in pairs]] = False
    if left.any() and len(ignored):
        ious = iou_matrix(predicted, ignored)
        ious[~left] = 0.0
        left[[row for row, _ in _greedy_pairs(ious, min_iou)]] = False
    if predicted_optional is not None:
        left &= ~np.asarray(predicted_optional, dtype=bool)
    return Match(
        tp=len(pairs),
        fp=int(left.sum()),
        fn=len(true) - len(pairs),
        pairs=tuple(pairs),
        false_positives=tuple(np.flatnonzero(left).tolist()),
    )


def touches_border(box: Box, width: int, height: int, margin: int = BORDER_MARGIN) -> bool:
    """True if the box comes within `margin` px of any edge of a width x height field."""
    x, y, w, h = box
    return x <= margin or y <= margin or x + w >= width - margin or y + h >= height - margin


def clear_cells(
    annotated: Sequence[AnnotatedBox], width: int, height: int, margin: int = BORDER_MARGIN
) -> list[AnnotatedBox]:
    """The annotated cells that must be found: clear of the field edge, in file order.

    `score_field` matches against exactly these, so a `Match`'s true indices index this list.
    """
    return [a for a in annotated if a.type in CELL_TYPES and not touches_border(a.box, width, height, margin)]


def score_field(
    predicted: Sequence[Box],
    annotated: Sequence[AnnotatedBox],
    width: int,
    height: int,
    margin: int = BORDER_MARGIN,
) -> Match:
    """Score one field under the border rule; "difficult" objects are don't-care as well.

    The border rule: boxes within `margin` px of the field edge are don't-care on both sides. An
    annotated one is never an FN (a prediction that matches it is dropped, not counted); a
    predicted one is never an FP (it still counts as a TP if it matches an annotated cell that is
    clear of the edge). Cells cut by the edge are often unannotated in IML (40% of clearly visible
    ones are, against about 1% elsewhere), so scoring them would charge a detector for right
    answers. Border boxes are matched as don't-care instead of deleted before matching because
    IML boxes are drawn ~6 px outside the cell while predicted boxes hug the mask: a cell just
    inside the edge can have a box that touches the edge on one side only, and deleting it first
    would turn that one cell into a spurious FP (or FN).
    """
    def border(box: Box) -> bool:
        return touches_border(box, width, height, margin)

    cut = [a.box for a in annotated if a.type in CELL_TYPES and border(a.box)]
    unsure = [a.box for a in annotated if a.type in IGNORED_TYPES]
    return match_boxes(
        predicted,
        [a.box for a in clear_cells(annotated, width, height, margin)],
        ignored=unsure + cut,
        predicted_optional=[border(box) for box in predicted],
    )


def same_cells_f1(fields: Sequence[tuple[np.ndarray, np.ndarray, tuple[int, int], float]]) -> float:
    """F1 of the cells found in each field's maps against those found in its reference maps (the
    same field through another runtime or precision), over every field: whether a change keeps the
    cells. Each field: (maps, reference maps, full-resolution shape, factor back to it)."""
    from cells.detect import cells_from_maps

    total = None
    for maps, reference, shape, factor in fields:
        found = [cell.box for cell in cells_from_maps(maps, shape, factor)]
        wanted = [AnnotatedBox(cell.box, "red blood cell") for cell in cells_from_maps(reference, shape, factor)]
        match = score_field(found, wanted, shape[1], shape[0])
        total = match if total is None else total + match
    return total.f1


MERGE_COVER = 0.6  # a box holding this much of two annotated cells holds both


def explain_errors(
    predicted: Sequence[Box],
    annotated: Sequence[AnnotatedBox],
    match: Match,
    width: int,
    height: int,
    margin: int = BORDER_MARGIN,
) -> Counter[str]:
    """What each FP and FN in `match` (from `score_field`, same arguments) is, so detector errors
    can be told from annotation gaps.

    FP: "fp merged" holds >= 60% of two or more annotated cells; "fp misfit" best overlaps an
    annotated cell nothing matched (IoU < 0.5: too big, too small or off); "fp fragment" lies
    mostly inside a cell another box matched; "fp outside annotations" lies mostly outside every
    annotated cell, an object nobody boxed (in IML mostly unannotated red cells).
    FN: "fn merged" sits >= 60% inside a predicted box that holds another annotated cell too,
    "fn missed" overlaps no predicted box, "fn misfit" the rest.
    """
    every_cell = [a.box for a in annotated if a.type in CELL_TYPES]
    clear = [a.box for a in clear_cells(annotated, width, height, margin)]
    merges = (covered_matrix(predicted, every_cell) >= MERGE_COVER).sum(axis=1) >= 2  # per predicted box
    matched_true = {true for _, true in match.pairs}
    ious = iou_matrix(predicted, clear)
    inside = covered_matrix(every_cell, predicted)  # [every annotated cell, predicted]
    errors: Counter[str] = Counter()
    for index in match.false_positives:
        if merges[index]:
            errors["fp merged"] += 1
        elif len(clear) and ious[index].max() > 0 and int(ious[index].argmax()) not in matched_true:
            errors["fp misfit"] += 1
        elif len(every_cell) and inside[:, index].max() > 0.5:
            errors["fp fragment"] += 1
        else:
            errors["fp outside annotations"] += 1
    # per clear cell: inside a predicted box that holds two annotated cells
    in_merge = ((covered_matrix(predicted, clear) >= MERGE_COVER) & merges[:, None]).any(axis=0)
    for true in sorted(set(range(len(clear))) - matched_true):
        if in_merge[true]:
            errors["fn merged"] += 1
        elif not len(predicted) or ious[:, true].max() == 0:
            errors["fn missed"] += 1
        else:
            errors["fn misfit"] += 1
    return errors


def infected_found(
    predicted: Sequence[Box], annotated: Sequence[AnnotatedBox]
) -> tuple[int, int]:
    """(found, annotated) infected cells, border included: a miss here is a missed parasite."""
    infected = [a.box for a in annotated if a.type in INFECTED_TYPES]
    if not infected or not predicted:
        return 0, len(infected)
    return int((iou_matrix(infected, predicted) >= MIN_IOU).any(axis=1).sum()), len(infected)


def load_annotations(path: Path) -> dict[str, list[AnnotatedBox]]:
    """IML annotations.json -> {image name: [AnnotatedBox]}; coordinates arrive as strings."""
    if not Path(path).is_file():
        raise MissingInput(f"annotations not found: {path}")
    result = {}
    for entry in json.loads(Path(path).read_text()):
        objects = []
        for obj in entry["objects"]:
            bbox = obj["bbox"]
            box = (int(bbox["x"]), int(bbox["y"]), int(bbox["w"]), int(bbox["h"]))
            objects.append(AnnotatedBox(box=box, type=obj["type"]))
        result[entry["image_name"]] = objects
    return result


def load_rgb(path: Path) -> np.ndarray:
    """A field image as an H x W x 3 uint8 RGB array."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def print_detection_report(images: Path, annotations_path: Path, margin: int = BORDER_MARGIN,
                           find: Callable[[np.ndarray], list] | None = None) -> Match:
    """Print found vs annotated per field, then overall P/R/F1, the error kinds and mean seconds per
    field, for `find` (field -> cells; default the classical finder with border cells kept)."""
    if find is None:
        from cells.find import find_cells  # here, so the metrics import without scikit-image

        def find(image: np.ndarray) -> list:
            return find_cells(image, keep_border=True)

    annotations = load_annotations(annotations_path)
    total = Match(0, 0, 0)
    errors: Counter[str] = Counter()
    infected = np.zeros(2, dtype=int)
    seconds = 0.0
    print(f"{'field':<16}{'found':>6}{'annot':>6}{'TP':>6}{'FP':>5}{'FN':>5}{'F1':>7}")
    for name in sorted(annotations):
        image = load_rgb(images / name)
        height, width = image.shape[:2]
        start = time.perf_counter()
        boxes = [cell.box for cell in find(image)]
        seconds += time.perf_counter() - start
        match = score_field(boxes, annotations[name], width, height, margin)
        infected += infected_found(boxes, annotations[name])
        errors += explain_errors(boxes, annotations[name], match, width, height, margin)
        total = total + match
        print(
            f"{name:<16}{match.tp + match.fp:>6}{match.tp + match.fn:>6}"
            f"{match.tp:>6}{match.fp:>5}{match.fn:>5}{match.f1:>7.3f}"
        )
    print(
        f"\n{len(annotations)} fields, border margin {margin} px: TP {total.tp}  FP {total.fp}"
        f"  FN {total.fn}  precision {total.precision:.4f}  recall {total.recall:.4f}"
        f"  F1 {total.f1:.4f}"
    )
    print("errors: " + ", ".join(f"{kind} {count}" for kind, count in sorted(errors.items())))
    print(f"infected cells found (IoU >= {MIN_IOU}, border included): {infected[0]}/{infected[1]}")
    print(f"mean seconds per field (finding only): {seconds / max(len(annotations), 1):.3f}")
    return total
