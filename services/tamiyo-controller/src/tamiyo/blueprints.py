"""Which blueprint and grafting strategy a germination uses: Karn's recommendation (a built-in
blueprint or one Karn's search proposed, sent to the runtime as its full spec), or the catalog
default when Karn cannot answer in time."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

import grpc
from oona.contracts import BlueprintSpec, Germinate
from oona.proto.kasmina.karn.v1 import karn_service_pb2 as karn_pb
from oona.proto.kasmina.karn.v1 import karn_service_pb2_grpc as karn_grpc
from oona.signing import authenticated_channel

from tamiyo import metrics

log = logging.getLogger(__name__)

# A channel to a Karn that is down retries its connection with backoff; the defaults let that
# backoff grow to two minutes, so Tamiyo would keep falling back long after Karn is back.
_CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 500),
                    ("grpc.min_reconnect_backoff_ms", 500),
                    ("grpc.max_reconnect_backoff_ms", 5000)]

# Karn ranks the whole catalog when asked for this many.
_ALL = 1024


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


class KarnAdvisor:
    """Asks Karn's `Recommend` with a short deadline. Karn unreachable, slow or failing:
    `default_blueprint` (counted in tamiyo_karn_fallbacks_total) so growth never waits on it.
    `allowed` (catalog names; empty: any) keeps Karn's best recommendation among those; the
    blueprints Karn's search proposes have names of their own, so an allow-list keeps them out.
    `token`: Karn's API token, sent with every call (None: none)."""

    def __init__(self, address: str, timeout_s: float, *, default_blueprint: str,
                 default_strategy: str, allowed: frozenset[str] = frozenset(),
                 token: str | None = None) -> None:
        self._channel = authenticated_channel(address, token, options=_CHANNEL_OPTIONS)
        self._karn = karn_grpc.KarnStub(self._channel)  # type: ignore[no-untyped-call]
        self._timeout_s = timeout_s
        self._default_blueprint = default_blueprint
        self._default_strategy = default_strategy
        self._allowed = allowed
        if allowed and default_blueprint not in allowed:  # the fallback obeys the list too
            self._default_blueprint = sorted(allowed)[0]

    def choose(self, job_id: str, layer_id: str, chunk_size: int) -> BlueprintChoice | None:
        request = karn_pb.RecommendRequest(job_id=job_id, layer_id=layer_id,
                                           chunk_size=chunk_size,
                                           limit=_ALL if self._allowed else 1)
        try:
            reply = self._karn.Recommend(request, timeout=self._timeout_s)
        except grpc.RpcError as exc:
            metrics.KARN_FALLBACKS.inc()
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:  # a configuration error: say so
                log.error("karn refused Tamiyo's token (KARN_API_TOKEN); germinating %s with %s",
                          layer_id, self._default_blueprint)
            else:
                log.warning("karn unavailable (%s); germinating %s with %s", exc.code(),
                            layer_id, self._default_blueprint)
            return BlueprintChoice(self._default_blueprint, self._default_strategy, "fallback")
        ranked = [r for r in reply.recommendations
                  if not self._allowed or r.blueprint.name in self._allowed]
        if not ranked:
            if reply.recommendations:
                log.warning("none of Karn's blueprints for %s (chunk %d) is allowed (%s): "
                            "not germinating", layer_id, chunk_size, sorted(self._allowed))
            return None
        best = ranked[0]
        return BlueprintChoice(best.blueprint.name, best.strategy_name or self._default_strategy,
                               "karn", spec=best.blueprint)

    def close(self) -> None:
        self._channel.close()
