"""The 95% bootstrap interval every `evaluate` score carries (align/intervals.py), checked where it can be done by
hand, against numpy with the same generator, and against the normal approximation the README's table of item
counts uses."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from align.intervals import Bootstrap, bootstrap_ci


def test_equal_values_give_a_zero_width_interval() -> None:
    assert bootstrap_ci([1.0] * 20, seed=0, resamples=1000) == (1.0, 1.0)
    assert Bootstrap(seed=3, resamples=500).mean("acc", [0, 0, 0]) == {"acc": 0.0, "acc_ci95": "[0.000, 0.000]"}


def test_two_items_give_the_whole_range() -> None:
    """Two items, 0 and 1: a resample's mean is 0 or 1 with probability 1/4 each, far more than the 2.5% in each
    tail, so the interval is [0, 1]."""
    assert bootstrap_ci([0.0, 1.0], seed=0, resamples=1000) == (0.0, 1.0)


def test_interval_is_the_percentiles_of_the_resampled_means() -> None:
    values = [0.0, 1.0, 1.0, 0.0, 1.0, 0.25]
    rows = np.random.default_rng(7).integers(0, len(values), size=(200, len(values)))
    means = [sum(values[i] for i in row) / len(values) for row in rows]
    assert bootstrap_ci(values, seed=7, resamples=200) == tuple(np.percentile(means, [2.5, 97.5]))
    assert bootstrap_ci(values, seed=7, resamples=200) == bootstrap_ci(values, seed=7, resamples=200)


def test_accuracy_near_one_half_is_known_to_about_one_over_sqrt_n() -> None:
    """The README's rule: 400 items scored half right give a half-width near 1.96 * sqrt(0.25 / 400) = 0.049."""
    lo, hi = bootstrap_ci([0.0, 1.0] * 200, seed=0, resamples=2000)
    assert (hi - lo) / 2 == pytest.approx(1.96 * math.sqrt(0.25 / 400), abs=0.005)
    assert lo < 0.5 < hi


def test_the_interval_text_reads_back_as_numbers() -> None:
    score = Bootstrap(seed=0, resamples=1000).mean("win_rate", [True, False, True, True])
    assert score["win_rate"] == 0.75
    lo, hi = json.loads(score["win_rate_ci95"])
    assert 0.0 <= lo <= 0.75 <= hi == 1.0


def test_values_of_one_cluster_are_drawn_together() -> None:
    """40 questions, both turns of a question scored alike (correlated turns): 20 won twice, 20 lost twice. Drawn
    by question, 40 independent items: half-width near 1.96 * sqrt(0.25 / 40) = 0.155; drawn by turn, as if the 80
    turns were independent: 1.96 * sqrt(0.25 / 80) = 0.110, too narrow. The cluster draw is the percentiles of
    (sum of the drawn questions' sums) / (their turns), checked against numpy with the same generator."""
    values = [1.0, 1.0] * 20 + [0.0, 0.0] * 20
    questions = [f"q{i}" for i in range(40) for _ in range(2)]
    lo, hi = bootstrap_ci(values, seed=0, resamples=2000, clusters=questions)
    per_turn = bootstrap_ci(values, seed=0, resamples=2000)
    assert (hi - lo) / 2 == pytest.approx(1.96 * math.sqrt(0.25 / 40), abs=0.012)
    assert hi - lo > 1.25 * (per_turn[1] - per_turn[0])
    drawn = np.random.default_rng(5).integers(0, 40, size=(300, 40))
    sums = np.array([values[2 * q] + values[2 * q + 1] for q in range(40)])
    assert bootstrap_ci(values, seed=5, resamples=300, clusters=questions) == tuple(
        np.percentile(sums[drawn].sum(axis=1) / (2 * 40), [2.5, 97.5]))


def test_one_value_per_cluster_is_the_plain_bootstrap_and_clusters_of_any_size_mix() -> None:
    values = [0.0, 1.0, 1.0, 0.0, 1.0, 0.25]
    assert bootstrap_ci(values, 7, 200, clusters=list(range(6))) == pytest.approx(bootstrap_ci(values, 7, 200))
    # a question with one turn beside questions with two: each draw's mean is over the turns it brought
    lo, hi = bootstrap_ci([1.0, 1.0, 0.0], 0, 1000, clusters=[101, 101, 102])
    assert (lo, hi) == (0.0, 1.0)
    assert Bootstrap(0, 500).mean("win_rate", [1.0, 1.0, 0.0], [101, 101, 102])["win_rate"] == pytest.approx(2 / 3)
