"""The benchmarks' statistics (``benchmarks/common.py``): the interval that says whether a
measured difference is more than the machine's noise must itself be right."""

from __future__ import annotations

import math
import random

from benchmarks.common import bootstrap_diff, bootstrap_median, median, percentile


def _rounds(seed: int, n_rounds: int = 8, per_round: int = 16) -> list[list[float]]:
    """Values whose rounds differ a lot (a busy VM) and vary a little within a round."""
    rng = random.Random(seed)
    return [[rng.gauss(1000.0 + 300.0 * r, 20.0) for _ in range(per_round)]
            for r in range(n_rounds)]


def test_percentile_and_median() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 25) == 2.0
    assert percentile([1.0, 2.0], 100) == 2.0
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert math.isnan(median([]))  # no values, no median


def test_paired_rounds_see_a_shift_through_the_rounds_noise() -> None:
    a = _rounds(1)
    b = [[x + 5.0 for x in rnd] for rnd in a]
    # Drawn together, each pair of rounds differs by exactly the shift.
    assert bootstrap_diff(a, b, paired=True) == [5.0, 5.0]
    # Drawn apart, the rounds' own spread (300 per round) swamps 5: the interval says so.
    lo, hi = bootstrap_diff(a, b)
    assert lo < 5.0 < hi and hi - lo > 200.0


def test_no_difference_and_the_same_seed_gives_the_same_interval() -> None:
    a, b = _rounds(2), _rounds(3)
    lo, hi = bootstrap_diff(a, b, seed=7)
    assert lo < 0.0 < hi
    assert bootstrap_diff(a, b, seed=7) == [lo, hi]


def test_whole_rounds_are_resampled_not_single_values() -> None:
    # One slow round in b (every value +400): resampling single values would give an interval
    # about one number; resampling rounds shows that the median can move by the slow round.
    a = [[1000.0 + i for i in range(16)] for _ in range(4)]
    b = [list(rnd) for rnd in a[:3]] + [[x + 400.0 for x in a[3]]]
    lo, hi = bootstrap_diff(a, b, paired=True)
    assert lo == 0.0 and hi >= 200.0


def test_the_median_of_paired_differences_and_its_interval() -> None:
    # Differences of paired rounds: mostly small, with the outliers a missed prefill step
    # makes. The median's interval holds the true centre and shuts out the outliers' pull.
    rng = random.Random(4)
    diffs = [rng.gauss(-8.0, 20.0) for _ in range(90)] + [400.0, 590.0, 300.0, 250.0, 450.0]
    lo, hi = bootstrap_median(diffs)
    assert lo < -8.0 < hi and hi < 10.0  # the mean (about +13) would say otherwise
    assert bootstrap_median([3.0] * 10) == [3.0, 3.0]
    assert bootstrap_median(diffs, seed=1) != bootstrap_median(diffs, seed=2)
