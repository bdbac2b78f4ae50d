"""Typed Karn settings, read from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from oona import ConsumerConfig
from oona.settings import read_secret
from sqlalchemy.engine import make_url

DEFAULT_DATABASE_URL = "sqlite:///karn.db"


@dataclass(frozen=True)
class KarnSettings:
    """Where Karn keeps its data, where it listens, and how it recommends.

    The bus settings are oona's own (`oona.BusSettings.from_env`: OONA_REDIS_URL and friends).
    """

    database_url: str = DEFAULT_DATABASE_URL
    grpc_port: int = 50053
    http_port: int = 8083
    # Both servers listen here; 0.0.0.0 in a container.
    bind_host: str = "127.0.0.1"
    consumer_name: str = "karn-1"
    # A recommendation's sampled reward is divided by 1 + cost_penalty * (the blueprint's
    # parameters / the largest candidate's), so between two equally rewarded blueprints the
    # cheaper one wins (karn.recommender).
    cost_penalty: float = 0.1
    # None: a fresh seed per process. Set it to make recommendations reproducible.
    random_seed: int | None = None
    # A report the database keeps refusing is retried this many times, then dead-lettered.
    # High on purpose: with the retry delay capped at 30 s this rides out a ~10 minute outage.
    max_deliveries: int = 25
    # Bounded drain at SIGTERM: the batch in hand and in-flight RPCs get this long.
    shutdown_grace_s: float = 10.0
    # A report left pending this long on a replica is presumed abandoned (the replica died) and
    # taken over by another, which looks every reclaim_interval_s. Keep it above the longest a
    # batch takes to store, or live replicas take over each other's reports in hand (still
    # stored once, counted as duplicates). Defaults are oona's.
    reclaim_idle_ms: int = ConsumerConfig.reclaim_idle_ms
    reclaim_interval_s: float = ConsumerConfig.reclaim_interval_s
    # Seconds between rounds of the blueprint search (karn.search); 0: no search.
    search_interval_s: float = 0.0
    # The room of the runtimes' banks (KasminaConfig.bank_hidden / bank_rank, set alike): the
    # search asks for hidden widths and ranks up to max(the parent's own size, this); 0, as in
    # KasminaConfig, is the parent's own size. A proposal a runtime has no room for is refused,
    # reported and retired (karn.search), so a bound set too high costs germinations, not jobs.
    search_max_hidden: int = 0
    search_max_rank: int = 0
    # Every gRPC call must carry it (`authorization: Bearer <token>`); None only with
    # OONA_INSECURE=1 (`python -m karn` refuses to start otherwise).
    api_token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.database_url:
            raise ValueError("database_url must not be empty")
        for name in ("grpc_port", "http_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ValueError(f"{name} must be in 0..65535, got {port}")
        if self.cost_penalty < 0:
            raise ValueError("cost_penalty must be >= 0")
        if self.max_deliveries < 1:
            raise ValueError("max_deliveries must be >= 1")
        if self.shutdown_grace_s <= 0:
            raise ValueError("shutdown_grace_s must be > 0")
        if self.reclaim_idle_ms < 1:
            raise ValueError("reclaim_idle_ms must be >= 1")
        if self.reclaim_interval_s <= 0:
            raise ValueError("reclaim_interval_s must be > 0")
        if not 0 <= self.search_interval_s < float("inf"):
            raise ValueError("search_interval_s must be >= 0 (0: no search)")
        if self.search_max_hidden < 0 or self.search_max_rank < 0:
            raise ValueError("search_max_hidden and search_max_rank must be >= 0")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> KarnSettings:
        """Settings from `KARN_*` variables; unset ones keep their defaults.

        KARN_DATABASE_URL, KARN_GRPC_PORT, KARN_HTTP_PORT, KARN_BIND_HOST, KARN_CONSUMER_NAME,
        KARN_COST_PENALTY, KARN_RANDOM_SEED, KARN_MAX_DELIVERIES, KARN_SHUTDOWN_GRACE_S,
        KARN_RECLAIM_IDLE_MS, KARN_RECLAIM_INTERVAL_S, KARN_SEARCH_INTERVAL_S,
        KARN_SEARCH_MAX_HIDDEN, KARN_SEARCH_MAX_RANK, KARN_API_TOKEN (or KARN_API_TOKEN_FILE, a
        file holding it).
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {"api_token": read_secret("KARN_API_TOKEN", env)}
        for setting in fields(cls):
            raw = env.get(f"KARN_{setting.name.upper()}")
            if not raw or setting.name == "api_token":
                continue
            kind = str(setting.type).split(" | ")[0]
            try:
                values[setting.name] = {"int": int, "float": float}.get(kind, str)(raw)
            except ValueError as exc:
                raise ValueError(f"KARN_{setting.name.upper()}={raw!r}: {exc}") from exc
        return cls(**values)

    def redacted_database_url(self) -> str:
        """The database URL without its password, for logs."""
        return make_url(self.database_url).render_as_string(hide_password=True)
