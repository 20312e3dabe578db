"""Small statistics every stage reports the same way."""
from __future__ import annotations


def ratio(numerator: float, denominator: float) -> float | None:
    """numerator / denominator, or None when there is nothing to divide by (reported as null, not 0)."""
    return numerator / denominator if denominator else None


Z_95 = 1.959963984540054  # two-sided 95 % normal quantile


def wilson_interval(successes: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion (95 % by default), as fractions; (0, 1) when total is 0.

    Chosen over the normal (Wald) interval because parasitemia is a small proportion: Wald's
    interval collapses to zero width at 0 parasitized cells and leaves [0, 1] at a few; Wilson's
    keeps its stated coverage there (Brown, Cai & DasGupta, Statistical Science 2001).
    """
    if total <= 0:
        return 0.0, 1.0
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * ((p * (1 - p) / total + z * z / (4 * total * total)) ** 0.5) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


WHO_COUNT_TOLERANCE = 0.25  # WHO level-1 competence: a parasite count within 25 % of the reference


def count_agreement(pairs: list[tuple[float, float]], tolerance: float = WHO_COUNT_TOLERANCE) -> dict:
    """For (annotated, reported) parasitemia pairs: how many have parasites annotated, and how many
    of those are reported within `tolerance` (relative) of the annotated value."""
    positive = [(annotated, reported) for annotated, reported in pairs if annotated > 0]
    within = sum(abs(reported - annotated) <= tolerance * annotated for annotated, reported in positive)
    return {"fields_with_parasites": len(positive), "within": within, "share": ratio(within, len(positive))}
