"""The host side of a `KasminaLayer`: lifecycle commands, gates at epoch boundaries, health
reports, lifecycle records and checkpointed bookkeeping (DESIGN §3.2, §3.4).

Kept apart from the tensor maths in `layer.py`; every method here runs at an epoch boundary or
on a command, never inside a training step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from .blueprints import BlueprintSpec, get_blueprint
from .events import LifecycleEvent, SeedOutcome, SeedRecord
from .gates import evaluate_gates
from .lifecycle import (
    ACTIVE_STAGES,
    ROLLBACK_FROM,
    RUNNING_STAGES,
    TERMINAL_OUTCOMES,
    UNGATED,
    BlueprintDoesNotFitError,
    CapacityError,
    EmbargoError,
    GateNotPassedError,
    InvalidTransitionError,
    LifecycleError,
    SeedStage,
    UnknownSeedError,
    check_transition,
)
from .plan import BLUEPRINT_ID, EPOCHS_IN_STAGE, STAGE, STRATEGY
from .strategies import get_strategy
from .telemetry import LayerHealthReport

S = SeedStage
_RELEASING = frozenset({S.CULLED, S.CANCELLED, S.ROLLED_BACK})


class SeedLifecycleMixin:
    def _init_lifecycle(self) -> None:
        self._mirror = self.state.cpu().numpy().copy()  # authoritative stage table (host)
        self._slot = self.slot.cpu().numpy().copy()
        self._readiness: dict[int, SeedStage] = {}
        self._records: dict[int, SeedRecord] = {}
        self._counterfactual: set[int] = set()
        self._epoch = 0
        self._step = 0
        self._tracking_step = True
        self._last_metric: float | None = None
        self._events: list[LifecycleEvent] = []
        self._outcomes: list[SeedOutcome] = []
        self._rebuild_plan()

    # ---------------------------------------------------------------- queries
    def stage_of(self, seed_id: int) -> SeedStage:
        return S(int(self._mirror[self._check_seed(seed_id), STAGE]))

    def readiness(self) -> dict[int, SeedStage]:
        """Seed -> the transition its gate passed at the last epoch boundary."""
        return dict(self._readiness)

    def seeds_in(self, *stages: SeedStage) -> list[int]:
        return np.flatnonzero(np.isin(self._mirror[:, STAGE], stages)).tolist()

    @property
    def epoch(self) -> int:
        return self._epoch

    def params_added(self) -> int:
        """Blueprint parameters currently part of the layer (running or fossilized seeds)."""
        total = 0
        for sid in self.seeds_in(*RUNNING_STAGES):
            spec = get_blueprint(int(self._mirror[sid, BLUEPRINT_ID]))
            total += spec.param_count(self.chunks[sid][1] - self.chunks[sid][0])
        return total

    def drain_events(self) -> list[LifecycleEvent]:
        events, self._events = self._events, []
        return events

    def drain_outcomes(self) -> list[SeedOutcome]:
        outcomes, self._outcomes = self._outcomes, []
        return outcomes

    # ---------------------------------------------------------------- commands
    def germinate(self, seed_id: int, blueprint: str | int | BlueprintSpec = "residual_mlp",
                  strategy: str | int = "fixed_ramp") -> None:
        """DORMANT -> GERMINATED with a blueprint; raises a `LifecycleError` when refused."""
        seed_id = self._check_seed(seed_id)
        spec, strat = get_blueprint(blueprint), get_strategy(strategy)
        current = self.stage_of(seed_id)
        if current is S.CULLED:
            left = self.config.embargo_epochs - int(self._mirror[seed_id, EPOCHS_IN_STAGE])
            raise EmbargoError(f"seed {seed_id} is under embargo for {left} more epoch(s)")
        check_transition(seed_id, current, S.GERMINATED)
        width = self.chunks[seed_id][1] - self.chunks[seed_id][0]
        if not spec.fits(width):
            raise BlueprintDoesNotFitError(
                f"blueprint {spec.name!r} does not fit seed {seed_id}'s chunk of {width} features")
        active = int(np.isin(self._mirror[:, STAGE], list(ACTIVE_STAGES)).sum())
        if active >= self.config.max_active_seeds:
            raise CapacityError(f"layer {self.layer_id!r} already has {active} active seeds "
                                f"(max_active_seeds={self.config.max_active_seeds})")
        bank = self._bank(spec.id)
        used = self._slot[self._mirror[:, BLUEPRINT_ID] == spec.id]
        slot = min(set(range(bank.capacity + 1)) - set(used.tolist()))
        bank.init_slot(slot)
        self._slot[seed_id] = slot
        self._mirror[seed_id, BLUEPRINT_ID] = spec.id
        self._mirror[seed_id, STRATEGY] = strat.id
        self._records[seed_id] = SeedRecord(spec.id, strat.id, self._epoch, self._step,
                                            self._last_metric)
        self._move(seed_id, S.GERMINATED, "germination request")

    def request_germination(self, seed_id: int,
                            blueprint: str | int | BlueprintSpec = "residual_mlp",
                            strategy: str | int = "fixed_ramp") -> bool:
        try:
            self.germinate(seed_id, blueprint, strategy)
        except LifecycleError:
            return False
        return True

    def cancel_germination(self, seed_id: int) -> bool:
        if self.stage_of(seed_id) not in (S.GERMINATED, S.TRAINING):
            return False
        self._move(seed_id, S.CANCELLED, "cancel request")
        return True

    def transition(self, seed_id: int, stage: SeedStage | int, force: bool = False,
                   reason: str = "command") -> None:
        """Move a seed along the table. Refusals raise a `LifecycleError` (a `ValueError`)
        and change nothing. `force` skips a gate, never the table (except the operator reset
        ROLLED_BACK -> DORMANT, which needs it)."""
        seed_id, target = self._check_seed(seed_id), S(stage)
        current = self.stage_of(seed_id)
        if target is S.GERMINATED:
            if current is S.DORMANT:
                raise LifecycleError("germination needs a blueprint: use germinate()")
            raise InvalidTransitionError(seed_id, current, target)
        check_transition(seed_id, current, target, force)
        if not force and (current, target) not in UNGATED:
            if current is S.CULLED and not self._time_served(seed_id, current):
                raise EmbargoError(f"seed {seed_id} is under embargo")
            if current is S.CANCELLED and not self._time_served(seed_id, current):
                raise GateNotPassedError(seed_id, current, target)
            if (current not in (S.CULLED, S.CANCELLED)
                    and self._readiness.get(seed_id) is not target):
                raise GateNotPassedError(seed_id, current, target)
        self._move(seed_id, target, reason)

    @contextlib.contextmanager
    def counterfactual(self, seeds: Iterable[int]) -> Iterator[None]:
        """Within the block, the given seeds' outputs are not blended in (as if alpha were 0)."""
        previous = self._counterfactual
        self._counterfactual = previous | {self._check_seed(s) for s in seeds}
        self._rebuild_plan()
        try:
            yield
        finally:
            self._counterfactual = previous
            self._rebuild_plan()

    def measure_contributions(self, evaluate: Callable[[], float], val_metric: float) -> None:
        """For each EVALUATING seed, one counterfactual pass of `evaluate` (the validation metric
        with that seed at alpha 0); contribution = improvement the seed brings (sign-adjusted)."""
        sign = 1.0 if self.config.higher_is_better else -1.0
        for seed_id in self.seeds_in(S.EVALUATING):
            with self.counterfactual([seed_id]):
                without = float(evaluate())
            self._records[seed_id].contributions.append(sign * (val_metric - without))

    # ---------------------------------------------------------------- epoch boundary
    def end_epoch(self, val_metric: float | None = None) -> LayerHealthReport:
        """Advance EPOCHS_IN_STAGE, roll back seeds that produced non-finite values, return
        CANCELLED and embargo-served CULLED seeds to DORMANT, evaluate gates (see readiness())
        and return this epoch's health report. One device-to-host transfer."""
        with torch.no_grad():
            tel = self.telemetry.summarize()
            cols = torch.stack([tel["chunk_variance"], tel["dead_ratio"],
                                tel["mean_abs_correlation"], self.alpha.double(),
                                self.recon_ratio.double(), self.grad_norm.double(),
                                self.drift.double(), self.steps_in_stage.double(),
                                self.nonfinite.double()], dim=1).cpu().numpy()
            self.telemetry.reset()
        var, dead, corr, alpha, recon, gnorm, drift, steps, nonfinite = cols.T
        self._epoch += 1
        self._mirror[:, EPOCHS_IN_STAGE] += 1
        stage = self._mirror[:, STAGE]
        # A FOSSILIZED seed cannot be rolled back (terminal): its non-finite outputs stay masked
        # step by step.
        for seed_id in np.flatnonzero((nonfinite > 0) & np.isin(stage, list(ROLLBACK_FROM))):
            self._move(int(seed_id), S.ROLLED_BACK, "safety: non-finite output or gradient")
        self.nonfinite.zero_()
        for seed_id in np.flatnonzero(np.isin(stage, [S.CULLED, S.CANCELLED])):
            if self._time_served(int(seed_id), S(int(stage[seed_id]))):
                self._move(int(seed_id), S.DORMANT, "embargo served" if stage[seed_id] == S.CULLED
                           else "cancelled seed returns to dormant")
        contribution = np.full(self.num_seeds, np.nan)
        gain = np.full(self.num_seeds, np.nan)
        sign = 1.0 if self.config.higher_is_better else -1.0
        for seed_id, rec in self._records.items():
            if rec.contributions:
                contribution[seed_id] = float(np.mean(rec.contributions))
            before = rec.metric_before
            if val_metric is not None and before is not None:
                gain[seed_id] = sign * (val_metric - before)
        self._last_metric = val_metric if val_metric is not None else self._last_metric
        for rec in self._records.values():
            if rec.metric_before is None:
                rec.metric_before = self._last_metric
        self._readiness = evaluate_gates(
            self._mirror[:, STAGE], self._mirror[:, EPOCHS_IN_STAGE], steps, recon, alpha,
            drift, gnorm, contribution, gain, self.config)
        self.state.copy_(torch.from_numpy(self._mirror))
        ready = np.full(self.num_seeds, -1, dtype=np.int32)
        for seed_id, target in self._readiness.items():
            ready[seed_id] = target
        m = self._mirror
        self._last_report = LayerHealthReport(
            layer_id=self.layer_id, epoch=self._epoch, step=self._step, val_metric=val_metric,
            stage=m[:, STAGE].copy(), blueprint_id=m[:, BLUEPRINT_ID].copy(),
            epochs_in_stage=m[:, EPOCHS_IN_STAGE].copy(), strategy_id=m[:, STRATEGY].copy(),
            alpha=alpha.astype(np.float32), chunk_variance=var.astype(np.float32),
            dead_ratio=dead.astype(np.float32), mean_abs_correlation=corr.astype(np.float32),
            reconstruction_ratio=recon.astype(np.float32), grad_norm=gnorm.astype(np.float32),
            drift=drift.astype(np.float32), contribution=contribution.astype(np.float32),
            ready_for=ready, chunks=list(self.chunks))
        return self._last_report

    def health_report(self) -> LayerHealthReport | None:
        """The report of the last epoch boundary (None before the first)."""
        return getattr(self, "_last_report", None)

    # ---------------------------------------------------------------- internals
    def _check_seed(self, seed_id: int) -> int:
        if not isinstance(seed_id, (int, np.integer)) or not 0 <= seed_id < self.num_seeds:
            raise UnknownSeedError(seed_id, self.num_seeds)
        return int(seed_id)

    def _time_served(self, seed_id: int, stage: SeedStage) -> bool:
        epochs = int(self._mirror[seed_id, EPOCHS_IN_STAGE])
        return epochs >= (self.config.embargo_epochs if stage is S.CULLED else 1)

    @torch.no_grad()
    def _move(self, seed_id: int, target: SeedStage, reason: str) -> None:
        """Apply a transition that has been checked: stage table, per-seed buffers, records."""
        current = self.stage_of(seed_id)
        self._mirror[seed_id, STAGE] = target
        self._mirror[seed_id, EPOCHS_IN_STAGE] = 0
        self.steps_in_stage[seed_id] = 0
        self._readiness.pop(seed_id, None)
        if target is S.TRAINING:
            self.recon_ratio[seed_id] = float("nan")
        if target is S.GRAFTING:
            self.alpha[seed_id] = 0.0
            self.strategy_state[seed_id] = 0.0
        record = self._records.get(seed_id)
        if record is not None:
            record.history.append((int(target), self._epoch))
        if target in TERMINAL_OUTCOMES and record is not None:
            self._outcomes.append(self._outcome(seed_id, record, target, reason))
        if target in _RELEASING:
            self._release(seed_id)
        if target in TERMINAL_OUTCOMES or target is S.DORMANT:
            self._records.pop(seed_id, None)
        self._events.append(LifecycleEvent(self.layer_id, seed_id, current, target, self._epoch,
                                           self._step, reason))
        self._push_state()

    def _release(self, seed_id: int) -> None:
        """Remove the seed's blueprint: the chunk is the host's again, bit for bit."""
        slot = int(self._slot[seed_id])
        if slot >= 0:
            self.banks[str(int(self._mirror[seed_id, BLUEPRINT_ID]))].clear_slot(slot)
        self._slot[seed_id] = -1
        self._mirror[seed_id, BLUEPRINT_ID] = -1
        self._mirror[seed_id, STRATEGY] = -1
        for buf in (self.alpha, self.grad_norm, self.drift, self.strategy_state):
            buf[seed_id] = 0.0
        self.recon_ratio[seed_id] = float("nan")
        self.nonfinite[seed_id] = False

    def _outcome(self, seed_id: int, rec: SeedRecord, target: SeedStage,
                 reason: str) -> SeedOutcome:
        width = self.chunks[seed_id][1] - self.chunks[seed_id][0]
        return SeedOutcome(
            layer_id=self.layer_id, seed_id=seed_id, outcome=target,
            blueprint_id=rec.blueprint_id, strategy_id=rec.strategy_id,
            germinated_epoch=rec.germinated_epoch, ended_epoch=self._epoch,
            history=[(S(s), e) for s, e in rec.history], metric_before=rec.metric_before,
            metric_after=self._last_metric,
            contribution=float(np.mean(rec.contributions)) if rec.contributions else None,
            params_added=(get_blueprint(rec.blueprint_id).param_count(width)
                          if target is S.FOSSILIZED else 0),
            reason=reason)

    # ---------------------------------------------------------------- checkpoint
    def get_extra_state(self) -> dict:
        # Plain Python types only, so torch.load(weights_only=True) accepts the checkpoint.
        return {"epoch": self._epoch, "step": self._step, "last_metric": self._last_metric,
                "layer_id": self.layer_id,
                "readiness": {int(k): int(v) for k, v in self._readiness.items()},
                "records": {int(k): r.to_dict() for k, r in self._records.items()}}

    def set_extra_state(self, extra: dict) -> None:
        self._epoch, self._step = int(extra["epoch"]), int(extra["step"])
        self._tracking_step = self._step % self.config.telemetry_every == 0
        self._last_metric = extra["last_metric"]
        self.layer_id = self.layer_id or extra["layer_id"]
        self._readiness = {int(k): S(v) for k, v in extra["readiness"].items()}
        self._records = {int(k): SeedRecord(**{**r, "history": [tuple(h) for h in r["history"]]})
                         for k, r in extra["records"].items()}
