"""Karn proposes blueprints: an ask-and-tell search over a catalog entry's hyper-parameters.

For each parent (a built-in blueprint whose kind has a size), an Optuna study (TPE sampler) asks
for a hidden width or rank, a grafting ramp length and a seed learning rate; the spec it asks for
is recorded in the database (karn_blueprints, so ListBlueprints and Recommend see it, and
karn_blueprint_proposals, its provenance) and published on the bus. Field reports that name it
tell the study how it did, with the recommender's reward (karn.store: what a seed added, in
[0, 1]; its posterior mean). A proposal whose mean reward, once it has `reports_per_trial`
reports, is 0 or below `retire_fraction` of its parent's is retired: the recommender stops
offering it, and the search never asks for it again. So is one the runtimes refused
`max_refusals` times (a Germinate of it answered unknown_blueprint or blueprint_does_not_fit,
which the runtime reports as a field report ending DORMANT): its trial is told 0, the worst
reward. The sizes asked for
stay within the runtimes' room (`max_hidden`, `max_rank`: what KasminaConfig.bank_hidden /
bank_rank build), so a fleet configured alike refuses none.

The study is rebuilt from the database at every round, so the database is the whole state: a
restarted Karn, or another replica, continues the same search.
"""

from __future__ import annotations

import asyncio
import logging
import math
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import optuna
from oona import Bus, contracts, streams
from oona.contracts import BlueprintDim, BlueprintProposal, BlueprintSpec, with_cost
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from karn.database import blueprint_proposals, blueprints, field_reports, spec_from_row, spec_row
from karn.recommender import posterior_mean
from karn.store import FieldReportStore

log = logging.getLogger(__name__)

PROPOSER = "optuna-tpe"
# The stream proposals go out on (DESIGN §4 names no other for them).
BLUEPRINT_PROPOSALS = streams.BLUEPRINT_PROPOSALS
ACTIVE, RETIRED = "active", "retired"
# The final stage of the field report a runtime publishes for a refused Germinate (the seed
# stayed there; kasmina.fleet.wire.refusal_to_field_report); no seed that grew ends in it.
REFUSED_STAGE = "DORMANT"
# Asking again for a spec the study already holds (integer sizes collide) is retried this often.
_ASK_ATTEMPTS = 8


@dataclass(frozen=True)
class SearchConfig:
    """What the search varies, within which bounds, and how outcomes steer it."""

    # A trial is told its value once its spec has this many field reports.
    reports_per_trial: int = 4
    # Proposals of one parent waiting for outcomes at a time; no new one past this.
    max_pending: int = 2
    # Retired once it has reports_per_trial reports whose mean reward is 0 (nothing it grew
    # added anything) or below this fraction of its parent's mean reward. Relative, because a
    # reward measures what a seed added (typically 0.04-0.16 on the digits job:
    # benchmarks/results/fleet_digits_cpu_2026-12-01_reward.txt), not a 0-1 success rate.
    retire_fraction: float = 0.5
    # Retired once the runtimes refused it this many times, whatever its other reports: a
    # refusal repeats for every runtime built with the same room, so waiting for more wastes
    # germinations.
    max_refusals: int = 2
    # Random trials before TPE models the outcomes (Optuna's n_startup_trials).
    startup_trials: int = 4
    # None: a fresh seed per process.
    seed: int | None = None
    hidden: tuple[int, int] = (4, 512)
    rank: tuple[int, int] = (1, 64)
    ramp_steps: tuple[int, int] = (5, 200)
    seed_learning_rate: tuple[float, float] = (1e-4, 1e-1)
    # The runtimes' room, as KasminaConfig.bank_hidden / bank_rank build it: a parent's sizes
    # are asked for up to max(its own size, this) (0: its own, the runtime's default); None: up
    # to `hidden` / `rank`'s upper bound, whatever the runtimes can grow.
    max_hidden: int | None = None
    max_rank: int | None = None

    def __post_init__(self) -> None:
        if (self.reports_per_trial < 1 or self.max_pending < 1 or self.startup_trials < 0
                or self.max_refusals < 1):
            raise ValueError("need reports_per_trial >= 1, max_pending >= 1, "
                             "startup_trials >= 0, max_refusals >= 1")
        if min(self.max_hidden or 0, self.max_rank or 0) < 0:
            raise ValueError("max_hidden and max_rank must be >= 0")
        if not 0 <= self.retire_fraction <= 1:
            raise ValueError("retire_fraction must be in [0, 1]")
        for name in ("hidden", "rank", "ramp_steps", "seed_learning_rate"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"{name} bounds must satisfy 0 < low <= high, got {low, high}")


@dataclass(frozen=True)
class Proposal:
    spec: BlueprintSpec
    parent_blueprint_id: int
    trial_number: int
    params: dict[str, float]
    status: str
    published: bool

    def message(self) -> BlueprintProposal:
        return BlueprintProposal(blueprint=self.spec, proposer=PROPOSER,
                                 trial_number=self.trial_number,
                                 parent_blueprint_id=self.parent_blueprint_id)


def search_space(parent: BlueprintSpec, config: SearchConfig) -> dict[str, BaseDistribution]:
    """The hyper-parameters of a parent's study: its kind's sizes, the ramp, the learning rate."""
    dims = {d for p in contracts.kind_definition(parent.kind).parameters for d in p.shape}
    space: dict[str, BaseDistribution] = {}
    if BlueprintDim.BLUEPRINT_DIM_HIDDEN in dims:
        space["hidden"] = IntDistribution(*_within(config.hidden, parent.hidden,
                                                   config.max_hidden), log=True)
    if BlueprintDim.BLUEPRINT_DIM_RANK in dims:
        space["rank"] = IntDistribution(*_within(config.rank, parent.rank, config.max_rank),
                                        log=True)
    space["ramp_steps"] = IntDistribution(*config.ramp_steps, log=True)
    space["seed_learning_rate"] = FloatDistribution(*config.seed_learning_rate, log=True)
    return space


def _within(bounds: tuple[int, int], own: int, room: int | None) -> tuple[int, int]:
    """`bounds` cut to the room a runtime's bank of the parent has: max(own, room)."""
    low, high = bounds
    if room is not None:
        high = min(high, max(own, room))
    return min(low, high), high


def proposed_spec(parent: BlueprintSpec, trial_number: int,
                  params: dict[str, Any]) -> BlueprintSpec:
    """The child spec: the parent's kind, activation, init and chunk range with the asked-for
    hyper-parameters; its id is given when it is stored."""
    spec = BlueprintSpec()
    spec.CopyFrom(parent)
    spec.ClearField("parameter_cost")
    spec.name = f"{parent.name}.s{trial_number}"
    for name, value in params.items():
        setattr(spec, name, value)
    sizes = ", ".join(f"{k} {params[k]}" for k in ("hidden", "rank") if k in params)
    spec.description = (f"proposed by {PROPOSER} (trial {trial_number} of {parent.name}): "
                        f"{sizes}, ramp {params['ramp_steps']} steps, seed lr "
                        f"{params['seed_learning_rate']:.2g}")
    return spec


class BlueprintSearch:
    """Synchronous and bus-agnostic, like the store: `step()` retires and proposes."""

    def __init__(self, store: FieldReportStore, config: SearchConfig | None = None,
                 parents: tuple[str, ...] = ()) -> None:
        """`parents`: names of the built-in blueprints to search around (empty: every built-in
        entry whose kind has a size)."""
        self._store = store
        self.config = config or SearchConfig()
        builtin = contracts.catalog()
        known = {s.name for s in builtin}
        if unknown := set(parents) - known:
            raise ValueError(f"unknown parent blueprints {sorted(unknown)}; built-in: "
                             f"{sorted(known)}")
        self.parents = [s for s in builtin if (s.name in parents if parents else
                                               s.hidden or s.rank)]
        optuna.logging.set_verbosity(optuna.logging.WARNING)

    # ---------------------------------------------------------------- the rounds
    def step(self) -> list[Proposal]:
        """Retire the proposals whose outcomes failed, then ask each parent's study for at most
        one new spec (none while `max_pending` of its proposals await outcomes). Returns the
        new proposals, stored and not yet published."""
        stats = {s.blueprint_id: s for s in self._store.statistics()}
        refusals = self.refusals()
        for proposal in self.proposals():
            if proposal.status != ACTIVE:
                continue
            refused = refusals.get(proposal.spec.blueprint_id, 0)
            if refused >= self.config.max_refusals:
                self._retire(proposal, f"refused {refused} times by the runtimes (no bank with "
                                       f"room for it, or no chunk it fits)")
                continue
            stat = stats.get(proposal.spec.blueprint_id)
            if stat is not None and stat.reports >= self.config.reports_per_trial:
                mean = stat.successes / stat.reports
                parent = stats.get(proposal.parent_blueprint_id)
                bar = self.config.retire_fraction * (
                    parent.successes / parent.reports if parent and parent.reports else 0.0)
                if mean == 0 or mean < bar:
                    self._retire(proposal, f"mean reward {mean:.3f} after {stat.reports} reports"
                                           f" (its parent's x {self.config.retire_fraction}: "
                                           f"{bar:.3f})")
        proposals = self.proposals()  # with this round's retirements
        new = []
        for parent in self.parents:
            mine = [p for p in proposals if p.parent_blueprint_id == parent.blueprint_id]
            pending = [p for p in mine if p.status == ACTIVE
                       and self._reports(stats, p) < self.config.reports_per_trial]
            if len(pending) >= self.config.max_pending:
                continue
            proposal = self._propose(parent, mine, stats, refusals)
            if proposal is not None:
                new.append(proposal)
        return new

    def _reports(self, stats: dict[int, Any], proposal: Proposal) -> int:
        stat = stats.get(proposal.spec.blueprint_id)
        return stat.reports if stat is not None else 0

    def _propose(self, parent: BlueprintSpec, mine: list[Proposal], stats: dict[int, Any],
                 refusals: dict[int, int]) -> Proposal | None:
        space = search_space(parent, self.config)
        study = self._study(parent, len(mine))
        seen = set()
        for proposal in mine:  # tell the study everything the reports say so far
            stat = stats.get(proposal.spec.blueprint_id)
            params = {k: v for k, v in proposal.params.items() if k in space}
            seen.add(tuple(sorted(params.items())))
            if not all(space[k]._contains(space[k].to_internal_repr(v))
                       for k, v in params.items()):
                continue  # asked for under wider bounds (the room was lowered since)
            if refusals.get(proposal.spec.blueprint_id, 0) >= self.config.max_refusals:
                # Refused: a failed trial, told the worst reward so TPE steers away from it.
                study.add_trial(create_trial(params=params, distributions=space, value=0.0))
            elif stat is not None and stat.reports >= self.config.reports_per_trial:
                value = posterior_mean(stat.successes, stat.reports)
                study.add_trial(create_trial(params=params, distributions=space, value=value))
            else:  # waiting for outcomes: the sampler plans around it (constant liar)
                study.add_trial(create_trial(params=params, distributions=space,
                                             state=TrialState.RUNNING))
        for _ in range(_ASK_ATTEMPTS):
            trial = study.ask(space)
            key = tuple(sorted(trial.params.items()))
            if key not in seen:
                return self._record(parent, len(mine), trial.params)
            study.tell(trial, state=TrialState.FAIL)  # a duplicate: ask again
        log.info("search around %s asked only for specs it already holds", parent.name)
        return None

    def _study(self, parent: BlueprintSpec, trials: int) -> optuna.Study:
        # Seeded per (parent, round): the same history asks for the same next spec, in any
        # process, and each round's draw differs from the last.
        seed = (None if self.config.seed is None else
                zlib.crc32(f"{self.config.seed}|{parent.blueprint_id}|{trials}".encode()))
        sampler = optuna.samplers.TPESampler(n_startup_trials=self.config.startup_trials,
                                             constant_liar=True, seed=seed)
        return optuna.create_study(direction="maximize", sampler=sampler)

    # ---------------------------------------------------------------- the database
    def proposals(self) -> list[Proposal]:
        """Every proposal, oldest first."""
        query = (select(blueprint_proposals, blueprints)
                 .join(blueprints, blueprints.c.blueprint_id == blueprint_proposals.c.blueprint_id)
                 .order_by(blueprint_proposals.c.blueprint_id))
        with self._store.engine.connect() as connection:
            return [self._proposal(row) for row in connection.execute(query)]

    def refusals(self) -> dict[int, int]:
        """Blueprint id -> the Germinates of it the runtimes refused (REFUSED_STAGE reports)."""
        fr = field_reports.c
        query = (select(fr.blueprint_id, func.count()).where(fr.final_stage == REFUSED_STAGE)
                 .group_by(fr.blueprint_id))
        with self._store.engine.connect() as connection:
            return {bid: count for bid, count in connection.execute(query)}

    def _proposal(self, row: Any) -> Proposal:
        return Proposal(spec=spec_from_row(row), parent_blueprint_id=row.parent_blueprint_id,
                        trial_number=row.trial_number, params=dict(row.params),
                        status=row.status, published=row.published_at is not None)

    def _record(self, parent: BlueprintSpec, trial_number: int,
                params: dict[str, Any]) -> Proposal | None:
        spec = proposed_spec(parent, trial_number, params)
        try:
            with self._store.engine.begin() as connection:
                top = connection.execute(select(func.max(blueprints.c.blueprint_id))).scalar()
                spec.blueprint_id = max(top or 0, contracts.PROPOSED_BLUEPRINT_ID_BASE - 1) + 1
                spec = with_cost(spec)
                connection.execute(blueprints.insert(), spec_row(spec))
                connection.execute(blueprint_proposals.insert(), {
                    "blueprint_id": spec.blueprint_id,
                    "parent_blueprint_id": parent.blueprint_id, "proposer": PROPOSER,
                    "trial_number": trial_number, "params": params, "status": ACTIVE,
                    "status_reason": "", "proposed_at": datetime.now(UTC),
                    "published_at": None})
        except IntegrityError as exc:  # another replica took the id or the name first
            log.info("proposal around %s not stored (%s); the next round asks again",
                     parent.name, exc.orig)
            return None
        log.info("proposed blueprint %s (id %d): %s", spec.name, spec.blueprint_id,
                 spec.description)
        return Proposal(spec, parent.blueprint_id, trial_number, dict(params), ACTIVE, False)

    def _retire(self, proposal: Proposal, reason: str) -> None:
        with self._store.engine.begin() as connection:
            connection.execute(blueprint_proposals.update()
                               .where(blueprint_proposals.c.blueprint_id
                                      == proposal.spec.blueprint_id)
                               .values(status=RETIRED, status_reason=reason))
        log.info("retired proposed blueprint %s: %s", proposal.spec.name, reason)

    def mark_published(self, blueprint_ids: list[int]) -> None:
        with self._store.engine.begin() as connection:
            connection.execute(blueprint_proposals.update()
                               .where(blueprint_proposals.c.blueprint_id.in_(blueprint_ids))
                               .values(published_at=datetime.now(UTC)))


class _Worker(Protocol):
    async def run(self) -> None: ...

    def stop(self) -> None: ...


class BlueprintSearchLoop:
    """Every `interval_s`: one search round off the event loop, then every proposal not yet on
    the bus published to `stream` (BLUEPRINT_PROPOSALS; event id from the blueprint id, so a
    republish after a crash is deduplicated) and marked published."""

    def __init__(self, bus: Bus, search: BlueprintSearch, interval_s: float = 30.0,
                 sender_id: str = "karn", *, stream: str = BLUEPRINT_PROPOSALS) -> None:
        if not (interval_s > 0 and math.isfinite(interval_s)):
            raise ValueError("interval_s must be > 0")
        self._publisher = bus.publisher(sender_id)
        self.stream = stream
        self.search = search
        self.interval_s = interval_s
        self._stopping = asyncio.Event()

    async def round(self) -> list[Proposal]:
        """One round; returns the proposals it published."""
        await asyncio.to_thread(self.search.step)
        waiting = [p for p in await asyncio.to_thread(self.search.proposals)
                   if not p.published]
        for proposal in waiting:
            await self._publisher.publish(
                self.stream, proposal.message(),
                event_id=f"karn-blueprint-proposal-{proposal.spec.blueprint_id}")
        if waiting:
            await asyncio.to_thread(self.search.mark_published,
                                    [p.spec.blueprint_id for p in waiting])
        return waiting

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.round()
            except Exception:  # noqa: BLE001 - a failed round (database, bus) waits for the next
                log.exception("blueprint search round failed; retrying in %.0fs", self.interval_s)
            try:
                await asyncio.wait_for(self._stopping.wait(), self.interval_s)
            except TimeoutError:
                pass

    def stop(self) -> None:
        self._stopping.set()


class SearchingWorker:
    """A field-report worker and the search loop as one worker for `serve_until_stopped`: both
    run until `stop()`; the worker drains as before."""

    def __init__(self, worker: _Worker, search: BlueprintSearchLoop) -> None:
        self.worker, self.search = worker, search

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.search.run())
            await self.worker.run()
            self.search.stop()

    def stop(self) -> None:
        self.search.stop()
        self.worker.stop()
