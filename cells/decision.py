"""The decision rule stored with a classifier: the cell threshold and the per-slide call.

A cell is Parasitized when p(parasitized) >= the threshold. The threshold is chosen on a lab's
validation fields (`smearscope adapt`) and stored beside the model as decision.json, with the
validation curve (how many validation cells of each class pass each of a grid of thresholds), so
the false-positive rate and sensitivity are known at the stored threshold and at any `--threshold`
that overrides it. Without a decision.json the threshold is 0.5 (the larger probability) and no
rate is known.

A slide's call weighs its count against the false positives the model is known to make:
positive when the Wilson 95 % interval of its Parasitized share lies wholly above the
false-positive rate (its upper 95 % bound), negative when the interval lies below what that rate
plus a parasitemia of `negative_below` would give, uncertain otherwise. One unsure cell among a
few hundred is then never a positive slide, and a negative needs enough cells to be one.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from cells.contract import CLASSES, PARASITIZED
from cells.errors import BadInput
from cells.stats import wilson_interval

DECISION_FILE = "decision.json"
DEFAULT_THRESHOLD = 0.5
NEGATIVE_BELOW = 0.001  # a parasitemia below 0.1 % is called negative when the counts rule it out
CALLS = ("positive", "negative", "uncertain")
# Thresholds evenly spaced in logit from 6e-6 to 1 - 6e-6: fine near 0 and 1, where thresholds for a
# low false-positive rate sit.
GRID = tuple(float(t) for t in 1.0 / (1.0 + np.exp(-np.linspace(-12.0, 12.0, 481))))


@dataclass(frozen=True)
class Rates:
    """Validation rates at one threshold; None where nothing was validated."""

    false_positive_rate: float | None
    false_positive_high: float | None  # upper 95 % Wilson bound
    sensitivity: float | None


@dataclass(frozen=True)
class Decision:
    threshold: float = DEFAULT_THRESHOLD
    validated_on: str = ""
    uninfected: int = 0
    infected: int = 0
    thresholds: tuple[float, ...] = ()  # the curve: validation cells at p >= each threshold
    false_positives: tuple[int, ...] = ()
    true_positives: tuple[int, ...] = ()

    @classmethod
    def from_validation(cls, labels: np.ndarray, p_parasitized: np.ndarray, threshold: float,
                        validated_on: str) -> Decision:
        infected = np.asarray(labels) == PARASITIZED
        p = np.asarray(p_parasitized, dtype=np.float64)
        grid = sorted(set(GRID) | {float(threshold)})
        return cls(
            threshold=float(threshold), validated_on=validated_on,
            uninfected=int((~infected).sum()), infected=int(infected.sum()), thresholds=tuple(grid),
            false_positives=tuple(int((p[~infected] >= t).sum()) for t in grid),
            true_positives=tuple(int((p[infected] >= t).sum()) for t in grid),
        )

    def with_threshold(self, threshold: float | None) -> Decision:
        """The same validation with another threshold (None keeps the stored one)."""
        if threshold is None:
            return self
        if not 0.0 < threshold < 1.0:
            raise BadInput(f"threshold must be between 0 and 1, not {threshold}")
        return replace(self, threshold=float(threshold))

    def rates(self) -> Rates:
        """Validation rates at this threshold, read from the curve at the grid threshold just below
        it (which errs toward more false positives and more sensitivity)."""
        if not self.thresholds or not self.uninfected:
            return Rates(None, None, None)
        index = max(0, int(np.searchsorted(self.thresholds, self.threshold, side="right")) - 1)
        fp = self.false_positives[index]
        sensitivity = self.true_positives[index] / self.infected if self.infected else None
        return Rates(fp / self.uninfected, wilson_interval(fp, self.uninfected)[1], sensitivity)

    def validation(self) -> str:
        """What the threshold was chosen on, as a lab reads it: the data set by name and the counts."""
        if not self.validated_on:
            return "not validated on a lab's fields"
        return f"chosen on {self.validated_on} ({self.uninfected:,} uninfected and {self.infected:,} infected cells)"

    def describe(self) -> str:
        """The rule in one line: the threshold to three decimals and what it was validated on."""
        return f"p(parasitized) ≥ {self.threshold:.3f}, {self.validation()}"

    def triton_parameters(self) -> dict[str, str]:
        """The rule as parameters of the served model's Triton config, so that a plain KServe-v2 client
        (`GET /v2/models/<name>/config`) calls cells as the batch job and the page do."""
        rates = self.rates()
        parameters = {
            "decision_class": CLASSES[PARASITIZED],
            "decision_output_index": str(PARASITIZED),
            "decision_threshold": repr(float(self.threshold)),
            "decision_rule": f"a cell is {CLASSES[PARASITIZED]} when probabilities[{PARASITIZED}] >= decision_threshold",
            "decision_validated_on": self.validation(),
        }
        if rates.false_positive_rate is not None:
            parameters["decision_false_positive_rate"] = f"{rates.false_positive_rate:.4f}"
        if rates.sensitivity is not None:
            parameters["decision_sensitivity"] = f"{rates.sensitivity:.4f}"
        return parameters

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Decision:
        """Raises ValueError on unknown keys, a threshold outside (0, 1) or curves of unequal length."""
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}")
        decision = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
        curves = {len(decision.thresholds), len(decision.false_positives), len(decision.true_positives)}
        if not 0.0 < float(decision.threshold) < 1.0 or len(curves) != 1:
            raise ValueError("the threshold must lie in (0, 1) and the curves must have one length")
        return decision


def read_decision(model_dir: Path) -> Decision:
    """The model directory's decision.json, or the 0.5 threshold with no validation when it has none."""
    path = Path(model_dir) / DECISION_FILE
    if not path.is_file():
        return Decision()
    try:
        return Decision.from_json(json.loads(path.read_text()))
    except (ValueError, TypeError) as error:
        raise BadInput(f"{path} is not a decision file: {error}") from error


def choose_threshold(labels: np.ndarray, p_parasitized: np.ndarray, max_false_positive_rate: float) -> float:
    """The lowest threshold that calls at most `max_false_positive_rate` of the uninfected cells
    Parasitized (so sensitivity is as high as that allows): midway between the highest-scored
    uninfected cell that must stay Uninfected and the next one up."""
    scores = np.sort(np.asarray(p_parasitized, np.float64)[np.asarray(labels) != PARASITIZED])[::-1]
    if not len(scores):
        raise BadInput("no uninfected validation cell to choose a threshold on")
    allowed = int(np.floor(max_false_positive_rate * len(scores)))
    if allowed >= len(scores):
        return float(scores[-1])
    above = 1.0 if allowed == 0 else scores[allowed - 1]
    return float((scores[allowed] + above) / 2)


def slide_call(parasitized: int, cells: int, decision: Decision, negative_below: float = NEGATIVE_BELOW) -> str:
    """positive, negative or uncertain for `parasitized` of `cells` called Parasitized (module docstring)."""
    if cells == 0:
        return "uncertain"
    rates = decision.rates()
    false_rate = rates.false_positive_high or 0.0
    sensitivity = rates.sensitivity if rates.sensitivity is not None else 1.0
    low, high = wilson_interval(parasitized, cells)
    if low > false_rate:
        return "positive"
    if high < false_rate + sensitivity * negative_below:
        return "negative"
    return "uncertain"
