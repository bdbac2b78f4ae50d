"""The measurements the heuristic policy decides on: validation plateaus and seed health.
Pure functions of the numbers, so each is tested on its own."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def epochs_without_improvement(history: Sequence[float], *, min_delta: float,
                               higher_is_better: bool) -> int:
    """Epochs since the validation metric last beat its best so far by more than `min_delta`
    (the first epoch sets the best). Improvements of `min_delta` or less do not reset it, so
    a slow crawl counts as a plateau."""
    sign = 1.0 if higher_is_better else -1.0
    best: float | None = None
    since = 0
    for value in history:
        if best is None or sign * (value - best) > min_delta:
            best, since = value, 0
        else:
            since += 1
    return since


@dataclass(frozen=True)
class HealthWeights:
    """How much each symptom of an under-used chunk weighs in its health score."""

    variance: float = 1.0
    dead_ratio: float = 1.0
    correlation: float = 1.0


def health_scores(chunk_variance: Sequence[float], dead_ratio: Sequence[float],
                  mean_abs_correlation: Sequence[float], weights: HealthWeights) -> list[float]:
    """Per seed, lower is worse: a chunk whose activations vary less than its layer's average,
    are often dead, or are strongly correlated (redundant features) is where extra capacity is
    most likely to help.

    score = w_var * variance / mean variance of the layer - w_dead * dead - w_corr * correlation.
    Variance is normalised by the layer mean so layers of different scales compare. A metric
    that is NaN (not measured) counts as neutral: variance ratio 1, dead ratio and correlation 0.
    """
    finite = [v for v in chunk_variance if math.isfinite(v)]
    layer_mean = sum(finite) / len(finite) if finite else 0.0
    scores = []
    for variance, dead, correlation in zip(chunk_variance, dead_ratio, mean_abs_correlation,
                                           strict=True):
        ratio = variance / layer_mean if math.isfinite(variance) and layer_mean > 0 else 1.0
        scores.append(weights.variance * ratio - weights.dead_ratio * _or_zero(dead)
                      - weights.correlation * _or_zero(correlation))
    return scores


def chunk_size(features: int, num_seeds: int, index: int) -> int:
    """DESIGN §3.1: contiguous chunks; the first `features % num_seeds` are one wider."""
    return features // num_seeds + (1 if index < features % num_seeds else 0)


def _or_zero(value: float) -> float:
    return value if math.isfinite(value) else 0.0
