"""Gate evaluation at an epoch boundary: which seed is ready for which transition (DESIGN §3.2).

Pure numpy over per-seed columns, so it is cheap for thousands of seeds and easy to test."""

from __future__ import annotations

import numpy as np

from .config import KasminaConfig
from .lifecycle import SeedStage as S


def evaluate_gates(stage: np.ndarray, epochs: np.ndarray, steps: np.ndarray,
                   recon_ratio: np.ndarray, alpha: np.ndarray, drift: np.ndarray,
                   grad_norm: np.ndarray, contribution: np.ndarray, gain: np.ndarray,
                   cfg: KasminaConfig) -> dict[int, S]:
    """All inputs are (S,) arrays; `contribution` is the mean measured contribution while
    EVALUATING and `gain` the metric gain since germination (NaN where unknown).
    NaN compares False, so an unmeasured quantity never passes a gate."""
    ready = np.full(stage.shape, -1, dtype=np.int64)

    def set_ready(mask: np.ndarray, target: S) -> None:
        ready[mask & (ready < 0)] = target

    training, evaluating = stage == S.TRAINING, stage == S.EVALUATING
    tuning = stage == S.FINE_TUNING
    # Safety limits first: they override any other readiness.
    active = np.isin(stage, [S.TRAINING, S.GRAFTING, S.STABILIZATION, S.EVALUATING,
                             S.FINE_TUNING])
    unsafe = (drift > cfg.rollback_drift_limit) | (grad_norm > cfg.rollback_grad_norm_limit)
    set_ready(active & unsafe, S.ROLLED_BACK)

    passed = (steps >= cfg.min_training_steps) & (recon_ratio <= cfg.reconstruction_threshold)
    set_ready(training & passed, S.GRAFTING)
    set_ready(training & (epochs >= cfg.max_training_epochs), S.CULLED)
    set_ready((stage == S.GRAFTING) & (alpha >= 1.0), S.STABILIZATION)
    set_ready((stage == S.STABILIZATION) & (epochs >= cfg.stabilization_epochs), S.EVALUATING)
    judged = evaluating & (epochs >= cfg.evaluation_epochs) & ~np.isnan(contribution)
    set_ready(judged & (contribution > cfg.evaluation_min_gain), S.FINE_TUNING)
    set_ready(judged, S.CULLED)
    judged = tuning & (epochs >= cfg.fine_tuning_epochs) & ~np.isnan(gain)
    set_ready(judged & (gain >= cfg.fossilize_min_gain), S.FOSSILIZED)
    set_ready(judged, S.CULLED)
    return {int(i): S(int(ready[i])) for i in np.flatnonzero(ready >= 0)}


_REASONS = {
    (S.TRAINING, S.GRAFTING): "reconstruction gate passed",
    (S.TRAINING, S.CULLED): "reconstruction gate not passed within max_training_epochs",
    (S.GRAFTING, S.STABILIZATION): "alpha reached 1",
    (S.STABILIZATION, S.EVALUATING): "stable for stabilization_epochs",
    (S.EVALUATING, S.FINE_TUNING): "contribution above evaluation_min_gain",
    (S.EVALUATING, S.CULLED): "contribution not above evaluation_min_gain",
    (S.FINE_TUNING, S.FOSSILIZED): "gain since germination reached fossilize_min_gain",
    (S.FINE_TUNING, S.CULLED): "gain since germination below fossilize_min_gain",
}


def gate_reason(current: S, target: S) -> str:
    """Why a gate made a seed ready for `target` (for events and field reports)."""
    if target is S.ROLLED_BACK:
        return "safety: drift or gradient-norm limit exceeded"
    return _REASONS.get((current, target), "gate passed")
