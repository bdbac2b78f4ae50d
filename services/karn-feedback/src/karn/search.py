"""Karn proposes blueprints: an ask-and-tell search over a catalog entry's hyper-parameters.

For each parent (a built-in blueprint whose kind has a size), an Optuna study (TPE sampler) asks
for a hidden width or rank, a grafting ramp length and a seed learning rate; the spec it asks for
is recorded in the database (karn_blueprints, so ListBlueprints and Recommend see it, and
karn_blueprint_proposals, its provenance) and published on the bus. Field reports that name it
tell the study how it did, with the recommender's reward: the posterior mean of success
(fossilized with a positive contribution). A proposal whose reward stays below `retire_below`
once it has `reports_per_trial` reports is retired: the recommender stops offering it, and the
search never asks for it again.

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

from karn.database import blueprint_proposals, blueprints, spec_from_row, spec_row
from karn.recommender import posterior_mean
from karn.store import FieldReportStore

log = logging.getLogger(__name__)

PROPOSER = "optuna-tpe"
# The stream proposals go out on (DESIGN §4 names no other for them).
BLUEPRINT_PROPOSALS = streams.BLUEPRINT_PROPOSALS
ACTIVE, RETIRED = "active", "retired"
# Asking again for a spec the study already holds (integer sizes collide) is retried this often.
_ASK_ATTEMPTS = 8


@dataclass(frozen=True)
class SearchConfig:
    """What the search varies, within which bounds, and how outcomes steer it."""

    # A trial is told its value once its spec has this many field reports.
    reports_per_trial: int = 4
    # Proposals of one parent waiting for outcomes at a time; no new one past this.
    max_pending: int = 2
    # Retired once it has reports_per_trial reports with a reward below this. With the Beta(1, 1)
    # prior, 0.25 retires 4 failures in 4 (1/6) and keeps 1 success in 4 (1/3).
    retire_below: float = 0.25
    # Random trials before TPE models the outcomes (Optuna's n_startup_trials).
    startup_trials: int = 4
    # None: a fresh seed per process.
    seed: int | None = None
    hidden: tuple[int, int] = (4, 512)
    rank: tuple[int, int] = (1, 64)
    ramp_steps: tuple[int, int] = (5, 200)
    seed_learning_rate: tuple[float, float] = (1e-4, 1e-1)

    def __post_init__(self) -> None:
        if self.reports_per_trial < 1 or self.max_pending < 1 or self.startup_trials < 0:
            raise ValueError("need reports_per_trial >= 1, max_pending >= 1, "
                             "startup_trials >= 0")
        if not 0 <= self.retire_below <= 1:
            raise ValueError("retire_below must be in [0, 1]")
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
        space["hidden"] = IntDistribution(*config.hidden, log=True)
    if BlueprintDim.BLUEPRINT_DIM_RANK in dims:
        space["rank"] = IntDistribution(*config.rank, log=True)
    space["ramp_steps"] = IntDistribution(*config.ramp_steps, log=True)
    space["seed_learning_rate"] = FloatDistribution(*config.seed_learning_rate, log=True)
    return space


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
        proposals = self.proposals()
        for proposal in proposals:
            stat = stats.get(proposal.spec.blueprint_id)
            if (proposal.status == ACTIVE and stat is not None
                    and stat.reports >= self.config.reports_per_trial):
                reward = posterior_mean(stat.successes, stat.reports)
                if reward < self.config.retire_below:
                    self._retire(proposal, f"reward {reward:.2f} < {self.config.retire_below} "
                                           f"after {stat.reports} reports")
        new = []
        for parent in self.parents:
            mine = [p for p in proposals if p.parent_blueprint_id == parent.blueprint_id]
            pending = [p for p in mine if p.status == ACTIVE
                       and self._reports(stats, p) < self.config.reports_per_trial]
            if len(pending) >= self.config.max_pending:
                continue
            proposal = self._propose(parent, mine, stats)
            if proposal is not None:
                new.append(proposal)
        return new

    def _reports(self, stats: dict[int, Any], proposal: Proposal) -> int:
        stat = stats.get(proposal.spec.blueprint_id)
        return stat.reports if stat is not None else 0

    def _propose(self, parent: BlueprintSpec, mine: list[Proposal],
                 stats: dict[int, Any]) -> Proposal | None:
        space = search_space(parent, self.config)
        study = self._study(parent, len(mine))
        seen = set()
        for proposal in mine:  # tell the study everything the reports say so far
            stat = stats.get(proposal.spec.blueprint_id)
            params = {k: v for k, v in proposal.params.items() if k in space}
            seen.add(tuple(sorted(params.items())))
            if stat is not None and stat.reports >= self.config.reports_per_trial:
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
