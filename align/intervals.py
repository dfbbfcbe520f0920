"""95% intervals for benchmark scores: a score on 50 items (or 24 MT-Bench turns) moves by several points on another
draw of as many items, and a bare mean hides that. Percentile bootstrap over items, seeded, so the same answers give
the same interval in every run. Items that are not independent (an MT-Bench question's two turns: the second is
asked after the first answer, and a judge that likes one often likes the other) are drawn together, a cluster
bootstrap: drawing turns alone would treat 160 turns as 160 independent items and give too narrow an interval."""

from __future__ import annotations

import statistics
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np


def bootstrap_ci(values: Sequence[float], seed: int, resamples: int,
                 clusters: Sequence[Hashable] | None = None) -> tuple[float, float]:
    """The 2.5th and 97.5th percentiles of the mean over `resamples` draws with replacement: no assumption about the
    score's distribution (win rates, probability masses and accuracies alike). Without `clusters` a draw is
    len(values) items; with them (one id per value) it is as many clusters as there are, each bringing all its
    values, and its mean is over the values drawn: sum of the drawn clusters' sums / sum of their sizes. With one
    value per cluster both are the same draw."""
    data = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    if clusters is None:
        means = data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
    else:
        first: dict[Hashable, int] = {}
        index = np.array([first.setdefault(c, len(first)) for c in clusters])  # cluster number, by first appearance
        sums, sizes = np.bincount(index, weights=data), np.bincount(index)
        drawn = rng.integers(0, len(first), size=(resamples, len(first)))
        means = sums[drawn].sum(axis=1) / sizes[drawn].sum(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


@dataclass(frozen=True)
class Bootstrap:
    """The seed and resample count every score of a run shares: scores over the same items are resampled alike."""

    seed: int
    resamples: int

    def mean(self, name: str, values: Sequence[float], clusters: Sequence[Hashable] | None = None) -> dict:
        """{name: the mean, name_ci95: "[lo, hi]"}, resampled by `clusters` where given (`bootstrap_ci`). The
        interval is text (valid JSON) because `dvc metrics show` drops lists and two numeric keys would add two
        columns per score; the plot rows keep it as numbers."""
        lo, hi = bootstrap_ci(values, self.seed, self.resamples, clusters)
        return {name: statistics.fmean(values), f"{name}_ci95": f"[{lo:.3f}, {hi:.3f}]"}
