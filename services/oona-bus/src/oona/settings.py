"""Typed bus settings, read from the environment or a DSN; secrets from variables or files, and
the start-up rule every fleet service follows for them (`require_secrets`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from oona.signing import Keys

log = logging.getLogger(__name__)

# `redis+cluster://` and `rediss+cluster://` name a Redis Cluster (any one node: the client finds
# the others); the URL stays whole in OONA_REDIS_URL, so a child process inherits cluster mode.
_CLUSTER_SUFFIX = "+cluster"
_SCHEMES = ("redis", "rediss", "unix", "redis" + _CLUSTER_SUFFIX, "rediss" + _CLUSTER_SUFFIX)


@dataclass(frozen=True)
class BusSettings:
    """Where the bus is and how it behaves. `url=None` means: start the embedded broker."""

    url: str | None = None
    username: str | None = None
    # repr=False here and on the keys: a settings object printed in a log carries no secret.
    password: str | None = field(default=None, repr=False)
    # TLS is on for rediss:// URLs; these point at PEM files.
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_verify: bool = True

    connect_attempts: int = 5
    connect_backoff_s: float = 0.2
    socket_timeout_s: float = 5.0

    # The length cap per stream. Telemetry is trimmed to it with approximate MAXLEN ("~", so
    # Redis trims whole macro nodes cheaply); a stream that must not lose only past what every
    # consumer group has read and acknowledged, so a lagging group makes it grow beyond the cap
    # (oona_stream_over_cap) instead of losing entries (oona.streams.must_not_lose).
    stream_maxlen: int = 100_000
    # A consumer group whose consumers have all been idle this long (its reader is gone for good,
    # e.g. a removed replica) no longer holds trimming back; what it had not read is then trimmed
    # and counted (oona_trimmed_unread_total). 0: groups hold trimming back forever.
    stale_group_s: float = 7 * 24 * 3600
    claim_check_bytes: int = 64 * 1024
    # Must outlive stream retention plus the redelivery window, or a slow consumer finds its blob
    # gone (that is then a claim_check_missing dead letter, not silent loss).
    claim_check_ttl_s: int = 7 * 24 * 3600
    # Larger payloads are refused at publish and dead-lettered at consume.
    max_payload_bytes: int = 64 * 1024 * 1024
    # How long a published event id keeps a second publish of it from being written. Costs one
    # small key per deduplicated message (telemetry is published without).
    dedupe_ttl_s: int = 24 * 3600
    # Shared fleet key for HMAC signing: envelopes are signed with it and must carry a valid
    # signature. None disables both (a service refuses to start so unless `insecure`).
    signing_key: bytes | None = field(default=None, repr=False)
    # Keys still accepted (never used to sign) while a rotation rolls out: oona.signing.Keys.
    previous_signing_keys: tuple[bytes, ...] = field(default=(), repr=False)
    # Freshness window of command envelopes (oona.signing.Keys): older, or further in the
    # future than the skew, is dead-lettered. 0 turns the age limit off.
    max_command_age_s: float = Keys.max_command_age_s
    max_clock_skew_s: float = Keys.max_clock_skew_s
    # OONA_INSECURE=1: services start without a signing key or API token (one warning).
    insecure: bool = False

    def __post_init__(self) -> None:
        if self.connect_attempts < 1:
            raise ValueError("connect_attempts must be >= 1")
        if not 0 < self.claim_check_bytes <= self.max_payload_bytes:
            raise ValueError("need 0 < claim_check_bytes <= max_payload_bytes")
        if self.stream_maxlen < 1:
            raise ValueError("stream_maxlen must be >= 1")
        if self.dedupe_ttl_s < 1:
            raise ValueError("dedupe_ttl_s must be >= 1 (every dedupe key expires)")
        if self.stale_group_s < 0:
            raise ValueError("stale_group_s must be >= 0")
        if self.tls_enabled and self.url and self.url.startswith("unix"):
            raise ValueError("TLS over a unix socket is not supported")
        if self.signing_key is not None:
            self.signing_keys  # noqa: B018 - Keys refuses empty keys and a negative window
        elif self.previous_signing_keys:
            raise ValueError("OONA_SIGNING_PREVIOUS_KEYS needs OONA_SIGNING_KEY (the key that "
                             "signs)")

    @property
    def signing_keys(self) -> Keys | None:
        """What envelopes are signed and verified with; None when signing is off."""
        if self.signing_key is None:
            return None
        return Keys(self.signing_key, self.previous_signing_keys, self.max_command_age_s,
                    self.max_clock_skew_s)

    @property
    def _scheme(self) -> str:
        return urlsplit(self.url).scheme if self.url else ""

    @property
    def tls_enabled(self) -> bool:
        return self._scheme.removesuffix(_CLUSTER_SUFFIX) == "rediss"

    @property
    def cluster(self) -> bool:
        """A Redis Cluster URL: open_bus then uses redis-py's cluster client."""
        return self._scheme.endswith(_CLUSTER_SUFFIX)

    def client_url(self) -> str | None:
        """The URL as redis-py takes it (without the `+cluster` marker)."""
        if self.url is None or not self.cluster:
            return self.url
        return urlsplit(self.url)._replace(scheme=self._scheme.removesuffix(_CLUSTER_SUFFIX)
                                           ).geturl()

    @classmethod
    def from_dsn(cls, dsn: str, **overrides: Any) -> BusSettings:
        """Settings from a Redis URL (`redis://`, `rediss://` or `unix://`; `redis+cluster://` or
        `rediss+cluster://` for a Redis Cluster), credentials included.

        Query parameters `ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile` and `ssl_cert_reqs=none`
        set the TLS fields, as redis-py names them.
        """
        parts = urlsplit(dsn)
        if parts.scheme not in _SCHEMES:
            raise ValueError(f"unsupported Redis URL scheme {parts.scheme!r} in {dsn!r}")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        fields: dict[str, Any] = {
            "url": dsn,
            "username": unquote(parts.username) if parts.username else None,
            "password": unquote(parts.password) if parts.password else None,
            "tls_ca_file": query.get("ssl_ca_certs"),
            "tls_cert_file": query.get("ssl_certfile"),
            "tls_key_file": query.get("ssl_keyfile"),
            "tls_verify": query.get("ssl_cert_reqs", "required") != "none",
        }
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> BusSettings:
        """Settings from `OONA_*` variables; without OONA_REDIS_URL the embedded broker is used.

        OONA_REDIS_URL, OONA_REDIS_USERNAME, OONA_REDIS_PASSWORD (override the URL's credentials),
        OONA_REDIS_TLS_CA, OONA_REDIS_TLS_CERT, OONA_REDIS_TLS_KEY, OONA_SIGNING_KEY (the shared
        HMAC key, as text), OONA_SIGNING_PREVIOUS_KEYS (comma-separated), OONA_MAX_COMMAND_AGE_S,
        OONA_MAX_CLOCK_SKEW_S, OONA_INSECURE (1/true/yes), OONA_STREAM_MAXLEN, OONA_STALE_GROUP_S,
        OONA_CLAIM_CHECK_BYTES, OONA_CONNECT_ATTEMPTS, OONA_DEDUPE_TTL_S. The password and the
        keys may come from a file instead (compose secrets): OONA_REDIS_PASSWORD_FILE,
        OONA_SIGNING_KEY_FILE, OONA_SIGNING_PREVIOUS_KEYS_FILE (one key a line, an empty file
        none); see `read_secret`.
        """
        env = os.environ if environ is None else environ
        url = env.get("OONA_REDIS_URL") or None
        settings = cls.from_dsn(url) if url else cls()
        overrides: dict[str, Any] = {}
        password = read_secret("OONA_REDIS_PASSWORD", env)
        if password:
            overrides["password"] = password
        for var, name in (("OONA_REDIS_USERNAME", "username"),
                          ("OONA_REDIS_TLS_CA", "tls_ca_file"),
                          ("OONA_REDIS_TLS_CERT", "tls_cert_file"),
                          ("OONA_REDIS_TLS_KEY", "tls_key_file")):
            if env.get(var):
                overrides[name] = env[var]
        for var, name in (("OONA_STREAM_MAXLEN", "stream_maxlen"),
                          ("OONA_CLAIM_CHECK_BYTES", "claim_check_bytes"),
                          ("OONA_CONNECT_ATTEMPTS", "connect_attempts"),
                          ("OONA_DEDUPE_TTL_S", "dedupe_ttl_s")):
            if env.get(var):
                overrides[name] = int(env[var])
        for var, name in (("OONA_STALE_GROUP_S", "stale_group_s"),
                          ("OONA_MAX_COMMAND_AGE_S", "max_command_age_s"),
                          ("OONA_MAX_CLOCK_SKEW_S", "max_clock_skew_s")):
            if env.get(var):
                overrides[name] = float(env[var])
        key = read_secret("OONA_SIGNING_KEY", env)
        if key:
            overrides["signing_key"] = key.encode()
        # An empty file is no previous key: compose mounts one outside a rotation.
        previous = read_secret("OONA_SIGNING_PREVIOUS_KEYS", env, empty_ok=True)
        if previous:
            overrides["previous_signing_keys"] = tuple(
                k.strip().encode() for k in previous.replace("\n", ",").split(",") if k.strip())
        overrides["insecure"] = insecure_opt_out(env)
        return replace(settings, **overrides)

    def redacted_url(self) -> str:
        """The URL without its password, for logs."""
        if self.url is None:
            return "embedded"
        parts = urlsplit(self.url)
        if parts.password is None:
            return self.url
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return parts._replace(netloc=netloc).geturl()


class MissingSecret(ValueError):
    """A service was started without a key or token it needs (and without OONA_INSECURE)."""


def read_secret(name: str, environ: Mapping[str, str] | None = None, *,
                empty_ok: bool = False) -> str | None:
    """The secret in variable `name`, or in the file named by `name`_FILE (a compose secret,
    e.g. /run/secrets/oona_signing_key; surrounding whitespace is dropped). None when neither is
    set (or, with `empty_ok`, the file is empty); ValueError when both are, or the file cannot
    be read or is empty."""
    env = os.environ if environ is None else environ
    value, path = env.get(name) or None, env.get(f"{name}_FILE") or None
    if value is not None and path is not None:
        raise ValueError(f"set {name} or {name}_FILE, not both")
    if path is None:
        return value
    try:
        with open(path, encoding="utf-8") as secret:
            text = secret.read().strip()
    except OSError as exc:
        raise ValueError(f"{name}_FILE={path}: cannot read it ({exc.strerror})") from None
    if not text:
        if empty_ok:
            return None
        raise ValueError(f"{name}_FILE={path} is empty")
    return text


def insecure_opt_out(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return env.get("OONA_INSECURE", "").strip().lower() in ("1", "true", "yes")


def require_secrets(service: str, secrets: Mapping[str, object | None], *,
                    insecure: bool) -> None:
    """A fleet service's start-up rule: every secret in `secrets` (variable name -> value read)
    is set, or the service refuses to start (MissingSecret, one line naming the variables);
    with `insecure` (OONA_INSECURE=1) it starts, after one warning saying what is off."""
    missing = [name for name, value in secrets.items() if not value]
    if not missing:
        return
    names = ", ".join(missing)
    if not insecure:
        raise MissingSecret(
            f"{names} not set (nor {'/'.join(f'{n}_FILE' for n in missing)}): {service} refuses "
            "to start unauthenticated; give the fleet's secrets, or set OONA_INSECURE=1 to run "
            "without (anyone who reaches Redis or its ports can then forge; not for production)")
    log.warning("OONA_INSECURE=1: %s runs without %s: forged messages and calls are accepted; "
                "not for production", service, names)
