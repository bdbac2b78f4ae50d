"""Redis ACL users of the fleet, one per service, each with least privilege (docs/security.md).

Which keys a service may write is the boundary: Tamiyo has no key of the field report stream and
Karn none of the command streams, so a forged write there is refused (NOPERM) by Redis itself,
whatever the writer knows of the signing key. A consumer group writes to the stream's key
(XREADGROUP, XACK, XCLAIM), so on Redis >= 7 the streams a service only consumes are granted in
a selector with every command consuming needs and no XADD: the runtime cannot write a command,
Tamiyo no report, ack or epoch event, Karn no field report. Redis 6.2 has no selectors (a user's
commands apply to all its keys): there a consumer can also write the streams it consumes
(docs/security.md, "Not covered yet").

    python -m oona.acl --passwords-dir deploy/secrets [--redis-version 7.0] > users.acl

writes an ACL file (`aclfile`) from `redis_<user>_password` files (deploy/up.sh does this), with
passwords stored as SHA-256 hashes. `user_lines` gives the same users as redis.conf lines (the
embedded fleet, kasmina.fleet_run).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from oona import streams
from oona.envelope import blob_key
from oona.scripts import dedupe_prefix

SERVICES = ("kasmina", "tamiyo", "karn")
# Operators' user (python -m oona streams / dlq / flags): every key and command.
ADMIN = "admin"
USERS = (*SERVICES, ADMIN)
# The default (unauthenticated) user may only PING: health checks (`redis-cli ping`, the embedded
# broker's readiness probe) keep working and nothing else does.
_DEFAULT_USER = "user default on nopass resetchannels -@all +ping"

_CONNECT = ("+ping", "+info", "+select", "+client|setname", "+client|id")
# oona.Publisher and its scripts (oona README, "Publishing as a least-privilege Redis user").
_PUBLISH = ("+evalsha", "+script|load", "+exists", "+set", "+get", "+xadd", "+xlen",
            "+xinfo|groups", "+xinfo|consumers", "+xpending", "+xrange", "+xtrim", "+time")
# Reading a stream in a consumer group (oona.Consumer, the runtime's command inbox), and
# `python -m oona dlq list` run as the service: no XADD.
_CONSUME = ("+evalsha", "+script|load", "+xreadgroup", "+xack", "+xclaim", "+xautoclaim",
            "+xgroup|create", "+xpending", "+xinfo|groups", "+xinfo|consumers", "+xlen",
            "+xrange")
# What a consumer writes outside the streams it reads: their dead letters; and the blobs it reads.
_DEAD_LETTER = ("+evalsha", "+script|load", "+xadd", "+get", "+xrange")
# Tamiyo's job state and leases (tamiyo.store, tamiyo.lease).
_TAMIYO_STATE = ("+hset", "+hget", "+hgetall", "+hkeys", "+hdel", "+sadd", "+srem", "+smembers",
                 "+del", "+pexpire", "+set", "+get", "+multi", "+exec", "+discard")
# Flags read by the runtime and Tamiyo (oona.flags.RedisFlagProvider) and Karn
# (oona.flags.FlagStore).
_FLAGS_READ = ("+hget", "+hgetall", "+xread", "+xrevrange")
# The runtime deletes a job's command stream when the job ends (kasmina.fleet.inbox).
_DELETE = ("+unlink", "+exists")

_COMMAND_KEYS = streams.commands("*").replace("{*}", "*")  # the streams, DLQs, dedupe keys
_FLAG_KEYS = "control.flags.*"
_BLOBS = blob_key(b"") + "*"


def _published(stream: str) -> list[str]:
    """A stream, its dead letters, and its dedupe keys."""
    return [stream, streams.dead_letters(stream), dedupe_prefix(stream) + "*"]


@dataclass(frozen=True)
class _Grant:
    """A user's keys it may write (`writes`, with `commands`) and the streams it only consumes
    (`consumes`, with _CONSUME and `consume_extra`: on Redis >= 7 a selector without XADD)."""

    writes: tuple[str, ...]
    commands: tuple[str, ...]
    consumes: tuple[str, ...] = ()
    consume_extra: tuple[str, ...] = ()
    read_only: tuple[str, ...] = ()  # keys read, never written (flags)


def _grant(user: str) -> _Grant:
    if user == "kasmina":
        return _Grant(
            writes=(*(k for s in (streams.TELEMETRY_SEED_HEALTH, streams.CONTROL_ACKS,
                                  streams.FIELD_REPORTS, streams.EPOCH_EVENTS)
                      for k in _published(s)), _BLOBS, streams.dead_letters(_COMMAND_KEYS)),
            commands=(*_PUBLISH, *_DEAD_LETTER, *_FLAGS_READ),
            consumes=(_COMMAND_KEYS,), consume_extra=_DELETE, read_only=(_FLAG_KEYS,))
    if user == "tamiyo":
        consumed = (streams.TELEMETRY_SEED_HEALTH, streams.CONTROL_ACKS, streams.EPOCH_EVENTS)
        return _Grant(  # flags read for germinations (TAMIYO_FLAGS, tamiyo.blueprints)
            writes=(_COMMAND_KEYS, *map(streams.dead_letters, consumed), _BLOBS, "tamiyo:*"),
            commands=(*_PUBLISH, *_DEAD_LETTER, *_TAMIYO_STATE, *_FLAGS_READ),
            consumes=consumed, read_only=(_FLAG_KEYS,))
    if user == "karn":  # flags read for its rollout metrics (karn.metrics); its search's specs
        return _Grant(writes=(streams.dead_letters(streams.FIELD_REPORTS), _BLOBS,
                              *_published(streams.BLUEPRINT_PROPOSALS)),
                      commands=(*_PUBLISH, *_DEAD_LETTER, *_FLAGS_READ),
                      consumes=(streams.FIELD_REPORTS,), read_only=(_FLAG_KEYS,))
    raise ValueError(f"no ACL rules for user {user!r}; the fleet's users are {', '.join(USERS)}")


def selectors_supported(version: tuple[int, ...]) -> bool:
    return tuple(version[:1]) >= (7,)


def rules(user: str, version: tuple[int, ...] = (7, 0)) -> str:
    """The ACL rules of `user` (no password, no `on`) for a Redis server of `version`."""
    if user == ADMIN:
        return "resetchannels &* ~* +@all"
    grant = _grant(user)
    consume = [*_CONSUME, *grant.consume_extra]
    if not selectors_supported(version):  # 6.2: one set of commands for all of a user's keys
        return "resetchannels " + _line([*grant.writes, *grant.consumes, *grant.read_only],
                                        [*_CONNECT, *grant.commands, *consume])
    root = "resetchannels " + _line(grant.writes, [*_CONNECT, *grant.commands])
    root += "".join(f" %R~{k}" for k in grant.read_only)
    # The selector's keys include the DLQs: a dead-letter script names the stream and its DLQ,
    # and Redis checks a script's keys against one selector (its XADD is checked at the root).
    dlqs = [streams.dead_letters(k) for k in grant.consumes if not k.endswith("*")]
    return root + f" ({_line([*grant.consumes, *dlqs], consume)})"


def _line(keys: list[str] | tuple[str, ...], commands: list[str] | tuple[str, ...]) -> str:
    return " ".join([*(f"~{k}" for k in dict.fromkeys(keys)), "-@all",
                     *dict.fromkeys(commands)])


def _password_rule(password: str) -> str:
    if not password or any(c.isspace() for c in password):
        raise ValueError("a Redis password must be non-empty and without whitespace")
    return "#" + hashlib.sha256(password.encode()).hexdigest()


def user_lines(passwords: Mapping[str, str], version: tuple[int, ...] = (7, 0)) -> list[str]:
    """`user ...` lines (ACL file and redis.conf share the syntax) for the users in `passwords`
    (user -> password), the default user limited to PING first."""
    lines = [_DEFAULT_USER]
    for user, password in passwords.items():
        lines.append(f"user {user} on {_password_rule(password)} {rules(user, version)}")
    return lines


def read_passwords(directory: Path, users: tuple[str, ...] = USERS) -> dict[str, str]:
    """Each user's password from `directory/redis_<user>_password` (compose's secret files)."""
    passwords = {}
    for user in users:
        path = directory / f"redis_{user}_password"
        try:
            passwords[user] = path.read_text().strip()
        except OSError as exc:
            raise ValueError(f"{path}: cannot read it ({exc.strerror})") from None
        if not passwords[user]:
            raise ValueError(f"{path} is empty")
    return passwords


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m oona.acl", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passwords-dir", type=Path, required=True,
                        help="directory with redis_<user>_password files (users: "
                             + ", ".join(USERS) + ")")
    parser.add_argument("--redis-version", default="7.0",
                        help="the server's version: selectors need >= 7 (default 7.0)")
    args = parser.parse_args(argv)
    try:
        version = tuple(int(p) for p in args.redis_version.split("."))
        lines = user_lines(read_passwords(args.passwords_dir), version)
    except ValueError as exc:
        print(f"oona.acl: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
