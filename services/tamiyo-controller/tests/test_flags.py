"""The germination flags (TAMIYO_FLAGS=1) on a real Redis: `kasmina.grafting_strategy` and
`kasmina.blueprint_allow_list`, bucketed by job id, override TAMIYO_DEFAULT_STRATEGY and
TAMIYO_BLUEPRINTS once an operator sets them; an invalid value is logged once per change and
the setting stands. In process against a gRPC Karn, and in a real `python -m tamiyo`."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import redis
from oona import BusSettings, open_bus, streams
from oona.contracts import (
    Envelope,
    EpochEvent,
    EpochEventKind,
    Germinate,
    LifecycleCommand,
    catalog,
)
from oona.envelope import ENVELOPE_FIELD
from oona.flags import (
    BLUEPRINT_ALLOW_LIST,
    DEFAULT_FLAGS,
    GRAFTING_STRATEGY,
    FlagStore,
    RedisFlagProvider,
    bucket,
    sync_client,
)
from oona.proto.kasmina.karn.v1 import karn_service_pb2 as karn_pb
from oona.proto.kasmina.karn.v1 import karn_service_pb2_grpc as karn_grpc
from openfeature.evaluation_context import EvaluationContext
from tamiyo.blueprints import GerminationFlags, KarnAdvisor, parse_allow_list
from tamiyo.settings import TamiyoSettings
from tamiyo.store import job_key

STRATEGIES = dict(DEFAULT_FLAGS[GRAFTING_STRATEGY].variants)
KARNS_STRATEGY = "grad_norm_gated"  # what Karn's recommendations name, unlike any flag below


class RankingKarn(karn_grpc.KarnServicer):
    """A Karn whose Recommend ranks the built-in catalog in its order."""

    def Recommend(self, request, context):
        return karn_pb.RecommendResponse(recommendations=[
            karn_pb.Recommendation(blueprint=spec, strategy_name=KARNS_STRATEGY, score=0.5)
            for spec in catalog()][:request.limit])


@pytest.fixture
def karn_address() -> Iterator[str]:
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    karn_grpc.add_KarnServicer_to_server(RankingKarn(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


def _wait(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what()
        time.sleep(0.02)


def _seen(provider: RedisFlagProvider, flag: str, version: int) -> Callable[[], bool]:
    """Whether the provider's snapshot holds the flag at `version` (or later)."""
    def check() -> bool:
        details = provider.resolve_object_details(flag, None, EvaluationContext("probe"))
        return (details.flag_metadata or {}).get("version", -1) >= version
    return check


def test_flags_override_the_settings_per_job_and_invalid_values_are_ignored(
        private_redis_url, karn_address, caplog):
    caplog.set_level(logging.WARNING, logger="tamiyo.blueprints")
    settings = BusSettings.from_dsn(private_redis_url)
    store = FlagStore(sync_client(settings))
    provider = RedisFlagProvider(settings)
    flags = GerminationFlags.open(provider, "fixed_ramp")
    advisor = KarnAdvisor(karn_address, 5.0, default_blueprint="residual_mlp",
                          default_strategy="fixed_ramp", allowed=frozenset(), flags=flags)

    def choice(job: str) -> tuple[str, str]:
        chosen = advisor.choose(job, "fc", 24)
        return chosen.blueprint_name, chosen.strategy_name

    jobs = [f"job-{i}" for i in range(20)]
    inside = next(j for j in jobs if bucket("", GRAFTING_STRATEGY, j) < 50)
    outside = next(j for j in jobs if bucket("", GRAFTING_STRATEGY, j) >= 50)
    try:
        # Nobody has set the flags: Karn's first recommendation and strategy, as without flags.
        assert choice(inside) == choice(outside) == ("residual_mlp", KARNS_STRATEGY)
        # Half the jobs by bucket get the rollout variant; the others the default variant: a
        # flag once set decides the strategy of the jobs it serves, over Karn's.
        new = store.set(GRAFTING_STRATEGY, "op", rollout_variant="drift_controlled",
                        rollout_percent=50.0)
        _wait(_seen(provider, GRAFTING_STRATEGY, new.version), lambda: "flag never seen")
        assert choice(inside) == ("residual_mlp", "drift_controlled")
        assert choice(outside) == ("residual_mlp", "fixed_ramp")
        # The allow-list: Karn's best among the names (a string of them, as TAMIYO_BLUEPRINTS).
        new = store.set(BLUEPRINT_ALLOW_LIST, "op", variants={"all": ["*"],
                                                             "small": "linear, low_rank"},
                        rollout_variant="small", rollout_percent=100.0)
        _wait(_seen(provider, BLUEPRINT_ALLOW_LIST, new.version), lambda: "flag never seen")
        assert choice(inside) == ("low_rank", "drift_controlled")
        assert caplog.records == []
        # Invalid values: the settings stand (Karn's pick, any blueprint), one line per change.
        new = store.set(GRAFTING_STRATEGY, "op", variants=STRATEGIES | {"typo": "warp_ramp"},
                        rollout_variant="typo", rollout_percent=100.0)
        store.set(BLUEPRINT_ALLOW_LIST, "op", variants={"all": ["*"], "bad": "linear,nonesuch"},
                  rollout_variant="bad")
        _wait(_seen(provider, GRAFTING_STRATEGY, new.version), lambda: "flag never seen")
        _wait(_seen(provider, BLUEPRINT_ALLOW_LIST, new.version), lambda: "flag never seen")
        for job in (inside, outside, inside):
            assert choice(job) == ("residual_mlp", KARNS_STRATEGY)
        lines = [r.getMessage() for r in caplog.records]
        assert lines == [
            f"flag {BLUEPRINT_ALLOW_LIST}: value 'linear,nonesuch' ignored (nonesuch not in the "
            "catalog); the setting stands",
            f"flag {GRAFTING_STRATEGY}: value 'warp_ramp' ignored (not a known strategy "
            "(drift_controlled, fixed_ramp, grad_norm_gated, performance_linked)); the setting "
            "stands"], lines
        new = store.set(GRAFTING_STRATEGY, "op", salt="again")  # a change: logged once more
        _wait(_seen(provider, GRAFTING_STRATEGY, new.version), lambda: "flag never seen")
        choice(inside)
        choice(inside)
        assert sum("warp_ramp" in r.getMessage() for r in caplog.records) == 2
    finally:
        advisor.close()
        flags.close()
        store.client.close()


def test_allow_lists_parse_like_the_setting():
    assert parse_allow_list("") == parse_allow_list("*") == parse_allow_list(["*"]) == frozenset()
    assert parse_allow_list(" linear, ,low_rank ") == {"linear", "low_rank"}
    assert parse_allow_list(["linear"]) == {"linear"}


def test_flags_are_off_unless_turned_on():
    assert TamiyoSettings.from_env({}).flags == 0
    assert TamiyoSettings.from_env({"TAMIYO_FLAGS": "1"}).flags == 1


# ------------------------------------------------------------ a real `python -m tamiyo`

JOB = "job-flagged"


@pytest.fixture
def tamiyo(start_tamiyo) -> Iterator[Path]:  # noqa: ANN001
    # Every epoch after the first is a plateau; one germination per epoch.
    process, _, log = start_tamiyo(
        TAMIYO_PLATEAU_EPOCHS="1", TAMIYO_MAX_ACTIVE_SEEDS="8", TAMIYO_ACK_TIMEOUT_S="600",
        TAMIYO_CONSUMER_NAME="tamiyo-flags", TAMIYO_FLAGS="1")
    yield log
    assert process.poll() is None, log.read_text()


def _publish(url: str, messages) -> None:
    async def body() -> None:
        async with open_bus(BusSettings.from_dsn(url)) as bus:
            await bus.publisher("kasmina-test").publish_many(messages)

    asyncio.run(body())


def _germinations(client: redis.Redis) -> dict[int, LifecycleCommand]:
    """The job's Germinate commands by the epoch they are due at."""
    commands = [LifecycleCommand.FromString(Envelope.FromString(f[ENVELOPE_FIELD]).payload)
                for _, f in client.xrange(streams.commands(JOB))]
    return {c.apply_at_epoch: c for c in commands if c.WhichOneof("action") == "germinate"}


def test_a_flag_changes_the_next_boundarys_germination_in_a_running_tamiyo(
        tamiyo, private_redis_url, report, epoch_ended):
    log = tamiyo
    client = redis.Redis.from_url(private_redis_url)
    store = FlagStore(sync_client(BusSettings.from_dsn(private_redis_url)))
    _publish(private_redis_url, [(streams.EPOCH_EVENTS, EpochEvent(
        job_id=JOB, kind=EpochEventKind.EPOCH_EVENT_KIND_JOB_STARTED, epoch=0))])

    def decide(epoch: int) -> Germinate | None:
        """Publish the epoch's report and end; Tamiyo's Germinate for it, once decided."""
        _publish(private_redis_url, [
            (streams.TELEMETRY_SEED_HEALTH, report(job=JOB, layer="fc1", epoch=epoch,
                                                   num_seeds=8)),
            (streams.EPOCH_EVENTS, epoch_ended(epoch, 0.5, job=JOB))])
        _wait(lambda: _decided(client) >= epoch,
              lambda: f"epoch {epoch} not decided:\n{log.read_text()}")
        command = _germinations(client).get(epoch + 1)
        return command.germinate if command is not None else None

    def changed(flag: str, *, before: int) -> None:
        """Wait until Tamiyo has logged a change of `flag` after the `before` it had."""
        _wait(lambda: _changes(log, flag) > before,
              lambda: f"{flag} change not seen:\n{log.read_text()}")

    assert decide(0) is None  # the first epoch sets the best: no plateau yet
    first = decide(1)  # flags unset: the settings
    assert (first.blueprint_name, first.strategy_name) == ("residual_mlp", "fixed_ramp")

    before = _changes(log, GRAFTING_STRATEGY), _changes(log, BLUEPRINT_ALLOW_LIST)
    store.set(GRAFTING_STRATEGY, "op", rollout_variant="drift_controlled", rollout_percent=100.0)
    store.set(BLUEPRINT_ALLOW_LIST, "op", variants={"all": ["*"], "lr": "low_rank"},
              rollout_variant="lr", rollout_percent=100.0)
    changed(GRAFTING_STRATEGY, before=before[0])
    changed(BLUEPRINT_ALLOW_LIST, before=before[1])
    flagged = decide(2)  # the next boundary: the flags' strategy and blueprint
    assert (flagged.blueprint_name, flagged.strategy_name) == ("low_rank", "drift_controlled")

    before = _changes(log, GRAFTING_STRATEGY), 0
    store.set(GRAFTING_STRATEGY, "op", variants=STRATEGIES | {"typo": "drift-controlled"},
              rollout_variant="typo")
    changed(GRAFTING_STRATEGY, before=before[0])
    for epoch in (3, 4):  # an invalid strategy: the setting's, logged once
        germinate = decide(epoch)
        assert (germinate.blueprint_name, germinate.strategy_name) == ("low_rank",
                                                                       "fixed_ramp")
    text = log.read_text()
    assert text.count(f"flag {GRAFTING_STRATEGY}: value 'drift-controlled' ignored") == 1, text
    store.client.close()
    client.close()


def _decided(client: redis.Redis) -> int:
    state = client.hget(job_key(JOB), "state")
    return -1 if state is None else json.loads(state)["last_decided_epoch"]


def _changes(log: Path, flag: str) -> int:
    return sum(1 for line in log.read_text().splitlines()
               if "flags changed:" in line and flag in line)
