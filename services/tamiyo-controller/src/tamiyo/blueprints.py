"""Which blueprint and grafting strategy a germination uses: Karn's recommendation (a built-in
blueprint or one Karn's search proposed, sent to the runtime as its full spec), or the catalog
default when Karn cannot answer in time; per job, the `kasmina.grafting_strategy` and
`kasmina.blueprint_allow_list` feature flags (`GerminationFlags`) override the settings."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from oona.contracts import BlueprintSpec, Germinate, catalog
from oona.flags import BLUEPRINT_ALLOW_LIST, DEFAULT_FLAGS, GRAFTING_STRATEGY, RedisFlagProvider
from oona.proto.kasmina.karn.v1 import karn_service_pb2 as karn_pb
from oona.proto.kasmina.karn.v1 import karn_service_pb2_grpc as karn_grpc
from oona.signing import authenticated_channel
from openfeature.evaluation_context import EvaluationContext
from openfeature.event import ProviderEvent, ProviderEventDetails

from tamiyo import metrics

log = logging.getLogger(__name__)

# A channel to a Karn that is down retries its connection with backoff; the defaults let that
# backoff grow to two minutes, so Tamiyo would keep falling back long after Karn is back.
_CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 500),
                    ("grpc.min_reconnect_backoff_ms", 500),
                    ("grpc.max_reconnect_backoff_ms", 5000)]

# Karn ranks the whole catalog when asked for this many.
_ALL = 1024
# DESIGN §3.3's strategies, which every runtime knows: the grafting-strategy flag's built-in
# variants are their one list. A plug-in strategy is known here as TAMIYO_DEFAULT_STRATEGY.
BUILT_IN_STRATEGIES = frozenset(DEFAULT_FLAGS[GRAFTING_STRATEGY].variants)
# (flag, version, value) of the invalid values logged, so each is logged once per change;
# past this many the oldest are forgotten (an operator's changes: a few a day).
_MAX_LOGGED = 1024


@dataclass(frozen=True)
class BlueprintChoice:
    blueprint_name: str
    strategy_name: str
    # "karn" or "fallback", for the command's rationale.
    source: str
    # Karn's spec of it (None for the fallback, which the runtime knows by name). Not part of
    # equality: a choice is the blueprint named, whatever copy of its spec came with it.
    spec: BlueprintSpec | None = field(default=None, compare=False)

    def germinate(self) -> Germinate:
        """The Germinate action: the full spec when Karn sent one, so a runtime grows a
        blueprint it has never seen (a proposal of Karn's search); else the catalog name."""
        if self.spec is not None:
            return Germinate(blueprint_spec=self.spec, strategy_name=self.strategy_name)
        return Germinate(blueprint_name=self.blueprint_name, strategy_name=self.strategy_name)


class BlueprintAdvisor(Protocol):
    def choose(self, job_id: str, layer_id: str, chunk_size: int) -> BlueprintChoice | None:
        """The blueprint for a seed of `chunk_size` features; None when none fits (do not
        germinate)."""


def parse_allow_list(value: str | Iterable[str]) -> frozenset[str]:
    """Catalog names from "a,b" (TAMIYO_BLUEPRINTS, a flag's variant) or a list of names; empty
    or "*" among them: any blueprint (the empty set)."""
    names = value.split(",") if isinstance(value, str) else value
    allowed = frozenset(name.strip() for name in names if name.strip())
    return frozenset() if "*" in allowed else allowed


class GerminationFlags:
    """Per job, the strategy and blueprint allow-list of its germinations from the
    `kasmina.grafting_strategy` and `kasmina.blueprint_allow_list` flags (oona.flags: bucketed
    by job id, with each flag's salt), evaluated on the provider's in-memory snapshot each time
    a decision of the job germinates, so a change reaches the job's next decided boundary.

    A flag nobody has set (its built-in definition) changes nothing: the setting stands. So does
    a value that cannot be served (not a known strategy; a name not in the catalog; an unreadable
    definition), logged once per change of the flag, never raised into a decision."""

    def __init__(self, provider: RedisFlagProvider, strategies: Iterable[str],
                 blueprints: Iterable[str]) -> None:
        self._provider = provider
        self._strategies = frozenset(strategies)
        self._blueprints = frozenset(blueprints)
        # Insertion-ordered (the oldest is forgotten first); decisions run in threads (the
        # worker's and gRPC Step's), hence the lock.
        self._logged: dict[tuple[str, int | None, str], None] = {}
        self._lock = threading.Lock()
        provider.attach(self._on_event)

    @classmethod
    def open(cls, provider: RedisFlagProvider, default_strategy: str) -> GerminationFlags:
        """Initialise `provider` (reads the flags; BusUnavailable, redis errors) and follow it:
        the built-in strategies and `default_strategy`, the built-in catalog's blueprints."""
        flags = cls(provider, BUILT_IN_STRATEGIES | {default_strategy},
                    (spec.name for spec in catalog()))
        provider.initialize(EvaluationContext())
        return flags

    def strategy(self, job_id: str) -> str | None:
        """The job's strategy from the flag; None: the flag does not set one."""
        found = self._value(GRAFTING_STRATEGY, job_id)
        if found is None:
            return None
        value, version = found
        if isinstance(value, str) and value in self._strategies:
            return value
        self._invalid(GRAFTING_STRATEGY, version, value,
                      f"not a known strategy ({', '.join(sorted(self._strategies))})")
        return None

    def allowed(self, job_id: str) -> frozenset[str] | None:
        """The job's allow-list from the flag (empty: any blueprint); None: the flag does not
        set one."""
        found = self._value(BLUEPRINT_ALLOW_LIST, job_id)
        if found is None:
            return None
        value, version = found
        if isinstance(value, str) or (isinstance(value, list | tuple)
                                      and all(isinstance(v, str) for v in value)):
            allowed = parse_allow_list(value)
            unknown = allowed - self._blueprints
            if not unknown:
                return allowed
            reason = f"{', '.join(sorted(unknown))} not in the catalog"
        else:
            reason = "not a comma-separated list of catalog names"
        self._invalid(BLUEPRINT_ALLOW_LIST, version, value, reason)
        return None

    def close(self) -> None:
        self._provider.detach()
        self._provider.shutdown()

    def _value(self, flag: str, job_id: str) -> tuple[Any, int] | None:
        """(value, flag version) of a flag set in Redis for the job; None for a built-in one
        (and an unreadable one, logged)."""
        details = self._provider.resolve_object_details(flag, None, EvaluationContext(job_id))
        if details.error_code is not None:
            self._invalid(flag, None, None, details.error_message or str(details.error_code))
            return None
        metadata = details.flag_metadata or {}
        if metadata.get("source") != "redis":
            return None
        return details.value, int(metadata.get("version", 0))

    def _invalid(self, flag: str, version: int | None, value: object, reason: str) -> None:
        key = (flag, version, repr(value) if version is not None else reason)
        with self._lock:
            if key in self._logged:
                return
            self._logged[key] = None
            while len(self._logged) > _MAX_LOGGED:
                del self._logged[next(iter(self._logged))]
        log.warning("flag %s: %s ignored (%s); the setting stands", flag,
                    f"value {value!r}" if version is not None else "its definition", reason)

    def _on_event(self, _provider: object, event: ProviderEvent,
                  details: ProviderEventDetails) -> None:
        if event == ProviderEvent.PROVIDER_CONFIGURATION_CHANGED:
            log.info("flags changed: %s", ", ".join(details.flags_changed or ()))


class KarnAdvisor:
    """Asks Karn's `Recommend` with a short deadline. Karn unreachable, slow or failing:
    `default_blueprint` (counted in tamiyo_karn_fallbacks_total) so growth never waits on it.
    `allowed` (catalog names; empty: any) keeps Karn's best recommendation among those; the
    blueprints Karn's search proposes have names of their own, so an allow-list keeps them out.
    `flags`, when given, override per job: the allow-list, and the strategy (over Karn's and
    `default_strategy`). `token`: Karn's API token, sent with every call (None: none)."""

    def __init__(self, address: str, timeout_s: float, *, default_blueprint: str,
                 default_strategy: str, allowed: frozenset[str] = frozenset(),
                 token: str | None = None, flags: GerminationFlags | None = None) -> None:
        self._channel = authenticated_channel(address, token, options=_CHANNEL_OPTIONS)
        self._karn = karn_grpc.KarnStub(self._channel)  # type: ignore[no-untyped-call]
        self._timeout_s = timeout_s
        self._default_blueprint = default_blueprint
        self._default_strategy = default_strategy
        self._allowed = allowed
        self._flags = flags

    def choose(self, job_id: str, layer_id: str, chunk_size: int) -> BlueprintChoice | None:
        allowed, strategy = self._allowed, None
        if self._flags is not None:
            flagged = self._flags.allowed(job_id)
            allowed = allowed if flagged is None else flagged
            strategy = self._flags.strategy(job_id)
        fallback = self._default_blueprint
        if allowed and fallback not in allowed:  # the fallback obeys the list too
            fallback = sorted(allowed)[0]
        request = karn_pb.RecommendRequest(job_id=job_id, layer_id=layer_id,
                                           chunk_size=chunk_size,
                                           limit=_ALL if allowed else 1)
        try:
            reply = self._karn.Recommend(request, timeout=self._timeout_s)
        except grpc.RpcError as exc:
            metrics.KARN_FALLBACKS.inc()
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:  # a configuration error: say so
                log.error("karn refused Tamiyo's token (KARN_API_TOKEN); germinating %s with %s",
                          layer_id, fallback)
            else:
                log.warning("karn unavailable (%s); germinating %s with %s", exc.code(),
                            layer_id, fallback)
            return BlueprintChoice(fallback, strategy or self._default_strategy, "fallback")
        ranked = [r for r in reply.recommendations
                  if not allowed or r.blueprint.name in allowed]
        if not ranked:
            if reply.recommendations:
                log.warning("none of Karn's blueprints for %s (chunk %d) is allowed (%s): "
                            "not germinating", layer_id, chunk_size, sorted(allowed))
            return None
        best = ranked[0]
        return BlueprintChoice(best.blueprint.name,
                               strategy or best.strategy_name or self._default_strategy,
                               "karn", spec=best.blueprint)

    def close(self) -> None:
        self._channel.close()
