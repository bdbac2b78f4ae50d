"""`LocalController`: in-process seed control for a training loop with no fleet.

The policy is DESIGN §5's heuristic, run at epoch boundaries: measure contributions of
evaluating seeds, let gates advance seeds (promote, graft, stabilise, evaluate, fine-tune,
fossilise, cull, roll back), and germinate a new seed in the least healthy dormant chunk when
validation progress has plateaued.

    model = kasmina.wrap(model, seeds_per_layer=8)
    optimizer = torch.optim.Adam(kasmina.host_parameters(model))
    ctl = kasmina.LocalController(model)
    for epoch in range(epochs):
        for x, y in loader:
            loss = loss_fn(model(x), y); loss.backward(); optimizer.step(); optimizer.zero_grad()
            ctl.step(loss)
        ctl.end_epoch(val_metric, evaluate=validate)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .blueprints import get_blueprint
from .events import LifecycleEvent, SeedOutcome
from .gates import gate_reason
from .lifecycle import ACTIVE_STAGES, LifecycleError, SeedStage
from .plan import STAGE
from .telemetry import LayerHealthReport
from .wrap import seed_layers


@dataclass(frozen=True)
class ControllerConfig:
    plateau_epochs: int = 3  # epochs without an improvement > min_delta that make a plateau
    min_delta: float = 1e-3
    higher_is_better: bool = True
    germinations_per_plateau: int = 1
    blueprints: tuple[str, ...] = ("residual_mlp",)  # tried in order; first that fits
    strategy: str = "fixed_ramp"
    # health = w_variance * variance / layer mean - w_dead * dead_ratio - w_correlation * corr
    w_variance: float = 1.0
    w_dead: float = 1.0
    w_correlation: float = 1.0


def health_scores(report: LayerHealthReport, cfg: ControllerConfig) -> np.ndarray:
    """Per-seed health (higher is healthier); unmeasured telemetry counts as neutral."""
    var = np.nan_to_num(report.chunk_variance.astype(np.float64))
    norm = var / var.mean() if var.mean() > 0 else np.zeros_like(var)
    return (cfg.w_variance * norm - cfg.w_dead * np.nan_to_num(report.dead_ratio)
            - cfg.w_correlation * np.nan_to_num(report.mean_abs_correlation))


class LocalController:
    def __init__(self, model: nn.Module, config: ControllerConfig | None = None) -> None:
        self.layers = seed_layers(model)
        if not self.layers:
            raise ValueError("the model has no KasminaLayer: call kasmina.wrap(model) first")
        self.config = config or ControllerConfig()
        self.best: float | None = None
        self.epochs_without_progress = 0
        self.events: list[LifecycleEvent] = []  # everything that happened, in order
        self.outcomes: list[SeedOutcome] = []
        self.reports: list[LayerHealthReport] = []  # the last epoch's, one per layer

    def step(self, loss: torch.Tensor | float | None = None) -> None:
        """Call once per training step, after the host optimizer's step."""
        for layer in self.layers:
            layer.step(loss)

    def end_epoch(self, val_metric: float,
                  evaluate: Callable[[], float] | None = None) -> list[LifecycleEvent]:
        """Run the policy at an epoch boundary. `evaluate()` must return the same validation
        metric as `val_metric` (it is called with single seeds switched off, to measure their
        contribution). Returns the lifecycle events of this boundary."""
        if evaluate is not None:
            for layer in self.layers:
                layer.measure_contributions(evaluate, val_metric)
        self.reports = [layer.end_epoch(val_metric) for layer in self.layers]
        for layer in self.layers:
            for seed_id, target in sorted(layer.readiness().items()):
                reason = gate_reason(layer.stage_of(seed_id), target)
                layer.transition(seed_id, target, reason=reason)
        if self._plateaued(val_metric):
            self._germinate()
        for layer in self.layers:
            for seed_id in layer.seeds_in(SeedStage.GERMINATED):
                layer.transition(seed_id, SeedStage.TRAINING, reason="promoted")
        new = [e for layer in self.layers for e in layer.drain_events()]
        self.events.extend(new)
        self.outcomes.extend(o for layer in self.layers for o in layer.drain_outcomes())
        return new

    def _plateaued(self, metric: float) -> bool:
        sign = 1.0 if self.config.higher_is_better else -1.0
        if self.best is None or sign * (metric - self.best) > self.config.min_delta:
            self.best, self.epochs_without_progress = metric, 0
            return False
        self.epochs_without_progress += 1
        if self.epochs_without_progress < self.config.plateau_epochs:
            return False
        self.epochs_without_progress = 0  # a fresh plateau must build up before the next one
        return True

    def _germinate(self) -> int:
        """Germinate in the least healthy dormant seeds of layers with spare capacity."""
        candidates = []
        for layer, report in zip(self.layers, self.reports, strict=True):
            stage = layer._mirror[:, STAGE]
            if np.isin(stage, list(ACTIVE_STAGES)).sum() >= layer.config.max_active_seeds:
                continue
            scores = health_scores(report, self.config)
            for seed_id in np.flatnonzero(stage == SeedStage.DORMANT):
                candidates.append((float(scores[seed_id]), layer, int(seed_id)))
        candidates.sort(key=lambda c: c[0])
        done = 0
        for _, layer, seed_id in candidates:
            if done == self.config.germinations_per_plateau:
                break
            width = layer.chunks[seed_id][1] - layer.chunks[seed_id][0]
            fitting = [b for b in self.config.blueprints if get_blueprint(b).fits(width)]
            try:
                layer.germinate(seed_id, fitting[0], self.config.strategy)
            except (IndexError, LifecycleError):
                continue
            done += 1
        return done

    def state_dict(self) -> dict:
        return {"best": self.best, "epochs_without_progress": self.epochs_without_progress}

    def load_state_dict(self, state: dict) -> None:
        self.best = state["best"]
        self.epochs_without_progress = int(state["epochs_without_progress"])
