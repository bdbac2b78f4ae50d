"""Feature flags of the fleet (DESIGN §9): an OpenFeature provider whose flags live in Redis.

State: one hash (flag key -> JSON `FlagDefinition`), so a restarted process reads the current
state. Every change is one script that rewrites the hash field and appends to a change stream
(what readers block on, so they see it at once; they re-read the hash at least every 0.5 s
anyway) and to an audit stream (who, when, flag, action, old, new). The braces in the key names
put the three keys on one Redis Cluster slot, so a change stays one atomic script there too.

Bucketing is flagd's `fractional`: murmur3 (x86, 32 bit, seed 0) of salt + flag key + targeting
key (the job id), as a signed int32, |h| / (2**31 - 1) * 100 -> [0, 100]; a job gets the rollout
variant when its bucket is below the rollout percentage. With an empty salt that is flagd's own
input (flag key + targeting key). The bucket does not depend on the percentage, so assignment is
sticky and monotone (a job in at 30 % is in at 50 %), and the flag key makes each flag pick its
own canary jobs; a new salt reshuffles them. The kill switch serves the default variant to all.

    provider = RedisFlagProvider(BusSettings.from_env())
    openfeature.api.set_provider_and_wait(provider)
    client = openfeature.api.get_client()
    path = client.get_string_value(EXECUTION_PATH, "legacy", EvaluationContext(job_id))
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import mmh3
import redis
from openfeature.evaluation_context import EvaluationContext
from openfeature.event import ProviderEventDetails
from openfeature.exception import ErrorCode
from openfeature.flag_evaluation import FlagResolutionDetails, Reason
from openfeature.provider import AbstractProvider, Metadata

from oona.errors import BusUnavailable
from oona.settings import BusSettings

log = logging.getLogger(__name__)

EXECUTION_PATH = "kasmina.execution_path"
GRAFTING_STRATEGY = "kasmina.grafting_strategy"
BLUEPRINT_ALLOW_LIST = "kasmina.blueprint_allow_list"
TELEMETRY_LEVEL = "kasmina.telemetry_level"

# Readers re-read the hash at least this often, notification or not (the bound: 1 s).
POLL_S = 0.5
# The change stream only wakes readers (the hash is the state): a short cap is enough.
CHANGES_MAXLEN = 10_000
RAMP_START = 5.0
RAMP_INCREMENT = 10.0


# What a flag's last ramp did (FlagStore.ramp_states), by its audit action.
RAMP_STATES = ("idle", "ramping", "halted", "completed")
_RAMP_ACTIONS = {"ramp": "ramping", "ramp-halt": "halted", "ramp-done": "completed"}


class InvalidFlag(ValueError):
    """A flag definition that cannot be served (unknown variant, percentage out of range...)."""


class UnknownFlag(KeyError):
    """No flag of that key, neither in Redis nor among the built-in DEFAULT_FLAGS."""


class ConcurrentFlagChange(RuntimeError):
    """Another writer kept changing the flag while this change was retried."""


@dataclass(frozen=True)
class FlagDefinition:
    """One flag. `rollout_variant` goes to `rollout_percent` % of jobs (by bucket), the
    `default_variant` to the rest and to everyone while `killed`."""

    variants: Mapping[str, Any]
    default_variant: str
    rollout_variant: str | None = None
    rollout_percent: float = 0.0
    salt: str = ""
    killed: bool = False
    version: int = 0

    def __post_init__(self) -> None:
        if not self.variants:
            raise InvalidFlag("a flag needs at least one variant")
        if self.default_variant not in self.variants:
            raise InvalidFlag(f"default variant {self.default_variant!r} is not one of "
                              f"{sorted(self.variants)}")
        if self.rollout_variant is not None and self.rollout_variant not in self.variants:
            raise InvalidFlag(f"rollout variant {self.rollout_variant!r} is not one of "
                              f"{sorted(self.variants)}")
        if not (math.isfinite(self.rollout_percent) and 0.0 <= self.rollout_percent <= 100.0):
            raise InvalidFlag(f"rollout percentage must be in [0, 100], got "
                              f"{self.rollout_percent}")
        if self.version < 0:
            raise InvalidFlag("version must be >= 0")

    def to_json(self) -> str:
        return json.dumps(asdict(self) | {"variants": dict(self.variants)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> FlagDefinition:
        try:
            data = json.loads(text)
            return cls(variants=data["variants"], default_variant=data["default_variant"],
                       rollout_variant=data.get("rollout_variant"),
                       rollout_percent=float(data.get("rollout_percent", 0.0)),
                       salt=str(data.get("salt", "")), killed=bool(data.get("killed", False)),
                       version=int(data.get("version", 0)))
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidFlag(f"unreadable flag definition: {exc}") from None

    def variant_for(self, targeting_key: str | None, flag_key: str) -> tuple[str, str]:
        """(variant, reason) for one job; ValueError when a split needs a missing key."""
        if self.killed:
            return self.default_variant, Reason.DISABLED
        if self.rollout_variant is None or self.rollout_percent <= 0.0:
            return self.default_variant, Reason.STATIC
        if self.rollout_percent >= 100.0:  # |int32 min| / (2**31 - 1) lands just above 100
            return self.rollout_variant, Reason.STATIC
        if not targeting_key:
            raise ValueError("targeting_key (the job id) is needed while a rollout is partial")
        in_rollout = bucket(self.salt, flag_key, targeting_key) < self.rollout_percent
        return (self.rollout_variant if in_rollout else self.default_variant), Reason.SPLIT


def bucket(salt: str, flag_key: str, targeting_key: str) -> float:
    """flagd's fractional bucket of a job for a flag, in [0, 100]."""
    return abs(mmh3.hash(f"{salt}{flag_key}{targeting_key}", 0, signed=True)) / 2147483647 * 100


# The flags of DESIGN §9 and what a job gets before anyone sets them: the one home of these
# defaults. The execution path's off (default) variant is legacy, the safe side: what a job
# that follows the flag gets before a rollout, while killed and after a wiped Redis. A job that
# does not follow it runs its KasminaConfig.execution_path, chunked by default (DESIGN §9).
DEFAULT_FLAGS: Mapping[str, FlagDefinition] = {
    EXECUTION_PATH: FlagDefinition({"legacy": "legacy", "chunked": "chunked"}, "legacy",
                                   rollout_variant="chunked"),
    # DESIGN §3.3's strategies; fixed_ramp is Tamiyo's default_strategy.
    GRAFTING_STRATEGY: FlagDefinition(
        {s: s for s in ("fixed_ramp", "performance_linked", "drift_controlled",
                        "grad_norm_gated")}, "fixed_ramp"),
    # "*": every blueprint of the catalog; an operator adds narrower variants with `set`.
    BLUEPRINT_ALLOW_LIST: FlagDefinition({"all": ["*"]}, "all"),
    TELEMETRY_LEVEL: FlagDefinition({"full": "full", "sampled": "sampled"}, "full"),
}


@dataclass(frozen=True)
class FlagKeys:
    """Where the flags live. `namespace` is the hash tag: another one gives an independent set
    of flags on the same Redis (tests, a second fleet)."""

    namespace: str = "fleet"

    def __post_init__(self) -> None:
        if not self.namespace or any(c in self.namespace for c in "{}"):
            raise ValueError(f"invalid flag namespace {self.namespace!r}")

    @property
    def definitions(self) -> str:
        return f"control.flags.definitions.{{{self.namespace}}}"

    @property
    def changes(self) -> str:
        return f"control.flags.changes.{{{self.namespace}}}"

    @property
    def audit(self) -> str:
        return f"control.flags.audit.{{{self.namespace}}}"


def sync_client(settings: BusSettings) -> redis.Redis | redis.RedisCluster:
    """A synchronous client (flags are read in training loops and CLIs, off any event loop)
    with the bus's credentials, TLS and timeouts; it has answered PING (bounded retries)."""
    if settings.url is None:
        raise BusUnavailable("OONA_REDIS_URL is not set: flags live in the fleet's Redis")
    options: dict[str, Any] = {
        "username": settings.username, "password": settings.password,
        "socket_timeout": settings.socket_timeout_s,
        "socket_connect_timeout": settings.socket_timeout_s,
    }
    if settings.tls_enabled:
        options.update(ssl_ca_certs=settings.tls_ca_file, ssl_certfile=settings.tls_cert_file,
                       ssl_keyfile=settings.tls_key_file,
                       ssl_cert_reqs="required" if settings.tls_verify else "none")
    url = settings.client_url()
    assert url is not None
    client = (redis.RedisCluster.from_url(url, **options) if settings.cluster
              else redis.Redis.from_url(url, **options))
    delay = settings.connect_backoff_s
    for attempt in range(1, settings.connect_attempts + 1):
        try:
            client.ping()
            return client
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if attempt == settings.connect_attempts:
                client.close()
                raise BusUnavailable(f"redis at {settings.redacted_url()} unreachable after "
                                     f"{attempt} attempts") from exc
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


# Compare-and-set on the old JSON, then the change and audit entries, atomically.
# KEYS: definitions, changes, audit. ARGV: flag, old JSON ('' when absent), new JSON, version,
# changes maxlen, who, action, reason.
_CHANGE = """
local current = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if current ~= ARGV[2] then return false end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'flag', ARGV[1], 'version', ARGV[4])
return redis.call('XADD', KEYS[3], '*', 'flag', ARGV[1], 'action', ARGV[7], 'who', ARGV[6],
                  'old', ARGV[2], 'new', ARGV[3], 'reason', ARGV[8])
"""


@dataclass(frozen=True)
class AuditEntry:
    entry_id: str
    when: float  # unix seconds, from the entry id (the server's clock)
    flag: str
    action: str
    who: str
    old: FlagDefinition | None
    new: FlagDefinition
    reason: str = ""


class FlagStore:
    """Reads and changes flags: what the operator CLI and the ramp use."""

    def __init__(self, client: redis.Redis | redis.RedisCluster,
                 keys: FlagKeys = FlagKeys()) -> None:
        self.client = client
        self.keys = keys
        self._change = client.register_script(_CHANGE)

    def list(self) -> dict[str, FlagDefinition]:
        """Every flag: those in Redis, and the built-in ones nobody has set yet."""
        stored = {_text(k): FlagDefinition.from_json(v)
                  for k, v in self.client.hgetall(self.keys.definitions).items()}
        return dict(sorted((DEFAULT_FLAGS | stored).items()))

    def get(self, flag: str) -> FlagDefinition:
        raw = self.client.hget(self.keys.definitions, flag)
        if raw is not None:
            return FlagDefinition.from_json(raw)
        if flag in DEFAULT_FLAGS:
            return DEFAULT_FLAGS[flag]
        raise UnknownFlag(flag)

    def change(self, flag: str, who: str, action: str,
               update: Callable[[FlagDefinition], FlagDefinition], reason: str = "",
               *, create: FlagDefinition | None = None) -> FlagDefinition:
        """Apply `update` to the current definition (or to `create`/the built-in one when the
        flag is not stored yet) and write it with version + 1, audited; retried when another
        writer got there first."""
        if not who:
            raise ValueError("who: an audit entry names its author")
        for _ in range(10):
            raw = self.client.hget(self.keys.definitions, flag)
            try:
                old = FlagDefinition.from_json(raw) if raw is not None else None
            except InvalidFlag:
                if create is None:  # an unreadable flag is only overwritten whole
                    raise
                old = None
            base = old or create or DEFAULT_FLAGS.get(flag)
            if base is None:
                raise UnknownFlag(flag)
            new = replace(update(base), version=base.version + 1)
            written = self._change(
                keys=[self.keys.definitions, self.keys.changes, self.keys.audit],
                args=[flag, _text(raw) if raw is not None else "", new.to_json(), new.version,
                      CHANGES_MAXLEN, who, action, reason])
            if written:
                log.info("flag %s %s by %s: version %d", flag, action, who, new.version)
                return new
        raise ConcurrentFlagChange(f"flag {flag} kept changing under this {action}; try again")

    def set(self, flag: str, who: str, **fields: Any) -> FlagDefinition:
        """Set any of FlagDefinition's fields but `version` (a new flag needs `variants` and
        `default_variant`)."""
        if "version" in fields:
            raise ValueError("version is the store's to count")
        create = None
        if "variants" in fields and "default_variant" in fields:
            create = FlagDefinition(fields["variants"], fields["default_variant"])
        return self.change(flag, who, "set", lambda d: replace(d, **fields), create=create)

    def kill(self, flag: str, who: str, reason: str = "", *, release: bool = False
             ) -> FlagDefinition:
        """The kill switch: every job gets the default variant at its next read."""
        return self.change(flag, who, "unkill" if release else "kill",
                           lambda d: replace(d, killed=not release), reason)

    def audit(self, flag: str | None = None, count: int = 100) -> list[AuditEntry]:
        """The latest `count` audit entries (of one flag when given), oldest first."""
        entries: list[AuditEntry] = []
        newest = "+"
        while len(entries) < count:
            page = self.client.xrevrange(self.keys.audit, max=newest, count=500)
            for entry_id, raw in page:
                fields = {_text(k): _text(v) for k, v in raw.items()}
                if flag is None or fields["flag"] == flag:
                    entries.append(_audit_entry(_text(entry_id), fields))
            if len(page) < 500:
                break
            newest = "(" + _text(page[-1][0])  # exclusive: the page after the last one read
        return list(reversed(entries[:count]))

    def ramp_states(self, flags: Sequence[str]) -> dict[str, str]:
        """Each flag's RAMP_STATES entry, from its latest ramp audit entry: "idle" (never
        ramped), "ramping" (a step was the last), "halted", "completed". Reads the audit
        stream back until every flag is found (it holds operators' changes: a few entries a
        day)."""
        states = dict.fromkeys(flags, "idle")
        missing, newest = set(flags), "+"
        while missing:
            page = self.client.xrevrange(self.keys.audit, max=newest, count=500)
            for _entry_id, raw in page:
                fields = {_text(k): _text(v) for k, v in raw.items()}
                if fields["flag"] in missing and fields["action"] in _RAMP_ACTIONS:
                    states[fields["flag"]] = _RAMP_ACTIONS[fields["action"]]
                    missing.discard(fields["flag"])
            if len(page) < 500:
                break
            newest = "(" + _text(page[-1][0])
        return states


def _audit_entry(entry_id: str, fields: dict[str, str]) -> AuditEntry:
    return AuditEntry(entry_id=entry_id, when=int(entry_id.split("-")[0]) / 1000,
                      flag=fields["flag"], action=fields["action"], who=fields["who"],
                      old=FlagDefinition.from_json(fields["old"]) if fields["old"] else None,
                      new=FlagDefinition.from_json(fields["new"]),
                      reason=fields.get("reason", ""))


def ramp_schedule(current: float, start: float = RAMP_START, increment: float = RAMP_INCREMENT,
                  target: float = 100.0) -> list[float]:
    """The percentages still to come: start, then +increment a step, ending at target."""
    steps, p = [], start
    while p < target:
        steps.append(p)
        p += increment
    steps.append(target)
    return [s for s in steps if s > current]


@dataclass(frozen=True)
class RampOutcome:
    percent: float  # where the rollout stands at the end
    completed: bool
    halted_reason: str = ""
    steps: Sequence[float] = field(default_factory=tuple)  # the percentages this ramp set


Guard = Callable[[FlagDefinition], str | None]  # a reason to stop, or None to go on


def ramp(store: FlagStore, flag: str, who: str, *, step_s: float, guard: Guard | None = None,
         start: float = RAMP_START, increment: float = RAMP_INCREMENT, target: float = 100.0,
         off_variant: str | None = None, on_variant: str | None = None,
         sleep: Callable[[float], None] = time.sleep) -> RampOutcome:
    """Raise the rollout along `ramp_schedule`, one step every `step_s` (a week in production,
    seconds in tests). Before each step the guard is asked; it halts when the guard gives a
    reason, when the flag is killed, or when someone else changed its percentage meanwhile.
    `off_variant` / `on_variant`, when given, become the flag's default and rollout variants
    at the first step (refused while a rollout of other variants is under way). The halt and
    the completion are audited (`ramp-halt`, `ramp-done`: what `ramp_states` reads); rolling
    back is the kill switch's job (the guard may pull it)."""
    done: list[float] = []
    current = store.get(flag)
    variants = {k: v for k, v in (("default_variant", off_variant),
                                  ("rollout_variant", on_variant)) if v is not None}
    if any(getattr(current, k) != v for k, v in variants.items()):
        if current.rollout_percent > 0:
            raise InvalidFlag(f"flag {flag} is rolling out {current.rollout_variant!r} at "
                              f"{current.rollout_percent:g} %: set its percentage to 0 before "
                              f"ramping other variants")
        replace(current, **variants)  # an unknown variant is an InvalidFlag before any write
    if variants.get("rollout_variant", current.rollout_variant) is None:
        raise InvalidFlag(f"flag {flag} has no rollout variant to ramp")
    expected = current.rollout_percent
    for i, percent in enumerate(ramp_schedule(expected, start, increment, target)):
        if i:
            sleep(step_s)
        current = store.get(flag)
        reason = ("killed" if current.killed else
                  f"changed by someone else to {current.rollout_percent} %"
                  if current.rollout_percent != expected else (guard(current) if guard else None))
        if reason:
            store.change(flag, who, "ramp-halt", lambda d: d, reason)
            return RampOutcome(current.rollout_percent, False, reason, tuple(done))
        store.change(flag, who, "ramp", lambda d, p=percent: replace(d, rollout_percent=p,
                                                                     **variants))
        expected = percent
        done.append(percent)
    store.change(flag, who, "ramp-done", lambda d: d)
    return RampOutcome(expected, True, "", tuple(done))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisFlagProvider(AbstractProvider):
    """The OpenFeature provider: evaluations read an in-memory snapshot (no I/O, so a training
    loop may ask at every epoch boundary); a daemon thread keeps it current by blocking on the
    change stream for at most POLL_S, then re-reading the hash. While Redis is unreachable the
    last snapshot is served and the provider reports STALE; it recovers by itself."""

    def __init__(self, settings: BusSettings, keys: FlagKeys = FlagKeys(), *,
                 poll_s: float = POLL_S) -> None:
        super().__init__()
        self.settings = settings
        self.keys = keys
        self.poll_s = poll_s
        self._snapshot: dict[str, FlagDefinition | InvalidFlag] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: redis.Redis | redis.RedisCluster | None = None

    def get_metadata(self) -> Metadata:
        return Metadata(name="oona-redis")

    def initialize(self, evaluation_context: EvaluationContext) -> None:
        self._client = sync_client(self.settings)
        # The last change id before the hash is read: a change in between is read twice.
        last = self._client.xrevrange(self.keys.changes, count=1)
        cursor = _text(last[0][0]) if last else "0-0"
        self._reload()
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, args=(cursor,), daemon=True,
                                        name=f"oona-flags-{self.keys.namespace}")
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.poll_s + self.settings.socket_timeout_s)
            self._thread = None
        if self._client is not None:
            self._client.close()
            self._client = None

    def _reload(self) -> list[str]:
        """Re-read the hash; the keys whose definition changed."""
        assert self._client is not None
        fresh: dict[str, FlagDefinition | InvalidFlag] = {}
        for key, raw in self._client.hgetall(self.keys.definitions).items():
            try:
                fresh[_text(key)] = FlagDefinition.from_json(raw)
            except InvalidFlag as exc:  # one bad field must not take the other flags down
                fresh[_text(key)] = exc
        changed = sorted(k for k in fresh.keys() | self._snapshot.keys()
                         if repr(fresh.get(k)) != repr(self._snapshot.get(k)))
        self._snapshot = fresh  # one reference swap: readers see the old or the new whole
        return changed

    def _watch(self, cursor: str) -> None:
        stale = False
        while not self._stop.is_set():
            try:
                assert self._client is not None
                replies = self._client.xread({self.keys.changes: cursor}, count=1000,
                                             block=max(1, int(self.poll_s * 1000)))
                for _stream, entries in replies or ():
                    cursor = _text(entries[-1][0])
                changed = self._reload()
            except redis.ResponseError as exc:  # refused (ACL, wrong key type): not transient
                log.error("flags: redis refused the flag keys, serving the last state: %s", exc)
                self.emit_provider_error(ProviderEventDetails(message=str(exc)))
                return
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if not stale:
                    log.warning("flags: redis unreachable, serving the last state: %s", exc)
                    self.emit_provider_stale(ProviderEventDetails(message=str(exc)))
                    stale = True
                self._stop.wait(self.poll_s)
                continue
            if stale:
                stale = False
                self.emit_provider_ready(ProviderEventDetails(message="redis reachable again"))
            if changed:
                self.emit_provider_configuration_changed(ProviderEventDetails(
                    flags_changed=changed))

    def _resolve(self, flag_key: str, default_value: Any, context: EvaluationContext | None
                 ) -> FlagResolutionDetails[Any]:
        """The variant for one job. The client checks the value's type against the call
        (TYPE_MISMATCH: the caller's default is returned)."""
        found = self._snapshot.get(flag_key)
        source = "redis"
        if found is None:
            found, source = DEFAULT_FLAGS.get(flag_key), "built-in"
        if found is None:
            return FlagResolutionDetails(default_value, ErrorCode.FLAG_NOT_FOUND,
                                         f"no flag {flag_key}", Reason.ERROR)
        if isinstance(found, InvalidFlag):
            return FlagResolutionDetails(default_value, ErrorCode.PARSE_ERROR, str(found),
                                         Reason.ERROR)
        try:
            variant, reason = found.variant_for(context.targeting_key if context else None,
                                                flag_key)
        except ValueError as exc:
            return FlagResolutionDetails(default_value, ErrorCode.TARGETING_KEY_MISSING,
                                         str(exc), Reason.ERROR)
        return FlagResolutionDetails(
            found.variants[variant], variant=variant,
            reason=Reason.DEFAULT if source == "built-in" else reason,
            flag_metadata={"version": found.version, "rollout_percent": found.rollout_percent,
                           "source": source})

    def resolve_boolean_details(self, flag_key: str, default_value: bool,
                                evaluation_context: EvaluationContext | None = None
                                ) -> FlagResolutionDetails[bool]:
        return self._resolve(flag_key, default_value, evaluation_context)

    def resolve_string_details(self, flag_key: str, default_value: str,
                               evaluation_context: EvaluationContext | None = None
                               ) -> FlagResolutionDetails[str]:
        return self._resolve(flag_key, default_value, evaluation_context)

    def resolve_integer_details(self, flag_key: str, default_value: int,
                                evaluation_context: EvaluationContext | None = None
                                ) -> FlagResolutionDetails[int]:
        return self._resolve(flag_key, default_value, evaluation_context)

    def resolve_float_details(self, flag_key: str, default_value: float,
                              evaluation_context: EvaluationContext | None = None
                              ) -> FlagResolutionDetails[float]:
        return self._resolve(flag_key, default_value, evaluation_context)

    def resolve_object_details(self, flag_key: str,
                               default_value: Sequence[Any] | Mapping[str, Any],
                               evaluation_context: EvaluationContext | None = None
                               ) -> FlagResolutionDetails[Sequence[Any] | Mapping[str, Any]]:
        return self._resolve(flag_key, default_value, evaluation_context)
