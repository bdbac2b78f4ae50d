"""The gates of DESIGN §3.2, one seed at a time: every threshold just below, at and just above,
non-finite inputs, the safety limits, and the metric's direction (mode max / min).

Expected readiness is worked out from DESIGN §3.2's table and `KasminaConfig`'s documented
defaults (0.05, 50, 5, alpha 1.0, 3, 2, 0.0, 3, 0.001), not read back from gates.py."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from kasmina import ControllerConfig, KasminaConfig, LocalController, SeedStage, wrap
from kasmina.gates import evaluate_gates, gate_reason
from torch import nn

S = SeedStage
CFG = KasminaConfig()
NAN, INF = math.nan, math.inf


def below(x: float) -> float:
    return float(np.nextafter(x, -np.inf))


def above(x: float) -> float:
    return float(np.nextafter(x, np.inf))


def gate(stage: S, *, epochs: int = 0, steps: float = 0, recon: float = NAN,
         alpha: float = 0.0, drift: float = 0.0, grad_norm: float = 0.0,
         contribution: float = NAN, gain: float = NAN, cfg: KasminaConfig = CFG) -> S | None:
    """The readiness of one seed with these measurements (None: ready for nothing)."""
    def col(v, dtype=np.float64):
        return np.array([v], dtype=dtype)

    ready = evaluate_gates(col(int(stage), np.int32), col(epochs, np.int32), col(steps),
                           col(recon), col(alpha), col(drift), col(grad_norm),
                           col(contribution), col(gain), cfg)
    assert set(ready) <= {0}
    return ready.get(0)


def test_defaults_are_designs():
    """DESIGN §3.2's guard column; every test below relies on these numbers."""
    assert (CFG.reconstruction_threshold, CFG.min_training_steps, CFG.max_training_epochs,
            CFG.stabilization_epochs, CFG.evaluation_epochs, CFG.evaluation_min_gain,
            CFG.fine_tuning_epochs, CFG.fossilize_min_gain, CFG.embargo_epochs,
            CFG.max_active_seeds) == (0.05, 50, 5, 3, 2, 0.0, 3, 0.001, 10, 4)


# ---------------------------------------------------------------- TRAINING -> GRAFTING / CULLED
@pytest.mark.parametrize(("recon", "expected"), [
    (0.0, S.GRAFTING), (below(0.05), S.GRAFTING), (0.05, S.GRAFTING), (above(0.05), None),
    (1.0, None), (NAN, None), (INF, None)])
def test_reconstruction_threshold_is_inclusive(recon, expected):
    assert gate(S.TRAINING, epochs=1, steps=50, recon=recon) is expected


@pytest.mark.parametrize(("steps", "expected"), [(0, None), (49, None), (50, S.GRAFTING),
                                                 (51, S.GRAFTING)])
def test_reconstruction_gate_needs_min_training_steps(steps, expected):
    assert gate(S.TRAINING, epochs=1, steps=steps, recon=0.01) is expected


@pytest.mark.parametrize(("epochs", "expected"), [(0, None), (4, None), (5, S.CULLED),
                                                  (6, S.CULLED)])
def test_training_culled_after_max_training_epochs_without_passing(epochs, expected):
    assert gate(S.TRAINING, epochs=epochs, steps=1000, recon=0.5) is expected
    assert gate(S.TRAINING, epochs=epochs, steps=49, recon=0.0) is expected  # too few steps
    assert gate(S.TRAINING, epochs=epochs, steps=1000, recon=NAN) is expected  # unmeasured


@pytest.mark.parametrize("epochs", [4, 5, 6])
def test_a_passed_reconstruction_gate_grafts_even_at_the_training_limit(epochs):
    assert gate(S.TRAINING, epochs=epochs, steps=50, recon=0.05) is S.GRAFTING


def test_reconstruction_thresholds_follow_the_config():
    cfg = KasminaConfig(reconstruction_threshold=0.5, min_training_steps=3, max_training_epochs=2)
    assert gate(S.TRAINING, epochs=1, steps=3, recon=0.5, cfg=cfg) is S.GRAFTING
    assert gate(S.TRAINING, epochs=1, steps=2, recon=0.5, cfg=cfg) is None
    assert gate(S.TRAINING, epochs=1, steps=3, recon=above(0.5), cfg=cfg) is None
    assert gate(S.TRAINING, epochs=2, steps=3, recon=above(0.5), cfg=cfg) is S.CULLED
    assert gate(S.TRAINING, epochs=1, steps=3, recon=above(0.5), cfg=cfg) is None


# ---------------------------------------------------------------- GRAFTING -> STABILIZATION
@pytest.mark.parametrize(("alpha", "expected"), [(0.0, None), (0.5, None), (below(1.0), None),
                                                 (1.0, S.STABILIZATION), (NAN, None)])
def test_grafting_ends_when_alpha_reaches_one(alpha, expected):
    assert gate(S.GRAFTING, epochs=7, alpha=alpha) is expected


# ---------------------------------------------------------------- STABILIZATION -> EVALUATING
@pytest.mark.parametrize(("epochs", "expected"), [(0, None), (2, None), (3, S.EVALUATING),
                                                  (4, S.EVALUATING)])
def test_stabilization_lasts_stabilization_epochs(epochs, expected):
    assert gate(S.STABILIZATION, epochs=epochs, alpha=1.0) is expected


# ------------------------------------------------------------ EVALUATING -> FINE_TUNING / CULLED
@pytest.mark.parametrize(("contribution", "expected"), [
    (-1.0, S.CULLED), (below(0.0), S.CULLED), (0.0, S.CULLED), (above(0.0), S.FINE_TUNING),
    (0.3, S.FINE_TUNING), (NAN, None)])
def test_evaluation_needs_a_contribution_strictly_above_min_gain(contribution, expected):
    assert gate(S.EVALUATING, epochs=2, contribution=contribution) is expected
    assert gate(S.EVALUATING, epochs=3, contribution=contribution) is expected


@pytest.mark.parametrize("contribution", [-1.0, 0.0, 0.3, NAN])
@pytest.mark.parametrize("epochs", [0, 1])
def test_evaluation_judges_nothing_before_evaluation_epochs(epochs, contribution):
    assert gate(S.EVALUATING, epochs=epochs, contribution=contribution) is None


def test_evaluation_min_gain_may_be_negative():
    cfg = KasminaConfig(evaluation_min_gain=-0.25)
    assert gate(S.EVALUATING, epochs=2, contribution=above(-0.25), cfg=cfg) is S.FINE_TUNING
    assert gate(S.EVALUATING, epochs=2, contribution=-0.25, cfg=cfg) is S.CULLED
    cfg = KasminaConfig(evaluation_min_gain=0.5, evaluation_epochs=4)
    assert gate(S.EVALUATING, epochs=3, contribution=0.75, cfg=cfg) is None
    assert gate(S.EVALUATING, epochs=4, contribution=0.75, cfg=cfg) is S.FINE_TUNING
    assert gate(S.EVALUATING, epochs=4, contribution=0.5, cfg=cfg) is S.CULLED


# ------------------------------------------------------------ FINE_TUNING -> FOSSILIZED / CULLED
@pytest.mark.parametrize(("gain", "expected"), [
    (-1.0, S.CULLED), (0.0, S.CULLED), (below(0.001), S.CULLED), (0.001, S.FOSSILIZED),
    (above(0.001), S.FOSSILIZED), (0.5, S.FOSSILIZED), (NAN, None)])
def test_fossilization_needs_total_gain_at_least_fossilize_min_gain(gain, expected):
    assert gate(S.FINE_TUNING, epochs=3, gain=gain) is expected
    assert gate(S.FINE_TUNING, epochs=4, gain=gain) is expected


@pytest.mark.parametrize("gain", [-1.0, 0.001, 0.5])
@pytest.mark.parametrize("epochs", [0, 2])
def test_fine_tuning_judges_nothing_before_fine_tuning_epochs(epochs, gain):
    assert gate(S.FINE_TUNING, epochs=epochs, gain=gain) is None


# ---------------------------------------------------------------- safety: -> ROLLED_BACK
SAFETY_STAGES = [S.TRAINING, S.GRAFTING, S.STABILIZATION, S.EVALUATING, S.FINE_TUNING]


@pytest.mark.parametrize("stage", SAFETY_STAGES)
@pytest.mark.parametrize(("drift", "grad_norm", "expected"), [
    (1.0, 0.0, None), (above(1.0), 0.0, S.ROLLED_BACK), (INF, 0.0, S.ROLLED_BACK),
    (0.0, 1e3, None), (0.0, above(1e3), S.ROLLED_BACK), (0.0, INF, S.ROLLED_BACK),
    (2.0, 2e3, S.ROLLED_BACK)])
def test_drift_and_grad_norm_limits_roll_back_every_running_stage(stage, drift, grad_norm,
                                                                  expected):
    # Measurements that would keep the seed where it is (nothing else is ready).
    assert gate(stage, epochs=0, drift=drift, grad_norm=grad_norm) is expected


@pytest.mark.parametrize("stage", [S.DORMANT, S.GERMINATED, S.FOSSILIZED, S.CULLED,
                                   S.CANCELLED, S.ROLLED_BACK])
def test_no_safety_readiness_outside_training_to_fine_tuning(stage):
    assert gate(stage, epochs=20, steps=1000, recon=0.0, alpha=1.0, drift=INF, grad_norm=INF,
                contribution=1.0, gain=1.0) is None


@pytest.mark.parametrize(("stage", "kwargs"), [
    (S.TRAINING, {"steps": 50, "recon": 0.0, "epochs": 5}),
    (S.GRAFTING, {"alpha": 1.0}),
    (S.STABILIZATION, {"epochs": 3}),
    (S.EVALUATING, {"epochs": 2, "contribution": 1.0}),
    (S.FINE_TUNING, {"epochs": 3, "gain": 1.0}),
])
def test_safety_overrides_a_passed_gate(stage, kwargs):
    assert gate(stage, **kwargs) is not None  # the gate alone would pass
    assert gate(stage, drift=above(1.0), **kwargs) is S.ROLLED_BACK
    assert gate(stage, grad_norm=above(1e3), **kwargs) is S.ROLLED_BACK


def test_safety_limits_follow_the_config():
    cfg = KasminaConfig(rollback_drift_limit=0.25, rollback_grad_norm_limit=10.0)
    assert gate(S.GRAFTING, drift=0.25, grad_norm=10.0, cfg=cfg) is None
    assert gate(S.GRAFTING, drift=above(0.25), cfg=cfg) is S.ROLLED_BACK
    assert gate(S.GRAFTING, grad_norm=above(10.0), cfg=cfg) is S.ROLLED_BACK


def test_gates_are_per_seed_over_many_seeds():
    stage = np.array([S.TRAINING, S.TRAINING, S.GRAFTING, S.EVALUATING, S.FINE_TUNING,
                      S.DORMANT, S.STABILIZATION], dtype=np.int32)
    epochs = np.array([1, 5, 0, 2, 3, 9, 3], dtype=np.int32)
    steps = np.array([50, 10, 0, 0, 0, 0, 0], dtype=np.float64)
    recon = np.array([0.01, 0.9, NAN, NAN, NAN, NAN, NAN])
    alpha = np.array([0, 0, 1.0, 1, 1, 0, 1], dtype=np.float64)
    drift = np.array([0, 0, 0, 0, 0, 0, 5.0])
    grad = np.zeros(7)
    contribution = np.array([NAN, NAN, NAN, -0.1, NAN, NAN, NAN])
    gain = np.array([NAN, NAN, NAN, NAN, 0.01, NAN, NAN])
    ready = evaluate_gates(stage, epochs, steps, recon, alpha, drift, grad, contribution, gain,
                           CFG)
    assert ready == {0: S.GRAFTING, 1: S.CULLED, 2: S.STABILIZATION, 3: S.CULLED,
                     4: S.FOSSILIZED, 6: S.ROLLED_BACK}


def test_gate_reasons_name_the_gate():
    assert "reconstruction" in gate_reason(S.TRAINING, S.GRAFTING)
    assert "max_training_epochs" in gate_reason(S.TRAINING, S.CULLED)
    assert "alpha" in gate_reason(S.GRAFTING, S.STABILIZATION)
    assert "contribution" in gate_reason(S.EVALUATING, S.FINE_TUNING)
    assert "contribution" in gate_reason(S.EVALUATING, S.CULLED)
    assert "fossilize_min_gain" in gate_reason(S.FINE_TUNING, S.FOSSILIZED)
    assert "fossilize_min_gain" in gate_reason(S.FINE_TUNING, S.CULLED)
    for stage in SAFETY_STAGES:
        assert gate_reason(stage, S.ROLLED_BACK).startswith("safety")
    # Events and field reports carry a reason for every move, gated or not.
    for current, target in itertools.product(S, S):
        reason = gate_reason(current, target)
        assert isinstance(reason, str) and reason


# ---------------------------------------------------------------- the metric's direction
def fine_tuning_layer_under(mode: str, before: float):
    """A model whose one seed reached FINE_TUNING after a boundary that saw `before`, driven by
    a LocalController with ControllerConfig(mode=mode)."""
    host = nn.Sequential(nn.Linear(6, 8))
    model = wrap(host, seeds_per_layer=2)
    ctl = LocalController(model, ControllerConfig(mode=mode, plateau_epochs=1000))
    (layer,) = ctl.layers
    assert layer.config.mode == mode
    ctl.end_epoch(before)
    layer.germinate(0, "linear")
    for stage in (S.TRAINING, S.GRAFTING, S.STABILIZATION, S.EVALUATING, S.FINE_TUNING):
        layer.transition(0, stage, force=True)
    return ctl, layer


@pytest.mark.parametrize(("mode", "after", "expected"), [
    # accuracy: higher is better. Gains: 0.25, 2**-9 (above fossilize_min_gain, exact in
    # binary), 0, -0.25.
    ("max", 0.75, S.FOSSILIZED), ("max", 0.5 + 2.0 ** -9, S.FOSSILIZED),
    ("max", 0.5, S.CULLED), ("max", 0.25, S.CULLED),
    # a loss: lower is better, so the same numbers mean the opposite.
    ("min", 0.25, S.FOSSILIZED), ("min", 0.5 - 2.0 ** -9, S.FOSSILIZED),
    ("min", 0.5, S.CULLED), ("min", 0.75, S.CULLED)])
def test_fossilize_gain_is_measured_in_the_metrics_direction(mode, after, expected):
    ctl, layer = fine_tuning_layer_under(mode, before=0.5)
    for _ in range(CFG.fine_tuning_epochs - 1):
        ctl.end_epoch(after)
        assert layer.stage_of(0) is S.FINE_TUNING
    ctl.end_epoch(after)
    assert layer.stage_of(0) is expected
    (outcome,) = ctl.outcomes
    assert outcome.outcome is expected and outcome.metric_before == 0.5


@pytest.mark.parametrize(("mode", "metrics", "germinated_at"), [
    # min_delta 0.25, plateau_epochs 2: an improvement of exactly min_delta is no progress.
    ("max", [1.0, 1.25, 1.25, 1.5], [2]),
    ("max", [1.0, 1.25 + 2**-10, 1.5 + 2**-9, 1.75 + 2**-8], []),  # each just > min_delta
    ("max", [1.0, 0.5, 0.25, 0.0], [2]),  # getting worse is a plateau too
    ("min", [1.0, 0.75, 0.75, 0.5], [2]),
    ("min", [1.0, 0.75 - 2**-10, 0.5 - 2**-9, 0.25 - 2**-8], []),
    ("min", [1.0, 1.5, 2.0, 2.5], [2]),
])
def test_local_controller_plateau_follows_mode_and_min_delta(mode, metrics, germinated_at):
    model = wrap(nn.Sequential(nn.Linear(6, 8)), seeds_per_layer=2)
    ctl = LocalController(model, ControllerConfig(mode=mode, plateau_epochs=2, min_delta=0.25,
                                                  blueprints=("linear",)))
    got = []
    for epoch, metric in enumerate(metrics):
        events = ctl.end_epoch(metric)
        if any(e.to_stage is S.GERMINATED for e in events):
            got.append(epoch)
    assert got == germinated_at


def test_controller_refuses_an_unknown_mode():
    model = wrap(nn.Sequential(nn.Linear(6, 8)), seeds_per_layer=2)
    with pytest.raises(ValueError, match="mode"):
        LocalController(model, ControllerConfig(mode="maximize"))
    with pytest.raises(ValueError, match="mode"):
        KasminaConfig(mode="up")

