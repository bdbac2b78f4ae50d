"""The decision policy (DESIGN §5): the `Policy` interface and the default heuristic.

A policy says *what* to do to which seeds; the Controller (tamiyo.controller) adds the
bookkeeping every policy needs (command ids, apply epoch, in-flight tracking, idempotence), so
a learned policy only has to implement `decide`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from oona.contracts import Advance, Cancel, Cull, LifecycleCommand, Rollback
from oona.contracts import SeedStage as Stage

from tamiyo import metrics
from tamiyo.blueprints import BlueprintAdvisor
from tamiyo.heuristics import (
    HealthWeights,
    chunk_size,
    epochs_without_improvement,
    health_scores,
)
from tamiyo.stability import (
    GrowthPause,
    Instability,
    StabilityConfig,
    drift_instability,
    growth_pause,
    metric_spikes,
    rollback_bursts,
)
from tamiyo.view import ACTIVE_STAGES, METRIC_HISTORY_EPOCHS, JobView, SeedView

log = logging.getLogger(__name__)

# Jobs remembered in a drift pause, past which the oldest go first: a job that ends mid-pause
# never clears its own entry. More than a replica follows by default (TAMIYO_MAX_JOBS, 1000).
_MAX_DRIFT_JOBS = 4096
# Seeds whose blueprint is blended into the layer's output: their drift moves the host's.
BLENDED_STAGES = frozenset(range(Stage.SEED_STAGE_GRAFTING, Stage.SEED_STAGE_FINE_TUNING + 1))


class Policy(Protocol):
    def decide(self, view: JobView) -> list[LifecycleCommand]:
        """Commands for the view's newest ended epoch: layer_id, seed_index, the action and a
        rationale set; at most one per seed; none for a seed whose `SeedView.busy` is set."""


@dataclass(frozen=True)
class PolicyConfig:
    # Germinate once the validation metric has not improved by more than min_delta for this
    # many epochs (in the direction of the job's higher_is_better). kasmina's ControllerConfig
    # defaults, which the efficacy harness chose (benchmarks/NOTES.md).
    plateau_epochs: int = 2
    min_delta: float = 0.01
    max_active_seeds: int = 4
    # Epochs decided without germination after one, so the metric can show its effect.
    cooldown_epochs: int = 3
    weights: HealthWeights = field(default_factory=HealthWeights)
    # Used while health reports do not carry the layer's width (see README: chunk size).
    fallback_chunk_size: int = 16
    # The stability guard (tamiyo.stability): no germination while the job looks unstable.
    # None: no guard.
    stability: StabilityConfig | None = field(default_factory=StabilityConfig)
    # Where to germinate: "health" (the weights above: least healthy first) or "gradient":
    # the largest output_grad_sq first (the runtime's KasminaConfig.track_output_gradient;
    # health order where a report carries none). kasmina's ControllerConfig.placement, measured
    # there (benchmarks/NOTES.md, session 10).
    placement: str = "health"

    def __post_init__(self) -> None:
        if self.plateau_epochs < 1 or self.cooldown_epochs < 0 or self.max_active_seeds < 1:
            raise ValueError("need plateau_epochs >= 1, cooldown_epochs >= 0, "
                             "max_active_seeds >= 1")
        if self.plateau_epochs >= METRIC_HISTORY_EPOCHS:
            raise ValueError(f"need plateau_epochs < {METRIC_HISTORY_EPOCHS}, the validation "
                             "metrics a job's view keeps")
        if self.min_delta < 0 or self.fallback_chunk_size < 1:
            raise ValueError("need min_delta >= 0 and fallback_chunk_size >= 1")
        if self.placement not in ("health", "gradient"):
            raise ValueError(f"placement must be 'health' or 'gradient', got {self.placement!r}")


# A gate's readiness -> the command that moves the seed there. DORMANT is missing on purpose:
# CULLED -> DORMANT and CANCELLED -> DORMANT are the runtime's own automatic moves.
_READY_ACTIONS = {
    Stage.SEED_STAGE_CULLED: "cull",
    Stage.SEED_STAGE_ROLLED_BACK: "rollback",
    Stage.SEED_STAGE_CANCELLED: "cancel",
    **{stage: "advance" for stage in range(Stage.SEED_STAGE_TRAINING,
                                           Stage.SEED_STAGE_FOSSILIZED + 1)},
}


def _gradient_key(grads: Sequence[float], index: int) -> tuple[int, float]:
    """placement "gradient"'s order: a measured seed, largest output_grad_sq first, before an
    unmeasured one; (1, 0.0) for every seed under "health" or of a report that carries none."""
    g = grads[index] if index < len(grads) else math.nan
    return (1, 0.0) if math.isnan(g) else (0, -g)


class HeuristicPolicy:
    """Advance what is ready, promote what germinated, and on a plateau germinate the seed of
    worst health (among dormant seeds of layers below capacity) with Karn's blueprint."""

    def __init__(self, config: PolicyConfig, advisor: BlueprintAdvisor) -> None:
        self.config = config
        self._advisor = advisor
        # Per job, the newest epoch whose reports showed drift, while it still pauses growth
        # (the view keeps only the newest report). In memory: a restarted Tamiyo forgets it.
        self._drift_epochs: dict[str, int] = {}

    def decide(self, view: JobView) -> list[LifecycleCommand]:
        commands: list[LifecycleCommand] = []
        candidates: list[tuple[tuple[int, float], float, str, int]] = []
        for layer_id in sorted(view.reports):
            seeds = list(view.seeds(layer_id))
            for seed in seeds:
                if not seed.busy and (command := self._move(seed)) is not None:
                    commands.append(command)
            active = sum(1 for s in seeds if s.stage in ACTIVE_STAGES)
            if active < self.config.max_active_seeds:
                report = view.reports[layer_id]
                scores = health_scores(report.chunk_variance, report.dead_ratio,
                                       report.mean_abs_correlation, self.config.weights)
                grads = (report.output_grad_sq if self.config.placement == "gradient"
                         else ())
                # Only DORMANT seeds may germinate: CULLED ones (embargo) and terminal ones not.
                candidates += [(_gradient_key(grads, s.index), scores[s.index], layer_id, s.index)
                               for s in seeds
                               if s.stage == Stage.SEED_STAGE_DORMANT and not s.busy]
        pause = self.growth_pause(view)
        reason = self._growth_reason(view) if candidates else None
        if pause is not None:
            metrics.GROWTH_PAUSED_EPOCHS.labels(pause.cause.signal).inc()
            log.info("job %s epoch %s: %s%s", view.job_id, view.epoch, pause.describe(),
                     f"; germination withheld ({reason})" if reason else "")
        elif reason:
            germination = self._germinate(view, min(candidates), reason)
            if germination is not None:
                commands.append(germination)
        return commands

    def growth_pause(self, view: JobView) -> GrowthPause | None:
        """Whether growth is paused at the view's newest epoch, and why. Spikes and rollbacks
        are read from the view alone (the metrics it keeps; a report's stage and epochs in
        stage date each rollback), so a restarted or taking-over Tamiyo sees the same pause;
        drift shows only in the newest report, so its epoch is remembered here."""
        config = self.config.stability
        if config is None or view.epoch is None:
            return None
        found = metric_spikes(view.metrics, higher_is_better=view.higher_is_better,
                              config=config)
        found += rollback_bursts(_rollback_epochs(view), config)
        drift = drift_instability(view.epoch, _blended_drift(view), config)
        if drift is not None:
            self._drift_epochs[view.job_id] = view.epoch
        seen = self._drift_epochs.get(view.job_id)
        if seen is not None and seen <= view.epoch:
            found.append(drift or Instability(seen, "drift", "a blended seed's weight drift "
                                              f"was over {config.drift_limit:g}"))
        pause = growth_pause(view.epoch, found, config)
        if seen is not None and (seen > view.epoch or view.epoch - seen >= config.resume_epochs):
            del self._drift_epochs[view.job_id]  # over, or from epochs a rewound job replays
        while len(self._drift_epochs) > _MAX_DRIFT_JOBS:  # jobs that ended in a drift pause
            del self._drift_epochs[next(iter(self._drift_epochs))]
        return pause

    def _move(self, seed: SeedView) -> LifecycleCommand | None:
        if seed.stage == Stage.SEED_STAGE_GERMINATED and seed.ready_for not in _READY_ACTIONS:
            # A layer whose lifecycle promotes elsewhere (the legacy path grafts at once)
            # publishes that as readiness, handled below like any gate.
            return _command(seed.layer_id, seed.index, "promote: germinated seeds start training",
                            advance=Advance(target_stage=Stage.SEED_STAGE_TRAINING))
        action = _READY_ACTIONS.get(seed.ready_for)
        if action is None:
            return None
        why = f"gate passed: ready for {Stage.Name(seed.ready_for).removeprefix('SEED_STAGE_')}"
        if action == "advance":
            target = Stage.ValueType(seed.ready_for)
            return _command(seed.layer_id, seed.index, why, advance=Advance(target_stage=target))
        actions = {"cull": Cull(), "rollback": Rollback(), "cancel": Cancel()}
        return _command(seed.layer_id, seed.index, why, **{action: actions[action]})

    def _growth_reason(self, view: JobView) -> str | None:
        """Why to germinate now, or None: a plateau, outside the cooldown."""
        assert view.epoch is not None
        # cooldown_epochs epochs decided with no germination after the last one: with 1, a
        # germination at epoch 5 blocks epoch 6 and allows epoch 7; 0 is no cooldown.
        if (view.last_germination_epoch is not None
                and view.epoch - view.last_germination_epoch <= self.config.cooldown_epochs):
            return None
        stalled = epochs_without_improvement(view.validation_history(),
                                             min_delta=self.config.min_delta,
                                             higher_is_better=view.higher_is_better)
        if stalled < self.config.plateau_epochs:
            return None
        return f"plateau: no gain > {self.config.min_delta:g} for {stalled} epochs"

    def _germinate(self, view: JobView, candidate: tuple[tuple[int, float], float, str, int],
                   reason: str) -> LifecycleCommand | None:
        (unmeasured, grad), score, layer_id, index = candidate
        where = (f"worst health {score:.3f}" if unmeasured
                 else f"largest output gradient {-grad:.3g}")
        report = view.reports[layer_id]
        # Reports from runtimes older than the `features` field carry 0: fall back.
        size = (chunk_size(report.features, report.num_seeds, index) if report.features
                else self.config.fallback_chunk_size)
        choice = self._advisor.choose(view.job_id, layer_id, size)
        if choice is None:
            return None
        return _command(
            layer_id, index, f"{reason}; {where}; {choice.blueprint_name} "
                  f"({choice.source}) with {choice.strategy_name}",
            germinate=choice.germinate())


def _rollback_epochs(view: JobView) -> Iterator[int]:
    for report in view.reports.values():
        for index, stage in enumerate(report.stage):
            if stage == Stage.SEED_STAGE_ROLLED_BACK:
                yield report.epoch - report.epochs_in_stage[index]


def _blended_drift(view: JobView) -> Iterator[float]:
    for report in view.reports.values():
        for index, stage in enumerate(report.stage):
            if stage in BLENDED_STAGES:
                yield report.drift[index]


def _command(layer_id: str, index: int, rationale: str, **action: object) -> LifecycleCommand:
    return LifecycleCommand(layer_id=layer_id, seed_index=index, rationale=rationale,
                            **action)  # type: ignore[arg-type]
