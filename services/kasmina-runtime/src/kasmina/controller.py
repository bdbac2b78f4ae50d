"""`LocalController`: in-process seed control for a training loop with no fleet.

The policy is DESIGN §5's heuristic, run at epoch boundaries: measure contributions of
evaluating seeds, let gates advance seeds (promote, graft, stabilise, evaluate, fine-tune,
fossilise, cull, roll back), and germinate a new seed in the least healthy dormant chunk when
validation progress has plateaued, unless the stability guard (kasmina.stability, the same rule
as Tamiyo's) has paused growth: a spike of the validation metric, repeated rollbacks or a
drifting blended seed pause germination until `resume_epochs` stable epochs have passed.

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

import contextlib
import logging
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from . import distributed
from .blueprints import get_blueprint
from .events import LifecycleEvent, SeedOutcome
from .gates import gate_reason
from .lifecycle import ACTIVE_STAGES, LifecycleError, SeedStage
from .protocol import SeedLayer
from .stability import (
    GrowthPause,
    Instability,
    StabilityConfig,
    drift_instability,
    growth_pause,
    metric_spikes,
    rollback_bursts,
)
from .telemetry import LayerHealthReport
from .wrap import unique_seed_layers

log = logging.getLogger("kasmina")

# Seeds whose blueprint is blended into the layer's output: their drift moves the host's.
BLENDED_STAGES = tuple(range(SeedStage.GRAFTING, SeedStage.FINE_TUNING + 1))


@dataclass(frozen=True)
class ControllerConfig:
    # A plateau: plateau_epochs epochs without an improvement > min_delta (in the metric's
    # units); it germinates germinations_per_plateau seeds. Chosen by the efficacy harness
    # with KasminaConfig's seed_lr: with them growth beats the host 5/5 on digits, a regression
    # and a char LM; the former 3 / 1e-3 / 1 paid on none (benchmarks/NOTES.md, "Which of the
    # candidate's six changes pay").
    plateau_epochs: int = 2
    min_delta: float = 0.01
    mode: str = "max"  # the validation metric: "max" (accuracy) or "min" (a loss)
    germinations_per_plateau: int = 4
    blueprints: tuple[str, ...] = ("residual_mlp",)  # tried in order; first that fits
    strategy: str = "fixed_ramp"
    # health = w_variance * variance / layer mean - w_dead * dead_ratio - w_correlation * corr
    w_variance: float = 1.0
    w_dead: float = 1.0
    w_correlation: float = 1.0
    # No germination while the job looks unstable (kasmina.stability); None: no guard.
    stability: StabilityConfig | None = field(default_factory=StabilityConfig)
    # Where to germinate: "health" (DESIGN §5: least healthy first, the weights above) or
    # "gradient": the dormant seeds whose chunk of the layer's output carried the largest mean
    # squared task-loss gradient over the epoch first (health order among the unscored): the
    # reports' output_grad_sq, which the controller turns on in its layers
    # (KasminaConfig.track_output_gradient: a float64 pass over each seed layer's output
    # gradient every training step; Tamiyo reads it with TAMIYO_PLACEMENT=gradient). Measured
    # (benchmarks/NOTES.md, session 10): with a tight budget (32-64 seeds a layer, one
    # germination a plateau) it beats random placement and the health score on a regression
    # (-0.011 MSE, 18 of 20 seeds) and ties on digits; with 8 seeds a layer, where every seed
    # grows, it ties both.
    placement: str = "health"

    def __post_init__(self) -> None:
        if self.placement not in ("health", "gradient"):
            raise ValueError("ControllerConfig.placement must be 'health' or 'gradient', got "
                             f"{self.placement!r}")


def check_metric(val_metric: float | None) -> float | None:
    """The boundary's metric, as a float; a missing one is warned about (nothing can be
    judged or germinated on it)."""
    if val_metric is None:
        warnings.warn("end_epoch got no validation metric: gates that compare metrics cannot "
                      "pass and no seed germinates on a plateau", RuntimeWarning, stacklevel=3)
        return None
    return float(val_metric)


@contextlib.contextmanager
def restore_mode(model: nn.Module) -> Iterator[None]:
    """Put back every module's train/eval mode after the block (a user's validate() usually
    calls model.eval() and nothing after it)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def measure_contributions(model: nn.Module, layers: list[SeedLayer], val_metric: float | None,
                          evaluate: Callable[[], float] | None) -> float | None:
    """The boundary's metric as every rank will use it (rank 0's under torch.distributed,
    DESIGN §8), after each EVALUATING seed's counterfactual pass of `evaluate` (also rank
    0's), with the model's modes restored. A missing metric is warned about and judges
    nothing."""
    val_metric = distributed.broadcast_object(check_metric(val_metric))
    if evaluate is not None and val_metric is not None:
        def shared() -> float:
            return distributed.broadcast_object(float(evaluate()))

        with restore_mode(model):
            for layer in layers:
                layer.measure_contributions(shared, val_metric)
    return val_metric


def health_scores(report: LayerHealthReport, cfg: ControllerConfig) -> np.ndarray:
    """Per-seed health (higher is healthier); unmeasured telemetry counts as neutral."""
    var = np.nan_to_num(report.chunk_variance.astype(np.float64))
    norm = var / var.mean() if var.mean() > 0 else np.zeros_like(var)
    return (cfg.w_variance * norm - cfg.w_dead * np.nan_to_num(report.dead_ratio)
            - cfg.w_correlation * np.nan_to_num(report.mean_abs_correlation))


class LocalController:
    def __init__(self, model: nn.Module, config: ControllerConfig | None = None) -> None:
        self.model = model
        self.layers: list[SeedLayer] = unique_seed_layers(model)
        if not self.layers:
            raise ValueError("the model has no KasminaLayer: call kasmina.wrap(model) first")
        distributed.check_ddp(model)
        self.config = config or ControllerConfig()
        if self.config.mode not in ("max", "min"):
            raise ValueError(f"ControllerConfig.mode must be 'max' or 'min', got "
                             f"{self.config.mode!r}")
        gradient = self.config.placement == "gradient"
        for layer in self.layers:  # one metric direction, set here, read by every gate
            layer.config = layer.config.replace(
                mode=self.config.mode,
                track_output_gradient=layer.config.track_output_gradient or gradient)
        self.best: float | None = None
        self.epochs_without_progress = 0
        self.events: list[LifecycleEvent] = []  # everything that happened, in order
        self.outcomes: list[SeedOutcome] = []
        self.reports: list[LayerHealthReport] = []  # the last epoch's, one per layer
        # Set while the stability guard pauses growth (why, and until when).
        self.growth_pause: GrowthPause | None = None
        # What the guard remembers: the newest metrics (epoch -> metric) and rollback epochs it
        # still needs, and the newest instability.
        self._metrics: dict[int, float] = {}
        self._rollbacks: list[int] = []
        self._instability: Instability | None = None
        self._trained = False  # the model was in train mode at the last step()

    def step(self, loss: torch.Tensor | float | None = None,
             scaler: torch.amp.GradScaler | None = None) -> None:
        """Call once per training step, after the host optimizer's step (with AMP, pass the
        GradScaler and call before `scaler.update()`)."""
        self._trained = self.model.training
        for layer in self.layers:
            layer.step(loss, scaler)

    def end_epoch(self, val_metric: float | None,
                  evaluate: Callable[[], float] | None = None) -> list[LifecycleEvent]:
        """Run the policy at an epoch boundary. `evaluate()` must return the same validation
        metric as `val_metric` (it is called with single seeds switched off, to measure their
        contribution); modes are restored after it, and a model trained in train mode is put back
        in train mode for the next epoch. Returns the lifecycle events of this boundary."""
        val_metric = measure_contributions(self.model, self.layers, val_metric, evaluate)
        self.reports = [layer.end_epoch(val_metric) for layer in self.layers]
        for layer in self.layers:
            for seed_id, target in sorted(layer.readiness().items()):
                reason = gate_reason(layer.stage_of(seed_id), target)
                layer.transition(seed_id, target, reason=reason)
        new = [e for layer in self.layers for e in layer.drain_events()]
        self._watch_stability(val_metric, new)
        if val_metric is not None and self._plateaued(val_metric):
            self._germinate()
        for layer in self.layers:
            for seed_id in layer.seeds_in(SeedStage.GERMINATED):
                layer.transition(seed_id, layer.promotion_stage, reason="promoted")
        if self._trained and not self.model.training:  # validate() left the model in eval
            self.model.train()
        new += [e for layer in self.layers for e in layer.drain_events()]
        self.events.extend(new)
        self.outcomes.extend(o for layer in self.layers for o in layer.drain_outcomes())
        return new

    def _plateaued(self, metric: float) -> bool:
        sign = 1.0 if self.config.mode == "max" else -1.0
        if self.best is None or sign * (metric - self.best) > self.config.min_delta:
            self.best, self.epochs_without_progress = metric, 0
            return False
        self.epochs_without_progress += 1
        if self.epochs_without_progress < self.config.plateau_epochs:
            return False
        if self.growth_pause is not None:
            return False  # the plateau stands, and germinates once growth resumes
        self.epochs_without_progress = 0  # a fresh plateau must build up before the next one
        return True

    def _watch_stability(self, val_metric: float | None, events: list[LifecycleEvent]) -> None:
        """Update `growth_pause` from this boundary's metric, rollbacks and reports."""
        config = self.config.stability
        if config is None:
            return
        epoch = max(r.epoch for r in self.reports)
        if val_metric is not None:
            self._metrics[epoch] = val_metric
        self._metrics = dict(sorted(self._metrics.items())[-(config.baseline_epochs + 1):])
        # Dated by the boundary that sees them (one commanded between boundaries carries the
        # epoch of the boundary before).
        self._rollbacks += [epoch for e in events if e.to_stage == SeedStage.ROLLED_BACK]
        self._rollbacks = [e for e in self._rollbacks if e > epoch - config.rollback_window]
        drift = [d for r in self.reports for d in r.drift[np.isin(r.stage, BLENDED_STAGES)]]
        # This boundary's instabilities; older ones were judged at their own boundary, on
        # their full baseline, and the newest of them is kept.
        found = [i for i in (*metric_spikes(self._metrics, config=config,
                                            higher_is_better=self.config.mode == "max"),
                             *rollback_bursts(self._rollbacks, config)) if i.epoch == epoch]
        found += [i for i in (drift_instability(epoch, drift, config), self._instability) if i]
        was = self.growth_pause
        self.growth_pause = growth_pause(epoch, found, config)
        if self.growth_pause is not None:
            self._instability = self.growth_pause.cause
            if was is None:
                log.warning("epoch %d: %s", epoch, self.growth_pause.describe())
        elif was is not None:
            log.info("epoch %d: growth resumed after %d stable epochs", epoch,
                     config.resume_epochs)

    def _germination_sites(self) -> list[tuple[SeedLayer, int]]:
        """Dormant seeds of layers with spare capacity, least healthy first (with placement
        "gradient": largest output_grad_sq first, then the unmeasured least healthy first)."""
        candidates, gradient = [], self.config.placement == "gradient"
        for layer, report in zip(self.layers, self.reports, strict=True):
            if len(layer.seeds_in(*ACTIVE_STAGES)) >= layer.config.max_active_seeds:
                continue
            scores = health_scores(report, self.config)
            for seed_id in layer.seeds_in(SeedStage.DORMANT):
                g = float(report.output_grad_sq[seed_id]) if gradient else math.nan
                candidates.append(((1, 0.0) if math.isnan(g) else (0, -g),
                                   float(scores[seed_id]), layer, int(seed_id)))
        candidates.sort(key=lambda c: c[1])  # least healthy first, then (stable) by gradient
        candidates.sort(key=lambda c: c[0])
        return [(layer, seed_id) for *_, layer, seed_id in candidates]

    def _germinate(self) -> int:
        """Germinate in the first `germinations_per_plateau` sites that take a blueprint."""
        done = 0
        for layer, seed_id in self._germination_sites():
            if done == self.config.germinations_per_plateau:
                break
            width = layer.chunk_size(seed_id)
            fitting = [b for b in self.config.blueprints if get_blueprint(b).fits(width)]
            try:
                layer.germinate(seed_id, fitting[0], self.config.strategy)
            except (IndexError, LifecycleError):
                continue
            done += 1
        return done

    def state_dict(self) -> dict:
        last = self._instability
        return {"best": self.best, "epochs_without_progress": self.epochs_without_progress,
                "stability": {
                    "metrics": sorted(self._metrics.items()), "rollbacks": list(self._rollbacks),
                    "instability": None if last is None else [last.epoch, last.signal,
                                                              last.detail]}}

    def load_state_dict(self, state: dict) -> None:
        self.best = state["best"]
        self.epochs_without_progress = int(state["epochs_without_progress"])
        # A checkpoint from before the stability guard has none of it: the guard starts afresh.
        stability = state.get("stability", {})
        self._metrics = {int(e): float(m) for e, m in stability.get("metrics", [])}
        self._rollbacks = [int(e) for e in stability.get("rollbacks", [])]
        last = stability.get("instability")
        self._instability = None if last is None else Instability(int(last[0]), str(last[1]),
                                                                  str(last[2]))
