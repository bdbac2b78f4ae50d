"""The stability guard's rule (tamiyo.stability), on both of its copies: Tamiyo's and the one
Kasmina's LocalController uses (kasmina/stability.py, loaded from its file: importing the kasmina
package would need torch). The spec: a metric spike is worse than the baseline's median by more
than spike_mads MADs in the metric's own direction; rollback_limit rollbacks within
rollback_window epochs; drift above drift_limit; growth resumes at the resume_epochs-th epoch
after the newest instability.

Metrics are binary-exact (multiples of powers of two) so "exactly k MADs" means exactly."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import tamiyo.stability
from hypothesis import given
from hypothesis import strategies as st

KASMINA_COPY = (Path(__file__).resolve().parents[2] / "kasmina-runtime" / "src" / "kasmina"
                / "stability.py")
EPS = 2.0**-10


def _kasmina_copy() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kasmina_stability_copy", KASMINA_COPY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(params=["tamiyo", "kasmina"])
def rule(request) -> ModuleType:
    return tamiyo.stability if request.param == "tamiyo" else _kasmina_copy()


def test_the_two_copies_are_the_same_file():
    assert KASMINA_COPY.read_bytes() == Path(tamiyo.stability.__file__).read_bytes()


def _spikes(rule, values, *, higher_is_better, **config):
    """Epochs 0.. with these metrics (None: not measured) -> the spiking epochs."""
    metrics = {e: v for e, v in enumerate(values) if v is not None}
    found = rule.metric_spikes(metrics, higher_is_better=higher_is_better,
                               config=rule.StabilityConfig(**config))
    assert all(i.signal == "metric_spike" for i in found)
    return [i.epoch for i in found]


# Baseline 1.0, 1.5, 2.0, 2.5, 3.0: median 2.0, MAD 0.5 (the 1% floor, 0.02, is below it).
BASELINE = [1.0, 1.5, 2.0, 2.5, 3.0]


@pytest.mark.parametrize(("higher_is_better", "value", "spikes"), [
    # A loss (minimised): up is worse. 5 MADs = 2.5 above the median 2.0.
    (False, 4.5, False),  # exactly 5 MADs: not more
    (False, 4.5 + EPS, True),
    (False, -100.0, False),  # far better
    # An accuracy (maximised): down is worse.
    (True, -0.5, False),
    (True, -0.5 - EPS, True),
    (True, 100.0, False),
])
def test_a_spike_is_more_than_k_mads_worse_in_the_metrics_direction(rule, higher_is_better,
                                                                     value, spikes):
    assert _spikes(rule, [*BASELINE, value], higher_is_better=higher_is_better) == (
        [5] if spikes else [])


def test_the_same_drop_is_a_spike_for_an_accuracy_and_progress_for_a_loss(rule):
    values = [0.8, 0.8125, 0.8125, 0.8125, 0.8, 0.25]
    assert _spikes(rule, values, higher_is_better=True) == [5]
    assert _spikes(rule, values, higher_is_better=False) == []
    rising = [0.8, 0.8125, 0.8125, 0.8125, 0.8, 2.0]
    assert _spikes(rule, rising, higher_is_better=False) == [5]
    assert _spikes(rule, rising, higher_is_better=True) == []


@pytest.mark.parametrize("mads", [2.0, 8.0])
def test_spike_mads_sets_the_threshold(rule, mads):
    # 3 MADs worse (2.0 + 3 * 0.5): a spike at k = 2, not at k = 8.
    spikes = _spikes(rule, [*BASELINE, 3.5], higher_is_better=False, spike_mads=mads)
    assert (5 in spikes) == (mads < 3)


@pytest.mark.parametrize(("history", "judged"), [(3, False), (4, True)])
def test_a_metric_is_judged_only_on_min_baseline_epochs(rule, history, judged):
    values = [1.0] * history + [9.0]
    assert _spikes(rule, values, higher_is_better=False) == ([history] if judged else [])


def test_the_baseline_is_the_newest_baseline_epochs(rule):
    # Against the newest 4 (all 1.0) 1.5 is a spike; against 8 (median 3.0) it is progress.
    values = [5.0] * 4 + [1.0] * 4 + [1.5]
    assert _spikes(rule, values, higher_is_better=False, baseline_epochs=4) == [8]
    assert _spikes(rule, values, higher_is_better=False, baseline_epochs=8) == []


@pytest.mark.parametrize(("value", "min_spread", "spikes"), [
    (1.0 + 2**-8, 0.01, False),  # 0.4 % worse than a flat 1.0: under 5 x 1 % of it
    (1.0 + 2**-4, 0.01, True),  # 6.25 % worse
    (1.0 + 2**-8, 0.0, True),  # no floor: any worsening of a flat baseline
])
def test_a_flat_baseline_has_a_spread_of_min_spread_of_its_median(rule, value, min_spread,
                                                                  spikes):
    assert _spikes(rule, [1.0] * 4 + [value], higher_is_better=False,
                   min_spread=min_spread) == ([4] if spikes else [])


def test_unmeasured_metrics_are_skipped(rule):
    values = [1.0, None, math.nan, 1.0, 1.0, math.inf, 1.0, 9.0]
    assert _spikes(rule, values, higher_is_better=False) == [7]
    assert _spikes(rule, [1.0, 1.0, 1.0, math.nan, 9.0], higher_is_better=False) == []


def test_a_spike_is_told_with_its_numbers(rule):
    (spike,) = rule.metric_spikes({e: v for e, v in enumerate([*BASELINE, 5.0])},
                                  higher_is_better=False, config=rule.StabilityConfig())
    assert spike == rule.Instability(5, "metric_spike", "validation metric rose to 5 from a "
                                     "median of 2, 6.0 MADs")


def _bursts(rule, epochs, **config):
    found = rule.rollback_bursts(epochs, rule.StabilityConfig(**config))
    assert all(i.signal == "rollbacks" for i in found)
    return [(i.epoch, i.detail) for i in found]


@pytest.mark.parametrize(("epochs", "expected"), [
    ([7], []),  # one is not repeated
    ([3, 7], [7]),  # 3 is within the 5 epochs 3..7
    ([2, 7], []),  # 2 is not
    ([7, 3], [7]),  # in any order
    ([4, 4], [4]),  # two seeds at once: one burst
    ([1, 4, 6, 12], [4, 6]),
])
def test_rollback_limit_rollbacks_within_the_window_are_a_burst(rule, epochs, expected):
    assert [e for e, _ in _bursts(rule, epochs)] == expected


def test_rollback_limit_and_window_are_settings(rule):
    assert _bursts(rule, [1, 2, 3], rollback_limit=3) == [
        (3, "3 seeds rolled back within 5 epochs")]
    assert _bursts(rule, [1, 2], rollback_limit=3) == []
    assert [e for e, _ in _bursts(rule, [2, 7], rollback_window=6)] == [7]
    assert _bursts(rule, [5, 5, 5]) == [(5, "3 seeds rolled back within 5 epochs")]


@pytest.mark.parametrize(("drift", "drifting"), [
    ([0.5], False),  # at the limit
    ([0.5 + EPS], True),
    ([0.1, math.nan, 0.75], True),
    ([math.inf], True),  # the report's drift column is open above
    ([math.nan, math.nan], False),  # not measured
    ([], False),
])
def test_drift_over_the_limit_is_instability(rule, drift, drifting):
    found = rule.drift_instability(9, drift, rule.StabilityConfig())
    assert (found is not None) == drifting
    if found is not None:
        assert (found.epoch, found.signal) == (9, "drift")


@pytest.mark.parametrize(("resume", "paused_at"), [(1, [5]), (3, [5, 6, 7]), (4, [5, 6, 7, 8])])
def test_growth_resumes_after_resume_epochs_stable_epochs(rule, resume, paused_at):
    config = rule.StabilityConfig(resume_epochs=resume)
    spike = rule.Instability(5, "metric_spike", "x")
    pauses = {e: rule.growth_pause(e, [spike], config) for e in range(12)}
    assert [e for e, p in pauses.items() if p is not None] == paused_at
    assert {p.resumes_at for p in pauses.values() if p is not None} == {5 + resume}


def test_the_newest_instability_holds_the_pause(rule):
    config = rule.StabilityConfig()
    old, new = rule.Instability(5, "rollbacks", "r"), rule.Instability(6, "drift", "d")
    assert rule.growth_pause(8, [new, old], config) == rule.GrowthPause(new, 9)
    assert rule.growth_pause(9, [new, old], config) is None
    # On one epoch, the first of SIGNALS.
    tie = [rule.Instability(6, s, s) for s in reversed(rule.SIGNALS)]
    assert rule.growth_pause(6, tie, config).cause.signal == "metric_spike"


def test_an_instability_after_the_epoch_decided_does_not_count(rule):
    later = rule.Instability(7, "drift", "d")
    assert rule.growth_pause(6, [later], rule.StabilityConfig()) is None


def test_a_pause_says_why_and_until_when(rule):
    pause = rule.GrowthPause(rule.Instability(5, "rollbacks", "2 seeds rolled back"), 8)
    assert pause.describe() == ("growth paused: rollbacks at epoch 5 (2 seeds rolled back); "
                                "resumes at epoch 8 if stable")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"spike_mads": 0.0}, "need spike_mads > 0, min_spread >= 0 and drift_limit >= 0"),
    ({"spike_mads": math.nan}, "need spike_mads > 0, min_spread >= 0 and drift_limit >= 0"),
    ({"min_spread": -0.5}, "need spike_mads > 0, min_spread >= 0 and drift_limit >= 0"),
    ({"drift_limit": -1.0}, "need spike_mads > 0, min_spread >= 0 and drift_limit >= 0"),
    ({"min_baseline_epochs": 0}, "need 1 <= min_baseline_epochs <= baseline_epochs"),
    ({"min_baseline_epochs": 9}, "need 1 <= min_baseline_epochs <= baseline_epochs"),
    ({"rollback_limit": 0},
     "need rollback_limit >= 1, rollback_window >= 1 and resume_epochs >= 1"),
    ({"rollback_window": 0},
     "need rollback_limit >= 1, rollback_window >= 1 and resume_epochs >= 1"),
    ({"resume_epochs": 0},
     "need rollback_limit >= 1, rollback_window >= 1 and resume_epochs >= 1"),
])
def test_config_errors_name_the_limit(rule, kwargs, message):
    with pytest.raises(ValueError) as error:
        rule.StabilityConfig(**kwargs)
    assert str(error.value) == message


def test_the_limits_themselves_are_accepted(rule):
    config = rule.StabilityConfig(min_baseline_epochs=8, baseline_epochs=8, rollback_limit=1,
                                  rollback_window=1, resume_epochs=1, min_spread=0.0,
                                  drift_limit=0.0)
    assert config.min_baseline_epochs == config.baseline_epochs == 8


# Far from subnormal (or 0): scaling a subnormal, or a difference that is one, by a power of
# two is not exact.
_METRICS = st.lists(st.one_of(st.floats(-1e6, 1e6).filter(lambda v: v == 0 or abs(v) > 1e-200),
                              st.just(math.nan)), max_size=30)


@given(_METRICS, st.booleans())
def test_a_spike_of_a_metric_is_a_spike_of_its_negation_the_other_way(values, higher):
    metrics = dict(enumerate(values))
    negated = {e: -v for e, v in metrics.items()}
    config = tamiyo.stability.StabilityConfig()
    assert ([i.epoch for i in tamiyo.stability.metric_spikes(metrics, higher_is_better=higher,
                                                             config=config)]
            == [i.epoch for i in tamiyo.stability.metric_spikes(
                negated, higher_is_better=not higher, config=config)])


@given(_METRICS, st.integers(-8, 8))
def test_spikes_do_not_depend_on_the_metrics_unit(values, exponent):
    # A power of two scales every median, MAD and floor exactly.
    metrics = dict(enumerate(values))
    scaled = {e: v * 2.0**exponent for e, v in metrics.items()}
    config = tamiyo.stability.StabilityConfig()
    spikes = [tamiyo.stability.metric_spikes(m, higher_is_better=False, config=config)
              for m in (metrics, scaled)]
    assert [i.epoch for i in spikes[0]] == [i.epoch for i in spikes[1]]


@given(st.lists(st.integers(0, 40), max_size=40), st.integers(1, 4), st.integers(1, 8))
def test_rollback_bursts_match_counting_each_window(epochs, limit, window):
    config = tamiyo.stability.StabilityConfig(rollback_limit=limit, rollback_window=window)
    expected = sorted({e for e in epochs
                       if sum(1 for r in epochs if e - window < r <= e) >= limit})
    assert [i.epoch for i in tamiyo.stability.rollback_bursts(epochs, config)] == expected
