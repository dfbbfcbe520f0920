"""95% intervals for benchmark scores: a score on 50 items (or 24 MT-Bench turns) moves by several points on another
draw of as many items, and a bare mean hides that. Percentile bootstrap over items, seeded, so the same answers give
the same interval in every run."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def bootstrap_ci(values: Sequence[float], seed: int, resamples: int) -> tuple[float, float]:
    """The 2.5th and 97.5th percentiles of the mean over `resamples` draws of len(values) items with replacement:
    no assumption about the score's distribution (win rates, probability masses and accuracies alike)."""
    data = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


@dataclass(frozen=True)
class Bootstrap:
    """The seed and resample count every score of a run shares: scores over the same items are resampled alike."""

    seed: int
    resamples: int

    def mean(self, name: str, values: Sequence[float]) -> dict:
        """{name: the mean, name_ci95: "[lo, hi]"}. The interval is text (valid JSON) because `dvc metrics show`
        drops lists and two numeric keys would add two columns per score; the plot rows keep it as numbers."""
        lo, hi = bootstrap_ci(values, self.seed, self.resamples)
        return {name: statistics.fmean(values), f"{name}_ci95": f"[{lo:.3f}, {hi:.3f}]"}
