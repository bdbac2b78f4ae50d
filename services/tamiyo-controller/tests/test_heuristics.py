"""The measurements behind the heuristic policy."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tamiyo.heuristics import (
    HealthWeights,
    chunk_size,
    epochs_without_improvement,
    health_scores,
)


@pytest.mark.parametrize(("history", "higher", "expected"), [
    ([], True, 0),
    ([0.5], True, 0),
    ([0.5, 0.6, 0.7], True, 0),
    ([0.5, 0.6, 0.6, 0.6], True, 2),
    ([0.5, 0.6, 0.605, 0.609], True, 2),      # gains of min_delta or less are a plateau
    ([0.5, 0.6, 0.55, 0.62], True, 0),
    ([0.5, 0.4, 0.3], True, 2),                # getting worse
    ([0.5, 0.4, 0.3], False, 0),               # a loss going down is progress
])
def test_epochs_without_improvement(history, higher, expected):
    assert epochs_without_improvement(history, min_delta=0.01,
                                      higher_is_better=higher) == expected


@given(st.lists(st.floats(-1e6, 1e6), max_size=30))
def test_a_new_best_resets_the_plateau(history):
    improving = [*history, max(history, default=0.0) + 1.0]
    assert epochs_without_improvement(improving, min_delta=0.5, higher_is_better=True) == 0
    stalled = [*improving, improving[-1]]
    assert epochs_without_improvement(stalled, min_delta=0.5, higher_is_better=True) == 1


def test_health_score_weighs_variance_dead_units_and_correlation():
    scores = health_scores([2.0, 1.0, 1.0, 0.0], [0.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.0],
                           HealthWeights(variance=1.0, dead_ratio=2.0, correlation=3.0))
    # Layer mean variance is 1.0.
    assert scores == pytest.approx([2.0, 0.0, -0.5, 0.0])


def test_variance_is_relative_to_the_layer():
    small = health_scores([0.01, 0.02], [0, 0], [0, 0], HealthWeights())
    large = health_scores([100.0, 200.0], [0, 0], [0, 0], HealthWeights())
    assert small == pytest.approx(large)


def test_unmeasured_metrics_are_neutral():
    nan = math.nan
    scores = health_scores([nan, 1.0, 3.0], [nan, 0.0, 0.0], [nan, 0.0, 0.0], HealthWeights())
    assert scores == pytest.approx([1.0, 0.5, 1.5])
    assert health_scores([nan, nan], [0, 0], [0, 0], HealthWeights()) == [1.0, 1.0]


@given(st.integers(1, 5000), st.integers(1, 5000))
def test_chunks_cover_every_feature_and_differ_by_at_most_one(features, num_seeds):
    num_seeds = min(num_seeds, features)
    sizes = [chunk_size(features, num_seeds, i) for i in range(num_seeds)]
    assert sum(sizes) == features
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
