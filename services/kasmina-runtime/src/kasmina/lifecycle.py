"""The 11-stage seed lifecycle: stages, the transition table, and typed refusals (DESIGN §3.2)."""

from __future__ import annotations

import dataclasses
import enum


class SeedStage(enum.IntEnum):
    DORMANT = 0
    GERMINATED = 1
    TRAINING = 2
    GRAFTING = 3
    STABILIZATION = 4
    EVALUATING = 5
    FINE_TUNING = 6
    FOSSILIZED = 7
    CULLED = 8
    CANCELLED = 9
    ROLLED_BACK = 10


S = SeedStage
# Stages counted against max_active_seeds.
ACTIVE_STAGES = frozenset({S.GERMINATED, S.TRAINING, S.GRAFTING, S.STABILIZATION,
                           S.EVALUATING, S.FINE_TUNING})
# Stages whose blueprint runs in the forward pass.
RUNNING_STAGES = frozenset({S.TRAINING, S.GRAFTING, S.STABILIZATION, S.EVALUATING,
                            S.FINE_TUNING, S.FOSSILIZED})
# Stages whose blueprint output is blended into the layer's output.
BLENDING_STAGES = RUNNING_STAGES - {S.TRAINING}
# Stages whose blueprint parameters the seed optimizer updates.
TRAINABLE_STAGES = frozenset({S.TRAINING, S.GRAFTING, S.FINE_TUNING, S.FOSSILIZED})
# A seed that ends here produces a field report.
TERMINAL_OUTCOMES = frozenset({S.FOSSILIZED, S.CULLED, S.ROLLED_BACK, S.CANCELLED})

# A seed that moves here gives its blueprint slot back: the chunk is the host's again.
RELEASING_STAGES = frozenset({S.CULLED, S.CANCELLED, S.ROLLED_BACK})

ROLLBACK_FROM = (S.TRAINING, S.GRAFTING, S.STABILIZATION, S.EVALUATING, S.FINE_TUNING)

# from -> allowed targets. The only move outside this table is the operator reset
# ROLLED_BACK -> DORMANT, which needs force (see `check_transition`).
TRANSITIONS: dict[SeedStage, frozenset[SeedStage]] = {
    S.DORMANT: frozenset({S.GERMINATED}),
    S.GERMINATED: frozenset({S.TRAINING, S.CANCELLED}),
    S.TRAINING: frozenset({S.GRAFTING, S.CULLED, S.CANCELLED, S.ROLLED_BACK}),
    S.GRAFTING: frozenset({S.STABILIZATION, S.ROLLED_BACK}),
    S.STABILIZATION: frozenset({S.EVALUATING, S.ROLLED_BACK}),
    S.EVALUATING: frozenset({S.FINE_TUNING, S.CULLED, S.ROLLED_BACK}),
    S.FINE_TUNING: frozenset({S.FOSSILIZED, S.CULLED, S.ROLLED_BACK}),
    S.FOSSILIZED: frozenset(),
    S.CULLED: frozenset({S.DORMANT}),
    S.CANCELLED: frozenset({S.DORMANT}),
    S.ROLLED_BACK: frozenset(),
}

# Transitions a command may make without its gate having passed.
UNGATED = frozenset({(S.GERMINATED, S.TRAINING), (S.GERMINATED, S.CANCELLED),
                     (S.TRAINING, S.CANCELLED)}
                    | {(s, S.CULLED) for s in (S.TRAINING, S.EVALUATING, S.FINE_TUNING)}
                    | {(s, S.ROLLED_BACK) for s in ROLLBACK_FROM})


# The legacy path's short lifecycle (DESIGN §9): one seed over the whole layer, the five stages
# the 11-stage plan did not add. A germinated blueprint grafts straight away (no reconstruction
# phase), FOSSILIZED once alpha reached 1, and CULLED is its one terminal failure (no embargo).
LEGACY_TRANSITIONS: dict[SeedStage, frozenset[SeedStage]] = {
    **{stage: frozenset() for stage in SeedStage},
    S.DORMANT: frozenset({S.GERMINATED}),
    S.GERMINATED: frozenset({S.GRAFTING, S.CULLED}),
    S.GRAFTING: frozenset({S.FOSSILIZED, S.CULLED}),
}
LEGACY_UNGATED = frozenset({(S.GERMINATED, S.GRAFTING), (S.GERMINATED, S.CULLED),
                            (S.GRAFTING, S.CULLED)})


@dataclasses.dataclass(frozen=True)
class Lifecycle:
    """A transition table and what the shared gates and safety triggers mean in it: the gates
    are written for the 11 stages, so a shorter table says which of its stages stands for a
    target it lacks (`substitutes`), and which stage a controller promotes a germinated seed
    to (`promotion`: ungated, published as readiness when it is not TRAINING)."""
    name: str
    transitions: dict[SeedStage, frozenset[SeedStage]]
    ungated: frozenset[tuple[SeedStage, SeedStage]]
    substitutes: dict[SeedStage, SeedStage]
    promotion: SeedStage

    @property
    def failure(self) -> SeedStage:
        """Where a safety trigger (non-finite values, drift) sends a running seed."""
        return self.substitutes.get(S.ROLLED_BACK, S.ROLLED_BACK)


FULL = Lifecycle("chunked", TRANSITIONS, UNGATED, {}, S.TRAINING)
LEGACY = Lifecycle("legacy", LEGACY_TRANSITIONS, LEGACY_UNGATED,
                   {S.STABILIZATION: S.FOSSILIZED, S.ROLLED_BACK: S.CULLED}, S.GRAFTING)


class LifecycleError(ValueError):
    """A refused lifecycle request. `code` is a stable machine-readable reason."""

    code = "invalid"


class UnknownSeedError(LifecycleError):
    code = "unknown_seed"

    def __init__(self, seed_id: int, num_seeds: int) -> None:
        super().__init__(f"seed {seed_id} does not exist (layer has {num_seeds} seeds)")
        self.seed_id = seed_id


class InvalidTransitionError(LifecycleError):
    code = "refused_transition"

    def __init__(self, seed_id: int, current: SeedStage, target: SeedStage) -> None:
        super().__init__(
            f"seed {seed_id}: transition {current.name} -> {target.name} is not allowed")
        self.seed_id, self.current, self.target = seed_id, current, target


class GateNotPassedError(LifecycleError):
    code = "gate_not_passed"

    def __init__(self, seed_id: int, current: SeedStage, target: SeedStage) -> None:
        super().__init__(f"seed {seed_id}: gate for {current.name} -> {target.name} has not "
                         f"passed (use force=True to skip it)")
        self.seed_id, self.current, self.target = seed_id, current, target


class EmbargoError(LifecycleError):
    code = "embargo"


class CapacityError(LifecycleError):
    code = "capacity"


class BlueprintDoesNotFitError(LifecycleError):
    code = "blueprint_does_not_fit"


class UnknownBlueprintError(LifecycleError):
    code = "unknown_blueprint"


class UnknownStrategyError(LifecycleError):
    code = "unknown_strategy"


def check_transition(seed_id: int, current: SeedStage, target: SeedStage,
                     force: bool = False) -> None:
    """Raise `InvalidTransitionError` unless the table (or a forced reset) allows the move."""
    if target in TRANSITIONS[current]:
        return
    if force and current is S.ROLLED_BACK and target is S.DORMANT:
        return
    raise InvalidTransitionError(seed_id, current, target)
