"""Host-side records of what happened to seeds: transitions and final outcomes."""

from __future__ import annotations

from dataclasses import dataclass, field

from .lifecycle import SeedStage


@dataclass(frozen=True)
class LifecycleEvent:
    layer_id: str
    seed_id: int
    from_stage: SeedStage
    to_stage: SeedStage
    epoch: int
    step: int
    reason: str


@dataclass
class SeedRecord:
    """One germination of one seed, from GERMINATED until it ends. Plain data (checkpointed)."""

    blueprint_id: int
    strategy_id: int
    germinated_epoch: int
    germinated_step: int
    metric_before: float | None
    history: list[tuple[int, int]] = field(default_factory=list)  # (stage, epoch entered)
    contributions: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class SeedOutcome:
    """A seed that ended (FOSSILIZED, CULLED, ROLLED_BACK, CANCELLED): a field report's content."""

    layer_id: str
    seed_id: int
    outcome: SeedStage
    blueprint_id: int
    strategy_id: int
    germinated_epoch: int
    ended_epoch: int
    history: list[tuple[SeedStage, int]]
    metric_before: float | None
    metric_after: float | None
    contribution: float | None  # mean counterfactual contribution while EVALUATING
    params_added: int
    reason: str
    chunk_size: int = 0  # features of the seed's chunk
    execution_path: str = "chunked"  # the lifecycle it ended on (DESIGN §9: per-path outcomes)
