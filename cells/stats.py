"""Small statistics every stage reports the same way."""
from __future__ import annotations


def ratio(numerator: float, denominator: float) -> float | None:
    """numerator / denominator, or None when there is nothing to divide by (reported as null, not 0)."""
    return numerator / denominator if denominator else None
