"""Feature flags (oona.flags, oona.flags_cli) against a real Redis: evaluation through the
OpenFeature client, bucketing, propagation, restart, kill switch, audit, ramp, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis
from oona.flags import (
    DEFAULT_FLAGS,
    EXECUTION_PATH,
    TELEMETRY_LEVEL,
    FlagDefinition,
    FlagKeys,
    FlagStore,
    InvalidFlag,
    RedisFlagProvider,
    UnknownFlag,
    bucket,
    ramp,
    ramp_schedule,
    sync_client,
)
from oona.settings import BusSettings
from openfeature import api
from openfeature.client import OpenFeatureClient
from openfeature.evaluation_context import EvaluationContext
from openfeature.event import EventDetails, ProviderEvent
from openfeature.exception import ErrorCode
from openfeature.flag_evaluation import Reason

JOBS = [f"job-{i:05d}" for i in range(10_000)]
# Binomial sd of a share over 10,000 jobs is at most 0.5 %: ±1.5 % is three of them.
SHARE_TOLERANCE = 1.5


@pytest.fixture
def keys(redis_url: str) -> Iterator[FlagKeys]:
    keys = FlagKeys(f"test-{uuid.uuid4().hex[:12]}")
    yield keys
    with redis.Redis.from_url(redis_url) as client:
        client.delete(keys.definitions, keys.changes, keys.audit)


@pytest.fixture
def store(settings: BusSettings, keys: FlagKeys) -> Iterator[FlagStore]:
    client = sync_client(settings)
    yield FlagStore(client, keys)
    client.close()


OpenClient = Callable[[], tuple[OpenFeatureClient, RedisFlagProvider]]


@pytest.fixture
def open_client(settings: BusSettings, keys: FlagKeys) -> Iterator[OpenClient]:
    """Opens OpenFeature clients, each with its own provider (its own connection and watcher
    thread, as in another process); all shut down afterwards."""
    def open_one() -> tuple[OpenFeatureClient, RedisFlagProvider]:
        provider = RedisFlagProvider(settings, keys)
        domain = f"test-{uuid.uuid4().hex[:8]}"
        api.set_provider_and_wait(provider, domain)
        return api.get_client(domain), provider

    yield open_one
    api.clear_providers()


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> float:
    """Seconds until `condition` held; AssertionError after `timeout`."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not reached within {timeout} s")
        time.sleep(0.005)
    return time.monotonic() - start


def path_of(client: OpenFeatureClient, job: str) -> str:
    return client.get_string_value(EXECUTION_PATH, "unset", EvaluationContext(job))


def seen_version(client: OpenFeatureClient, version: int) -> Callable[[], bool]:
    return lambda: client.get_string_details(EXECUTION_PATH, "unset", EvaluationContext(
        "probe")).flag_metadata.get("version") == version


def test_built_in_defaults_then_stored_state_through_the_client(store, open_client):
    client, _ = open_client()
    details = client.get_string_details(EXECUTION_PATH, "unset", EvaluationContext("job-1"))
    assert (details.value, details.variant, details.reason) == ("legacy", "legacy",
                                                                Reason.DEFAULT)
    assert client.get_string_value(TELEMETRY_LEVEL, "unset", EvaluationContext("j")) == "full"
    assert client.get_object_value("kasmina.blueprint_allow_list", [],
                                   EvaluationContext("j")) == ["*"]
    assert client.get_string_value("kasmina.grafting_strategy", "unset") == "fixed_ramp"

    written = store.set(EXECUTION_PATH, "tester", rollout_percent=100.0)
    wait_until(seen_version(client, written.version))
    details = client.get_string_details(EXECUTION_PATH, "unset", EvaluationContext("job-1"))
    assert (details.value, details.reason) == ("chunked", Reason.STATIC)
    assert details.flag_metadata == {"version": 1, "rollout_percent": 100.0, "source": "redis"}


def test_errors_give_the_callers_default(store, open_client, redis_url, keys):
    client, provider = open_client()
    missing = client.get_string_details("no.such.flag", "mine", EvaluationContext("j"))
    assert (missing.value, missing.error_code) == ("mine", ErrorCode.FLAG_NOT_FOUND)
    wrong_type = client.get_boolean_details(EXECUTION_PATH, True, EvaluationContext("j"))
    assert (wrong_type.value, wrong_type.error_code) == (True, ErrorCode.TYPE_MISMATCH)

    written = store.set(EXECUTION_PATH, "tester", rollout_percent=50.0)
    wait_until(seen_version(client, written.version))
    no_job = client.get_string_details(EXECUTION_PATH, "mine")  # a split needs the job id
    assert (no_job.value, no_job.error_code) == ("mine", ErrorCode.TARGETING_KEY_MISSING)

    with redis.Redis.from_url(redis_url) as raw:  # one unreadable flag, the others still served
        raw.hset(keys.definitions, TELEMETRY_LEVEL, "{not json")
        raw.xadd(keys.changes, {"flag": TELEMETRY_LEVEL})
    wait_until(lambda: client.get_string_details(TELEMETRY_LEVEL, "mine").error_code
               == ErrorCode.PARSE_ERROR)
    assert path_of(client, "job-1") in ("legacy", "chunked")


def test_invalid_changes_are_refused_and_nothing_is_written(store):
    with pytest.raises(InvalidFlag, match=r"\[0, 100\]"):
        store.set(EXECUTION_PATH, "tester", rollout_percent=150.0)
    with pytest.raises(InvalidFlag, match="not one of"):
        store.set(EXECUTION_PATH, "tester", default_variant="fast")
    with pytest.raises(UnknownFlag):
        store.set("no.such.flag", "tester", rollout_percent=5.0)
    assert store.get(EXECUTION_PATH) == DEFAULT_FLAGS[EXECUTION_PATH]
    assert store.audit() == []


def test_buckets_are_sticky_and_monotone_over_10000_jobs(store, open_client):
    client, _ = open_client()
    previous: set[str] = set()
    for percent in (5.0, 15.0, 30.0, 50.0, 95.0):
        written = store.set(EXECUTION_PATH, "tester", rollout_percent=percent)
        wait_until(seen_version(client, written.version))
        canary = {job for job in JOBS if path_of(client, job) == "chunked"}
        assert abs(100 * len(canary) / len(JOBS) - percent) <= SHARE_TOLERANCE, percent
        assert previous <= canary, f"jobs left the rollout when it grew to {percent} %"
        again = {job for job in JOBS[:2000] if path_of(client, job) == "chunked"}
        assert again == canary & set(JOBS[:2000])  # sticky: the same answer every time
        previous = canary
    # and back down: a job out at 30 % was out at 50 % (the same buckets, read the other way)
    written = store.set(EXECUTION_PATH, "tester", rollout_percent=30.0)
    wait_until(seen_version(client, written.version))
    assert {job for job in JOBS if path_of(client, job) == "chunked"} <= previous


def test_bucket_is_flagds_fractional_hash():
    # flagd: int32(murmur3_32(flagKey + targetingKey)), |h| / MaxInt32 * 100. murmur3_32 of
    # "hello" with seed 0 is 0x248bfa47 (the published test vector).
    assert bucket("", "hel", "lo") == pytest.approx(0x248BFA47 / 2147483647 * 100)
    assert bucket("", "hel", "lo") == bucket("h", "e", "llo")  # the input is the concatenation


def test_each_flag_and_salt_picks_its_own_canary_jobs(store, open_client):
    client, _ = open_client()
    other = "kasmina.test_other"
    store.set(other, "tester", variants={"off": False, "on": True}, default_variant="off",
              rollout_variant="on", rollout_percent=30.0)
    written = store.set(EXECUTION_PATH, "tester", rollout_percent=30.0)
    wait_until(seen_version(client, written.version))

    def canary_of_path() -> set[str]:
        return {job for job in JOBS if path_of(client, job) == "chunked"}

    path_canary = canary_of_path()
    other_canary = {job for job in JOBS
                    if client.get_boolean_value(other, False, EvaluationContext(job))}
    # Independent buckets: 30 % of 30 % = 9 % of jobs in both; the same buckets would be 30 %.
    both = 100 * len(path_canary & other_canary) / len(JOBS)
    assert abs(both - 9.0) <= SHARE_TOLERANCE

    written = store.set(EXECUTION_PATH, "tester", salt="reshuffle-1")
    wait_until(seen_version(client, written.version))
    reshuffled = canary_of_path()
    assert abs(100 * len(reshuffled) / len(JOBS) - 30.0) <= SHARE_TOLERANCE
    assert abs(100 * len(reshuffled & path_canary) / len(JOBS) - 9.0) <= SHARE_TOLERANCE


def test_a_second_client_sees_a_change_within_a_second(store, open_client):
    first, _ = open_client()
    second, _ = open_client()
    changed = threading.Event()
    flags_changed: list[list[str]] = []

    def on_change(details: EventDetails) -> None:
        flags_changed.append(list(details.flags_changed or ()))
        changed.set()

    second.add_handler(ProviderEvent.PROVIDER_CONFIGURATION_CHANGED, on_change)
    assert path_of(first, "job-1") == path_of(second, "job-1") == "legacy"
    start = time.monotonic()
    store.set(EXECUTION_PATH, "tester", rollout_percent=100.0)
    for client in (second, first):
        wait_until(lambda c=client: path_of(c, "job-1") == "chunked")
        assert time.monotonic() - start < 1.0
    assert changed.wait(1.0) and [EXECUTION_PATH] in flags_changed


def test_a_restarted_process_reads_the_current_state(store, open_client):
    store.set(EXECUTION_PATH, "tester", rollout_percent=100.0)
    store.kill(TELEMETRY_LEVEL, "tester")
    client, _ = open_client()  # a fresh provider: no change notification to wait for
    assert path_of(client, "job-1") == "chunked"
    assert client.get_string_details(TELEMETRY_LEVEL, "x").reason == Reason.DISABLED


def test_a_broker_outage_serves_the_last_state_then_catches_up(oona_restartable_broker, keys):
    settings = BusSettings.from_dsn(oona_restartable_broker.url, connect_attempts=2)
    writer = sync_client(settings)
    store = FlagStore(writer, keys)
    provider = RedisFlagProvider(settings, keys)
    api.set_provider_and_wait(provider, "outage")
    client = api.get_client("outage")
    stale, ready = threading.Event(), threading.Event()
    client.add_handler(ProviderEvent.PROVIDER_STALE, lambda _d: stale.set())
    client.add_handler(ProviderEvent.PROVIDER_READY, lambda _d: ready.set())
    try:
        store.set(EXECUTION_PATH, "tester", rollout_percent=100.0)
        wait_until(lambda: path_of(client, "job-1") == "chunked")
        ready.clear()
        oona_restartable_broker.stop()
        assert stale.wait(10)
        assert path_of(client, "job-1") == "chunked"  # the last state, not the default
        oona_restartable_broker.start()
        assert ready.wait(10)
        store.kill(EXECUTION_PATH, "oncall")  # the writer's client reconnects by itself
        wait_until(lambda: path_of(client, "job-1") == "legacy")
    finally:
        api.clear_providers()
        writer.close()


def test_a_refused_key_is_reported_not_swallowed(open_client, redis_url, keys):
    client, _ = open_client()
    failed = threading.Event()
    client.add_handler(ProviderEvent.PROVIDER_ERROR, lambda _d: failed.set())
    with redis.Redis.from_url(redis_url) as raw:
        raw.delete(keys.changes)
        raw.set(keys.changes, "not a stream")  # XREAD: WRONGTYPE
    assert failed.wait(5)
    assert path_of(client, "job-1") == "legacy"  # still served from the last state


def test_the_kill_switch_sends_every_job_to_the_default_variant(store, open_client):
    client, _ = open_client()
    store.set(EXECUTION_PATH, "tester", rollout_percent=100.0)
    wait_until(lambda: path_of(client, "job-1") == "chunked")
    killed = store.kill(EXECUTION_PATH, "oncall", "regression")
    wait_until(seen_version(client, killed.version))
    details = [client.get_string_details(EXECUTION_PATH, "x", EvaluationContext(job))
               for job in JOBS[:1000]]
    assert {(d.value, d.reason) for d in details} == {("legacy", Reason.DISABLED)}
    released = store.kill(EXECUTION_PATH, "oncall", release=True)
    wait_until(seen_version(client, released.version))
    assert {path_of(client, job) for job in JOBS[:1000]} == {"chunked"}


def test_every_change_is_audited(store):
    before = time.time()
    store.set(EXECUTION_PATH, "alice", rollout_percent=5.0)
    ramp(store, EXECUTION_PATH, "ramp-bot", step_s=0.0, target=15.0, sleep=lambda _s: None)
    store.kill(EXECUTION_PATH, "bob", "step time +30 %")
    entries = store.audit(EXECUTION_PATH)
    assert [(e.action, e.who) for e in entries] == [
        ("set", "alice"), ("ramp", "ramp-bot"), ("ramp-done", "ramp-bot"), ("kill", "bob")]
    assert entries[0].old is None and entries[0].new.rollout_percent == 5.0
    assert (entries[1].old.rollout_percent, entries[1].new.rollout_percent) == (5.0, 15.0)
    assert entries[2].new.rollout_percent == 15.0  # the completion changes nothing
    assert not entries[3].old.killed and entries[3].new.killed
    assert entries[3].reason == "step time +30 %"
    assert [e.new.version for e in entries] == [1, 2, 3, 4]
    assert all(before - 1 <= e.when <= time.time() + 1 for e in entries)

    for i in range(600):  # more than a page of another flag's entries on top
        store.set(TELEMETRY_LEVEL, "carol", salt=str(i))
    assert [e.action for e in store.audit(EXECUTION_PATH)] == ["set", "ramp", "ramp-done",
                                                                "kill"]
    assert [e.new.salt for e in store.audit(count=2)] == ["598", "599"]


def test_ramp_schedule():
    assert ramp_schedule(0.0) == [5, 15, 25, 35, 45, 55, 65, 75, 85, 95, 100]
    assert ramp_schedule(25.0) == [35, 45, 55, 65, 75, 85, 95, 100]
    assert ramp_schedule(100.0) == []


def test_ramp_steps_until_the_guard_says_stop(store):
    waits: list[float] = []
    asked: list[float] = []

    def guard(definition: FlagDefinition) -> str | None:
        asked.append(definition.rollout_percent)
        return "rollback rate over target" if definition.rollout_percent >= 25 else None

    outcome = ramp(store, EXECUTION_PATH, "ramp-bot", step_s=604800.0, guard=guard,
                   sleep=waits.append)
    assert (outcome.completed, outcome.percent, tuple(outcome.steps)) == (False, 25.0,
                                                                          (5.0, 15.0, 25.0))
    assert outcome.halted_reason == "rollback rate over target"
    assert asked == [0.0, 5.0, 15.0, 25.0] and waits == [604800.0] * 3
    assert store.get(EXECUTION_PATH).rollout_percent == 25.0
    assert store.audit(EXECUTION_PATH)[-1].action == "ramp-halt"

    done = ramp(store, EXECUTION_PATH, "ramp-bot", step_s=0.0, sleep=lambda _s: None)
    assert done.completed and done.steps[0] == 35.0 and done.percent == 100.0


def test_ramp_halts_when_killed_or_changed_by_someone_else(store):
    def kill_after_15(seconds: float) -> None:
        if store.get(EXECUTION_PATH).rollout_percent == 15.0:
            store.kill(EXECUTION_PATH, "oncall")

    outcome = ramp(store, EXECUTION_PATH, "ramp-bot", step_s=0.0, sleep=kill_after_15)
    assert (outcome.completed, outcome.percent, outcome.halted_reason) == (False, 15.0, "killed")

    store.kill(EXECUTION_PATH, "oncall", release=True)
    outcome = ramp(store, EXECUTION_PATH, "ramp-bot", step_s=0.0, sleep=lambda _s: store.set(
        EXECUTION_PATH, "alice", rollout_percent=50.0))
    assert not outcome.completed and "someone else" in outcome.halted_reason


def test_ramp_states_follow_the_last_ramp_of_each_flag(store):
    flags = [EXECUTION_PATH, TELEMETRY_LEVEL]
    assert store.ramp_states(flags) == {EXECUTION_PATH: "idle", TELEMETRY_LEVEL: "idle"}
    seen: list[str] = []
    ramp(store, EXECUTION_PATH, "ramp-bot", step_s=0.0, target=25.0,
         sleep=lambda _s: seen.append(store.ramp_states(flags)[EXECUTION_PATH]))
    assert seen == ["ramping", "ramping"]
    assert store.ramp_states(flags)[EXECUTION_PATH] == "completed"
    store.set(EXECUTION_PATH, "alice", rollout_percent=0.0)
    ramp(store, EXECUTION_PATH, "ramp-bot", step_s=0.0, guard=lambda d: (
        "regression" if d.rollout_percent >= 5 else None), sleep=lambda _s: None)
    for i in range(600):  # more than a page of another flag's entries on top
        store.set(TELEMETRY_LEVEL, "carol", salt=str(i))
    assert store.ramp_states(flags) == {EXECUTION_PATH: "halted", TELEMETRY_LEVEL: "idle"}


def test_ramp_sets_the_off_and_on_variants_it_is_given(store):
    store.set(EXECUTION_PATH, "alice", default_variant="chunked", rollout_variant="legacy")
    outcome = ramp(store, EXECUTION_PATH, "ramp-bot", step_s=0.0, target=5.0,
                   off_variant="legacy", on_variant="chunked", sleep=lambda _s: None)
    current = store.get(EXECUTION_PATH)
    assert outcome.completed and (current.default_variant, current.rollout_variant,
                                  current.rollout_percent) == ("legacy", "chunked", 5.0)
    assert store.kill(EXECUTION_PATH, "oncall").default_variant == "legacy"  # kill -> legacy
    store.kill(EXECUTION_PATH, "oncall", release=True)
    with pytest.raises(InvalidFlag, match="set its percentage to 0"):  # would move its jobs
        ramp(store, EXECUTION_PATH, "ramp-bot", step_s=0.0, off_variant="chunked",
             on_variant="legacy", sleep=lambda _s: None)
    store.set(EXECUTION_PATH, "alice", rollout_percent=0.0)
    with pytest.raises(InvalidFlag, match="not one of"):
        ramp(store, EXECUTION_PATH, "ramp-bot", step_s=0.0, on_variant="turbo",
             sleep=lambda _s: None)
    assert store.get(EXECUTION_PATH).rollout_variant == "chunked"  # nothing written


def test_the_execution_paths_off_variant_is_legacy():
    # The safe side (docs/migration.md): a job that follows the flag runs legacy until a rollout
    # puts it in, and while the flag is killed; chunked is KasminaConfig's default.
    built_in = DEFAULT_FLAGS[EXECUTION_PATH]
    assert (built_in.default_variant, built_in.rollout_variant) == ("legacy", "chunked")
    assert built_in.variant_for("job-1", EXECUTION_PATH)[0] == "legacy"


# ---------------------------------------------------------------- the CLI, as a subprocess
def flags_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "oona", "flags", *args], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def test_cli_help_and_missing_url_need_no_environment():
    bare = {"PATH": os.environ.get("PATH", "")}
    helped = flags_cli("--help", env=bare)
    assert helped.returncode == 0 and "ramp" in helped.stdout
    missing = flags_cli("list", env=bare)
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.count("\n") == 1 and "OONA_REDIS_URL" in missing.stderr


def test_cli_commands(redis_url, keys, store):
    env = os.environ | {"OONA_REDIS_URL": redis_url}
    base = ("--namespace", keys.namespace, "--actor", "cli-test")

    listed = flags_cli(*base, "list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert sum(flag in listed.stdout for flag in DEFAULT_FLAGS) == len(DEFAULT_FLAGS)

    assert flags_cli(*base, "set", EXECUTION_PATH, "--percent", "5", env=env).returncode == 0
    got = flags_cli(*base, "get", EXECUTION_PATH, env=env)
    assert FlagDefinition.from_json(got.stdout).rollout_percent == 5.0

    added = flags_cli(*base, "set", TELEMETRY_LEVEL, "--variant", "off=none", "--variant",
                      "every=4", env=env)
    assert added.returncode == 0, added.stderr
    assert dict(store.get(TELEMETRY_LEVEL).variants) == {"full": "full", "sampled": "sampled",
                                                          "off": "none", "every": 4}

    bad = flags_cli(*base, "set", EXECUTION_PATH, "--percent", "101", env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ")

    # the guard fails once the rollout stands at 15 %: the ramp goes 5 -> 15 and halts there
    guard = (f"{sys.executable} -c \"import os, sys; "
             f"sys.exit(float(os.environ['OONA_FLAG_PERCENT']) >= 15)\"")
    ramped = flags_cli(*base, "ramp", EXECUTION_PATH, "--step-s", "0.01", "--guard-cmd", guard,
                       env=env)
    assert ramped.returncode == 3, ramped.stderr
    assert "halted at 15 %" in ramped.stdout
    assert store.get(EXECUTION_PATH).rollout_percent == 15.0

    assert flags_cli(*base, "kill", EXECUTION_PATH, "--reason", "drill", env=env).returncode == 0
    assert store.get(EXECUTION_PATH).killed
    audit = flags_cli(*base, "audit", EXECUTION_PATH, env=env)
    actions = [line.split()[2] for line in audit.stdout.splitlines()]
    assert actions == ["set", "ramp", "ramp-halt", "kill"]
    assert all("cli-test" in line for line in audit.stdout.splitlines())
    assert audit.stdout.rstrip().endswith("drill")
