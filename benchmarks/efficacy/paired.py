"""Paired differences between two methods over the same random seeds, with a 95 % t interval.

Each random seed fixes the data order and the initialisation for every method, so the
comparison is per seed: d_i = method_i - baseline_i. `direction` says which sign is better
("max": accuracy, "min": a loss), so `better` counts the seeds where the method wins."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# Two-sided 95 % quantiles of Student's t, df 1..30 (any statistics table); above 30 the
# normal quantile is within 2 % of the t quantile, an interval at most 2 % too narrow.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    if df < 1:
        raise ValueError(f"a t interval needs at least 2 pairs (df >= 1), got df={df}")
    return _T975[df - 1] if df <= len(_T975) else 1.960


@dataclass(frozen=True)
class PairedDiff:
    n: int
    mean: float  # mean of method - baseline
    lo: float  # 95 % t interval of the mean
    hi: float
    better: int  # seeds where the method beats the baseline (strictly, in `direction`)
    worse: int

    @property
    def significant(self) -> bool:
        """The interval excludes zero."""
        return self.lo > 0 or self.hi < 0


def paired(baseline: Sequence[float], method: Sequence[float], direction: str) -> PairedDiff:
    """Paired difference method - baseline; ValueError on unequal lengths, fewer than two
    pairs, a non-finite value or an unknown direction."""
    if direction not in ("max", "min"):
        raise ValueError(f"direction must be 'max' or 'min', got {direction!r}")
    if len(baseline) != len(method):
        raise ValueError(f"unpaired: {len(baseline)} baseline values, {len(method)} method values")
    d = [float(m) - float(b) for b, m in zip(baseline, method, strict=True)]
    if not all(math.isfinite(x) for x in d):
        raise ValueError(f"non-finite values in a paired difference: {d}")
    n = len(d)
    half = t975(n - 1) * sd(d) / math.sqrt(n)
    mean = sum(d) / n
    sign = 1.0 if direction == "max" else -1.0
    return PairedDiff(n, mean, mean - half, mean + half, sum(sign * x > 0 for x in d),
                      sum(sign * x < 0 for x in d))


def sd(values: Sequence[float]) -> float:
    """Sample standard deviation (n - 1)."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
