"""`SeedTable`: the host side of a seed layer, torch-free (DESIGN §3.1, §3.2).

Stages, blueprint slots, lifecycle records, readiness, events and outcomes of every seed of one
layer, as numpy arrays and plain Python. Commands and epoch boundaries change the table; the
layer that owns it applies the accumulated `LaneChange`s to its tensors in one commit
(`KasminaLayer._commit`), so a boundary that moves many seeds copies the stage table to the
device once. The lifecycle (transition table, ungated moves, what the shared gates mean) is a
parameter: the legacy path's short lifecycle is `lifecycle.LEGACY`.

Slots: every blueprint the layer can grow has a fixed range of lanes (its bank's slots), laid
out at construction; a germinated seed holds one lane of its blueprint's range until it is
released (culled, cancelled, rolled back). The set of lanes never changes, so the layer's
parameters never do either.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from .blueprints import (
    BUILT_IN_IDS,
    DEFAULT_ACTIVATION,
    BlueprintSpec,
    fits_bank,
    get_blueprint,
    register_blueprint,
)
from .events import LifecycleEvent, SeedOutcome, SeedRecord
from .lifecycle import (
    ACTIVE_STAGES,
    FULL,
    RELEASING_STAGES,
    RUNNING_STAGES,
    TERMINAL_OUTCOMES,
    BlueprintDoesNotFitError,
    CapacityError,
    EmbargoError,
    GateNotPassedError,
    InvalidTransitionError,
    Lifecycle,
    LifecycleError,
    SeedStage,
    UnknownBlueprintError,
    UnknownSeedError,
)
from .strategies import get_strategy

S = SeedStage
STAGE, BLUEPRINT_ID, EPOCHS_IN_STAGE, STRATEGY = range(4)  # columns of `state`


@dataclass(frozen=True)
class LaneChange:
    """One applied transition, for the layer's tensors: `lane` is the seed's lane (-1: none)."""

    seed: int
    lane: int
    target: SeedStage
    init_seed: int | None = None  # germination: seed of the blueprint's initialisation
    blueprint_id: int = -1  # the seed's blueprint when it moved (its bank's may be wider)


class SeedTable:
    def __init__(self, chunks: list[tuple[int, int]], lanes: Mapping[int, tuple[int, int]],
                 max_active_seeds: int, embargo_epochs: int, layer_id: str = "",
                 lifecycle: Lifecycle = FULL,
                 bank_specs: Mapping[int, BlueprintSpec] | None = None) -> None:
        self.chunks = chunks
        self.widths = np.array([e - s for s, e in chunks])
        self.lanes = dict(lanes)  # bank (its catalog blueprint's id) -> [start, end) lane range
        # bank -> the shape it was built to (its blueprint, sizes raised by the headroom)
        self.bank_specs = dict(bank_specs or {b: get_blueprint(b) for b in self.lanes})
        self.num_lanes = max((e for _, e in self.lanes.values()), default=0)
        self.max_active_seeds, self.embargo_epochs = max_active_seeds, embargo_epochs
        self.layer_id = layer_id
        self.lifecycle = lifecycle
        self.transitions, self.ungated = lifecycle.transitions, lifecycle.ungated
        self.state = np.zeros((len(chunks), 4), dtype=np.int32)
        self.state[:, BLUEPRINT_ID] = self.state[:, STRATEGY] = -1
        self.slot = np.full(len(chunks), -1, dtype=np.int32)  # lane of each seed
        self.readiness: dict[int, SeedStage] = {}
        self.records: dict[int, SeedRecord] = {}
        self.counterfactual: frozenset[int] = frozenset()
        self.epoch = self.step = 0
        self.last_metric: float | None = None
        self.changes: list[LaneChange] = []  # not yet committed to the layer's tensors
        self._events: list[LifecycleEvent] = []
        self._outcomes: list[SeedOutcome] = []

    @property
    def num_seeds(self) -> int:
        return len(self.chunks)

    # ---------------------------------------------------------------- queries
    def stage_of(self, seed: int) -> SeedStage:
        return S(int(self.state[self.check_seed(seed), STAGE]))

    def seeds_in(self, *stages: SeedStage) -> list[int]:
        return np.flatnonzero(np.isin(self.state[:, STAGE], stages)).tolist()

    def active_count(self) -> int:
        return int(np.isin(self.state[:, STAGE], list(ACTIVE_STAGES)).sum())

    def lane_owner(self) -> np.ndarray:
        """(L,) the seed holding each lane, -1 where free."""
        owner = np.full(self.num_lanes, -1, dtype=np.int64)
        held = np.flatnonzero(self.slot >= 0)
        owner[self.slot[held]] = held
        return owner

    def params_added(self) -> int:
        """Blueprint parameters in use: seeds whose blueprint runs (TRAINING .. FOSSILIZED)."""
        return sum(get_blueprint(int(self.state[s, BLUEPRINT_ID])).param_count(
            int(self.widths[s])) for s in self.seeds_in(*RUNNING_STAGES))

    def check_seed(self, seed: int) -> int:
        if not isinstance(seed, (int, np.integer)) or not 0 <= seed < self.num_seeds:
            raise UnknownSeedError(seed, self.num_seeds)
        return int(seed)

    # ---------------------------------------------------------------- commands
    def germinate(self, seed: int, blueprint: str | int | BlueprintSpec,
                  strategy: str | int) -> None:
        """DORMANT -> GERMINATED; every refusal raises a `LifecycleError` and changes nothing."""
        seed = self.check_seed(seed)
        spec, strat = get_blueprint(blueprint), get_strategy(strategy)
        current = self.stage_of(seed)
        if current is S.CULLED:
            left = self.embargo_epochs - int(self.state[seed, EPOCHS_IN_STAGE])
            raise EmbargoError(f"seed {seed} is under embargo for {left} more epoch(s)")
        self._check(seed, current, S.GERMINATED)
        width = int(self.widths[seed])
        if not spec.fits(width):
            raise BlueprintDoesNotFitError(
                f"blueprint {spec.name!r} does not fit seed {seed}'s chunk of {width} features")
        bank = self.bank_for(spec)
        if bank is None:
            raise UnknownBlueprintError(self._no_bank(spec))
        active = self.active_count()
        if active >= self.max_active_seeds:
            raise CapacityError(f"layer {self.layer_id!r} already has {active} active seeds "
                                f"(max_active_seeds={self.max_active_seeds})")
        start, end = self.lanes[bank]
        free = sorted(set(range(start, end)) - set(self.slot.tolist()))
        if not free:
            raise CapacityError(f"layer {self.layer_id!r}: all {end - start} slots of "
                                f"{spec.name!r} are held (KasminaConfig.bank_slots)")
        self.slot[seed] = free[0]
        self.state[seed, BLUEPRINT_ID], self.state[seed, STRATEGY] = spec.id, strat.id
        self.records[seed] = SeedRecord(spec.id, strat.id, self.epoch, self.step,
                                        self.last_metric)
        # Identical on every rank and in every process: from (layer, seed, epoch, step) ids.
        init = zlib.crc32(f"{self.layer_id}|{seed}|{self.epoch}|{self.step}".encode())
        self.move(seed, S.GERMINATED, "germination request", init_seed=init)

    def _no_bank(self, spec: BlueprintSpec) -> str:
        message = (f"layer {self.layer_id!r} has no bank for blueprint {spec.name!r} (banks are "
                   f"made at construction for KasminaConfig.blueprints: "
                   f"{sorted(b.name for b in self.bank_specs.values())})")
        kin = [b for b in self.bank_specs.values() if b.kind == spec.kind]
        if kin:  # a bank of its kind, too narrow or of another activation
            def shape(b: BlueprintSpec) -> str:
                return f"hidden {b.hidden}, rank {b.rank}, {b.activation or DEFAULT_ACTIVATION}"

            message += (f"; it needs {shape(spec)}, the {spec.kind} banks are "
                        f"{', '.join(shape(b) for b in kin)} (KasminaConfig.bank_hidden / "
                        f"bank_rank build them wider; a bank runs one activation)")
        return message

    def bank_for(self, spec: BlueprintSpec) -> int | None:
        """The bank a seed of `spec` grows in: its own, else the first that fits it."""
        if spec.id in self.lanes:
            return spec.id
        return next((b for b, shape in sorted(self.bank_specs.items())
                     if fits_bank(spec, shape)), None)

    def cancel(self, seed: int) -> bool:
        if self.stage_of(seed) not in (S.GERMINATED, S.TRAINING):
            return False
        self.move(seed, S.CANCELLED, "cancel request")
        return True

    def transition(self, seed: int, target: SeedStage | int, force: bool = False,
                   reason: str = "command") -> None:
        """Move a seed along the table. `force` skips a gate, never the table (except the
        operator reset ROLLED_BACK -> DORMANT, which needs it)."""
        seed, target = self.check_seed(seed), S(target)
        current = self.stage_of(seed)
        if target is S.GERMINATED:
            if current is S.DORMANT:
                raise LifecycleError("germination needs a blueprint: use germinate()")
            raise InvalidTransitionError(seed, current, target)
        self._check(seed, current, target, force)
        if not force and (current, target) not in self.ungated:
            if current is S.CULLED and not self.time_served(seed):
                raise EmbargoError(f"seed {seed} is under embargo")
            if current is S.CANCELLED and not self.time_served(seed):
                raise GateNotPassedError(seed, current, target)
            if current not in (S.CULLED, S.CANCELLED) and self.readiness.get(seed) is not target:
                raise GateNotPassedError(seed, current, target)
        self.move(seed, target, reason)

    def time_served(self, seed: int) -> bool:
        epochs = int(self.state[seed, EPOCHS_IN_STAGE])
        return epochs >= (self.embargo_epochs if self.stage_of(seed) is S.CULLED else 1)

    def _check(self, seed: int, current: SeedStage, target: SeedStage,
               force: bool = False) -> None:
        if target in self.transitions[current]:
            return
        if force and current is S.ROLLED_BACK and target is S.DORMANT:
            return
        raise InvalidTransitionError(seed, current, target)

    def move(self, seed: int, target: SeedStage, reason: str,
             init_seed: int | None = None) -> None:
        """Apply a checked transition to the table and queue its tensor change."""
        current = self.stage_of(seed)
        self.state[seed, STAGE] = target
        self.state[seed, EPOCHS_IN_STAGE] = 0
        self.readiness.pop(seed, None)
        self.changes.append(LaneChange(seed, int(self.slot[seed]), target, init_seed,
                                       int(self.state[seed, BLUEPRINT_ID])))
        record = self.records.get(seed)
        if record is not None:
            record.history.append((int(target), self.epoch))
            if target in TERMINAL_OUTCOMES:
                self._outcomes.append(self._outcome(seed, record, target, reason))
        if target in RELEASING_STAGES:
            self.slot[seed] = -1
            self.state[seed, BLUEPRINT_ID] = self.state[seed, STRATEGY] = -1
        if target in TERMINAL_OUTCOMES or target is S.DORMANT:
            self.records.pop(seed, None)
        self._events.append(LifecycleEvent(self.layer_id, seed, current, target, self.epoch,
                                           self.step, reason))

    # ---------------------------------------------------------------- epoch boundary
    def end_epoch(self, nonfinite: np.ndarray, val_metric: float | None,
                  sign: float) -> tuple[np.ndarray, np.ndarray]:
        """Advance epochs, roll back non-finite seeds, return served seeds to DORMANT. Returns
        per-seed (contribution, gain since germination), NaN where unknown, for the gates."""
        self.epoch += 1
        self.state[:, EPOCHS_IN_STAGE] += 1
        stage = self.state[:, STAGE].copy()
        # A FOSSILIZED seed cannot be rolled back (terminal): its non-finite outputs stay masked.
        failure = self.lifecycle.failure
        rollback = [s for s in self.transitions if failure in self.transitions[s]]
        for seed in np.flatnonzero(nonfinite & np.isin(stage, rollback)):
            self.move(int(seed), failure, "safety: non-finite output or gradient")
        returning = [s for s in (S.CULLED, S.CANCELLED) if S.DORMANT in self.transitions[s]]
        for seed in np.flatnonzero(np.isin(stage, returning)):
            if self.time_served(int(seed)):
                self.move(int(seed), S.DORMANT, "embargo served" if stage[seed] == S.CULLED
                          else "cancelled seed returns to dormant")
        contribution = np.full(self.num_seeds, np.nan)
        gain = np.full(self.num_seeds, np.nan)
        for seed, rec in self.records.items():
            if rec.contributions:
                contribution[seed] = float(np.mean(rec.contributions))
            if val_metric is not None and rec.metric_before is not None:
                gain[seed] = sign * (val_metric - rec.metric_before)
        self.last_metric = val_metric if val_metric is not None else self.last_metric
        for rec in self.records.values():
            if rec.metric_before is None:
                rec.metric_before = self.last_metric
        return contribution, gain

    def readiness_from(self, gates: Mapping[int, SeedStage]) -> dict[int, SeedStage]:
        """The gates' verdicts (written for the 11 stages) in this table's stages: a target the
        table lacks becomes its substitute, one it still does not allow is dropped; in a table
        whose promotion is not TRAINING, a germinated seed is ready for it."""
        ready = {}
        for seed, target in gates.items():
            target = self.lifecycle.substitutes.get(target, target)
            if target in self.transitions[self.stage_of(seed)]:
                ready[seed] = target
        if self.lifecycle.promotion is not S.TRAINING:
            for seed in self.seeds_in(S.GERMINATED):
                ready.setdefault(seed, self.lifecycle.promotion)
        return ready

    def set_counterfactual(self, seeds: Iterable[int]) -> None:
        self.counterfactual = frozenset(self.check_seed(s) for s in seeds)

    # ---------------------------------------------------------------- records
    def drain_events(self) -> list[LifecycleEvent]:
        events, self._events = self._events, []
        return events

    def drain_outcomes(self) -> list[SeedOutcome]:
        outcomes, self._outcomes = self._outcomes, []
        return outcomes

    def _outcome(self, seed: int, rec: SeedRecord, target: SeedStage,
                 reason: str) -> SeedOutcome:
        return SeedOutcome(
            layer_id=self.layer_id, seed_id=seed, outcome=target,
            blueprint_id=rec.blueprint_id, strategy_id=rec.strategy_id,
            germinated_epoch=rec.germinated_epoch, ended_epoch=self.epoch,
            history=[(S(s), e) for s, e in rec.history], metric_before=rec.metric_before,
            metric_after=self.last_metric,
            contribution=float(np.mean(rec.contributions)) if rec.contributions else None,
            params_added=(get_blueprint(rec.blueprint_id).param_count(int(self.widths[seed]))
                          if target is S.FOSSILIZED else 0),
            reason=reason, chunk_size=int(self.widths[seed]),
            execution_path=self.lifecycle.name)

    def to_dict(self) -> dict:
        """JSON-serialisable bookkeeping for checkpoints (stages and slots are tensors)."""
        out = {"epoch": self.epoch, "step": self.step, "last_metric": self.last_metric,
               "layer_id": self.layer_id, "lifecycle": self.lifecycle.name,
               "readiness": {str(k): int(v) for k, v in self.readiness.items()},
               "records": {str(k): r.to_dict() for k, r in self.records.items()}}
        # The specs its seeds grew that are not built in (received on the wire, registered by
        # the user), which another process may not know: registered again at load.
        grown = ({int(b) for b in self.state[:, BLUEPRINT_ID] if b >= 0}
                 | {r.blueprint_id for r in self.records.values()}) - BUILT_IN_IDS
        if grown:
            out["specs"] = [dataclasses.asdict(get_blueprint(b)) for b in sorted(grown)]
        return out

    def load_dict(self, extra: dict, state: np.ndarray, slot: np.ndarray) -> None:
        saved = extra.get("lifecycle", self.lifecycle.name)  # absent before the legacy path
        if saved != self.lifecycle.name:
            raise ValueError(f"layer {self.layer_id!r}: the checkpoint holds a {saved} seed table, "
                             f"this layer runs the {self.lifecycle.name} path (python -m kasmina "
                             f"migrate converts a legacy checkpoint)")
        for spec in extra.get("specs", []):  # absent before specs were received on the wire
            register_blueprint(BlueprintSpec(**spec))
        self.epoch, self.step = int(extra["epoch"]), int(extra["step"])
        self.last_metric = extra["last_metric"]
        self.layer_id = self.layer_id or extra["layer_id"]
        self.readiness = {int(k): S(v) for k, v in extra["readiness"].items()}
        self.records = {int(k): SeedRecord(**{**r, "history": [tuple(h) for h in r["history"]]})
                        for k, r in extra["records"].items()}
        self.state[:] = state
        self.slot[:] = slot
        self.changes.clear()
