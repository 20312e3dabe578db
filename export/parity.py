"""The export's parity gate: the served model must give the Keras model's answers on real cells."""
from __future__ import annotations

from pathlib import Path

import numpy as np

FP32_TOLERANCE = 1e-4
FP16_MIN_AGREEMENT = 0.995
# The committed real cells; the parity gate runs on them unless told otherwise.
DEFAULT_PARITY_DATA = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "cells"


def parity(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Max |diff| of probabilities and the share of identical predicted classes."""
    return {
        "max_abs_diff": float(np.max(np.abs(reference - candidate))) if len(reference) else 0.0,
        "class_agreement": float(np.mean(reference.argmax(1) == candidate.argmax(1))) if len(reference) else 1.0,
    }


def check_gate(fp32: dict, fp16: dict | None) -> list[str]:
    """Reasons the export fails its parity gate (empty when it passes)."""
    failures = []
    if fp32["max_abs_diff"] > FP32_TOLERANCE or fp32["class_agreement"] < 1.0:
        failures.append(
            f"FP32 ONNX differs from Keras: max |diff| {fp32['max_abs_diff']:.2e} (limit {FP32_TOLERANCE:g}), "
            f"class agreement {fp32['class_agreement']:.2%}"
        )
    if fp16 is not None and fp16["class_agreement"] < FP16_MIN_AGREEMENT:
        failures.append(f"FP16 ONNX class agreement {fp16['class_agreement']:.2%} < {FP16_MIN_AGREEMENT:.1%}")
    return failures
