"""Statistics of a study: percentile-bootstrap intervals over seeds and the paired difference.

A study's unit of replication is the RL seed: each (method, seed) run yields one held-out success
(a fraction in [0, 1]). The interval of a method's mean is the percentile bootstrap of the mean
over its seeds; the difference vs the reference method is paired by seed (same warm-start, same
task draws per step), so it resamples seeds and averages ``method[s] - reference[s]``.

With n seeds the bootstrap only has n**n resamples: for n = 3 every atom, the extreme ones
included, has mass >= 1/27 > 2.5 %, so the 95 % interval is [min, max] of the seeds. It says
how far the seeds spread, not a coverage guarantee; more seeds are what narrows it.
"""
from __future__ import annotations

import math
import random
from typing import Sequence

LEVEL = 0.95


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of already-sorted values, linear between order statistics."""
    if not sorted_values:
        return math.nan
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def bootstrap_ci(values: Sequence[float], resamples: int = 10_000, seed: int = 0,
                 level: float = LEVEL) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``values`` (one value per seed).

    ``resamples`` means of n values drawn with replacement by ``random.Random(seed)``; the
    interval is their (1 - level) / 2 and (1 + level) / 2 quantiles. (nan, nan) for no values;
    (v, v) for one value (nothing to resample).
    """
    vals = [float(v) for v in values]
    if not vals:
        return math.nan, math.nan
    if resamples < 1:
        raise ValueError(f"bootstrap resamples must be >= 1, got {resamples}")
    rng, n = random.Random(seed), len(vals)
    means = sorted(sum(rng.choice(vals) for _ in range(n)) / n for _ in range(resamples))
    return quantile(means, (1 - level) / 2), quantile(means, (1 + level) / 2)


def mean(values: Sequence[float]) -> float:
    vals = [float(v) for v in values]
    return sum(vals) / len(vals) if vals else math.nan


def summary(values: Sequence[float], resamples: int, seed: int) -> dict[str, float | list[float]]:
    """{"mean", "lo", "hi", "n", "values"} of one column (values in seed order)."""
    lo, hi = bootstrap_ci(values, resamples, seed)
    return {"mean": mean(values), "lo": lo, "hi": hi, "n": len(values), "values": [float(v) for v in values]}


def paired_diff(values: dict[int, float], reference: dict[int, float], resamples: int,
                seed: int) -> dict[str, float | list[float]] | None:
    """Summary of ``values[s] - reference[s]`` over the seeds both have (None if none)."""
    common = sorted(set(values) & set(reference))
    if not common:
        return None
    out = summary([values[s] - reference[s] for s in common], resamples, seed)
    out["seeds"] = common
    return out
