"""Connecting to Redis: bounded retries, PING before ready, the server version logged; what the
server keeps across a restart (`check_persistence`, for services at start)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.retry import Retry as RedisRetry
from redis.backoff import ExponentialBackoff
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from oona.errors import BusUnavailable, IncompatibleServer
from oona.settings import BusSettings

log = logging.getLogger(__name__)

MIN_SERVER_VERSION = (6, 2)
# What a reconnect can cure. BusyLoadingError (a restarted server loading its data) is a
# ConnectionError subclass, so it is retried too.
TRANSIENT_ERRORS = (RedisConnectionError, RedisTimeoutError)

# What the bus talks to: one server, or a Redis Cluster (settings.cluster) through redis-py's
# cluster client, which routes each command by its key's slot.
Client = Redis | RedisCluster


def atomic_across(client: Client, *keys: str) -> bool:
    """Whether one script or MULTI may touch all of `keys`: always on one server; in a cluster
    only when they hash to one slot (a per-job stream and its DLQ do: the job is their hash tag;
    a global stream and its DLQ need not)."""
    return not isinstance(client, RedisCluster) or len({key_slot(k.encode()) for k in keys}) == 1


def client_for(settings: BusSettings) -> Client:
    """A redis-py asyncio client (bytes replies) that retries single commands on transient
    errors; the cluster client for a `redis+cluster://` URL."""
    if settings.url is None:
        raise ValueError("settings.url is None: open the bus with oona.open_bus to use the "
                         "embedded broker")
    options: dict[str, Any] = {
        "username": settings.username,
        "password": settings.password,
        "socket_timeout": settings.socket_timeout_s,
        "socket_connect_timeout": settings.socket_timeout_s,
        "retry": RedisRetry(ExponentialBackoff(cap=1.0, base=0.05), retries=3),
        "retry_on_error": list(TRANSIENT_ERRORS),
        "health_check_interval": 30,
    }
    if settings.tls_enabled:
        options.update(ssl_ca_certs=settings.tls_ca_file, ssl_certfile=settings.tls_cert_file,
                       ssl_keyfile=settings.tls_key_file,
                       ssl_cert_reqs="required" if settings.tls_verify else "none")
    url = settings.client_url()
    assert url is not None
    if settings.cluster:
        return RedisCluster.from_url(url, **options)
    return Redis.from_url(url, **options)


async def connect(settings: BusSettings) -> Client:
    """A client that has answered PING, on a server >= 6.2; BusUnavailable after
    `connect_attempts` tries with exponential backoff."""
    client = client_for(settings)
    delay = settings.connect_backoff_s
    for attempt in range(1, settings.connect_attempts + 1):
        try:
            await client.ping()
            info = await client.info("server")
            break
        except TRANSIENT_ERRORS as exc:
            log.warning("redis at %s not ready (attempt %d/%d): %s", settings.redacted_url(),
                        attempt, settings.connect_attempts, exc)
            if attempt == settings.connect_attempts:
                await client.aclose()
                raise BusUnavailable(f"redis at {settings.redacted_url()} unreachable after "
                                     f"{attempt} attempts") from exc
            await asyncio.sleep(delay)
            delay *= 2
    version = str(info.get("redis_version", "0"))
    if parse_version(version) < MIN_SERVER_VERSION:
        await client.aclose()
        raise IncompatibleServer(f"redis {version} at {settings.redacted_url()}; need >= 6.2")
    log.info("connected to redis %s at %s", version, settings.redacted_url())
    return client


def parse_version(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:2] if part.isdigit())


@dataclass(frozen=True)
class Persistence:
    """What a Redis server keeps across a restart, as far as it lets us see (None: unknown)."""

    aof: bool | None  # appendonly yes: every write is logged (fsync per appendfsync)
    rdb: bool | None  # a `save` schedule: snapshots, so writes since the last one are lost
    # Why CONFIG could not be read (refused by ACL, or renamed away); None when it was read.
    config_error: str | None = None

    @property
    def warning(self) -> str | None:
        """What an operator must hear, when AOF is known to be off."""
        if self.aof is not False or self.config_error is not None:
            return None
        if self.rdb:
            return ("AOF is off (appendonly no), only RDB snapshots: a restart loses every "
                    "message written since the last snapshot, unread commands and field reports "
                    "included; set appendonly yes")
        return ("neither AOF (appendonly no) nor RDB snapshots (save \"\") is on: a restart "
                "loses every stream, unread commands and field reports included; set appendonly "
                "yes")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def check_persistence(redis: Client, url: str = "") -> Persistence:
    """Read whether the server persists streams (CONFIG GET appendonly and save; where CONFIG is
    refused, INFO persistence says whether AOF is on) and log it in one line: a warning when AOF
    is off (see Persistence.warning), else info. Never raises on a refusal. `url`: how the log
    names the server (pass settings.redacted_url())."""
    where = f"redis at {url}" if url else "redis"
    try:
        replies = {**await redis.config_get("appendonly"), **await redis.config_get("save")}
        config = {_text(k): _text(v) for k, v in replies.items()}
        result = Persistence(aof=config.get("appendonly") == "yes",
                             rdb=bool(config.get("save", "").strip()))
    except ResponseError as exc:  # NOPERM (ACL) or unknown command (rename-command CONFIG "")
        aof: bool | None = None
        try:
            info = await redis.info("persistence")
            aof = bool(int(info.get("aof_enabled", 0)))
        except ResponseError:
            pass
        result = Persistence(aof=aof, rdb=None, config_error=f"{type(exc).__name__}: {exc}")
    if result.warning:
        log.warning("%s: %s", where, result.warning)
    elif result.config_error is not None:
        state = {True: "on", False: "off", None: "unknown"}[result.aof]
        log.info("%s: cannot read its persistence settings (%s); AOF %s per INFO, RDB schedule "
                 "unknown: make sure appendonly is yes", where, result.config_error, state)
    else:
        log.info("%s: persistence AOF %s, RDB snapshots %s", where,
                 "on" if result.aof else "off", "on" if result.rdb else "off")
    return result
