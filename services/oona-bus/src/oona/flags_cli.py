"""`python -m oona flags`: the operators' feature-flag commands (oona.flags).

    flags list                              every flag: variants served, rollout, kill switch
    flags get FLAG                          one flag's definition (JSON)
    flags set FLAG [--percent P] ...        change a flag (audited)
    flags ramp FLAG --step-s S [--guard-cmd CMD] [--off-variant V --on-variant V]
                                            5 %, then +10 % a step, halting when the guard fails
    flags kill FLAG [--release]             every job back to the default variant (or release)
    flags audit [FLAG]                      who changed what, when
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from typing import Any

from oona.errors import BusUnavailable
from oona.flags import (
    RAMP_INCREMENT,
    RAMP_START,
    ConcurrentFlagChange,
    FlagDefinition,
    FlagKeys,
    FlagStore,
    Guard,
    InvalidFlag,
    UnknownFlag,
    ramp,
    sync_client,
)
from oona.settings import BusSettings

GUARD_TIMEOUT_S = 60.0
RAMP_HALTED = 3  # the exit status of a ramp its guard stopped (2: a usage or connection error)


def _describe(flag: str, d: FlagDefinition) -> str:
    rollout = f"{d.rollout_variant} {d.rollout_percent:g} %" if d.rollout_variant else "-"
    return (f"{flag:<32} {d.default_variant:<14} {rollout:<18} "
            f"{'KILLED' if d.killed else 'on':<7} v{d.version}")


def _list(store: FlagStore, args: argparse.Namespace) -> None:
    print(f"{'flag':<32} {'default':<14} {'rollout':<18} {'state':<7} version")
    for flag, definition in store.list().items():
        print(_describe(flag, definition))


def _get(store: FlagStore, args: argparse.Namespace) -> None:
    print(json.dumps(json.loads(store.get(args.flag).to_json()), indent=2, sort_keys=True))


def _variant(text: str) -> tuple[str, Any]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, json.loads(value)
    except ValueError:
        return name, value  # a bare word is a string variant


def _set(store: FlagStore, args: argparse.Namespace) -> None:
    fields: dict[str, Any] = {}
    if args.variant:
        base = {} if args.replace_variants else dict(_current_variants(store, args.flag))
        fields["variants"] = base | dict(args.variant)
    for option, name in (("default_variant", "default_variant"),
                         ("rollout_variant", "rollout_variant"), ("percent", "rollout_percent"),
                         ("salt", "salt")):
        if getattr(args, option) is not None:
            fields[name] = getattr(args, option)
    if not fields:
        raise InvalidFlag("nothing to set: give --percent, --variant, --default-variant, "
                          "--rollout-variant or --salt")
    print(_describe(args.flag, store.set(args.flag, args.actor, **fields)))


def _current_variants(store: FlagStore, flag: str) -> dict[str, Any]:
    try:
        return dict(store.get(flag).variants)
    except UnknownFlag:
        return {}


def _guard(command: str | None) -> Guard | None:
    if command is None:
        return None
    argv = shlex.split(command)

    def run(definition: FlagDefinition) -> str | None:
        env = os.environ | {"OONA_FLAG_PERCENT": f"{definition.rollout_percent:g}"}
        try:
            done = subprocess.run(argv, env=env, capture_output=True, text=True,
                                  timeout=GUARD_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            return f"guard {command!r} gave no answer within {GUARD_TIMEOUT_S:g} s"
        if done.returncode == 0:
            return None
        tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or [""]
        return f"guard {command!r} exited {done.returncode}: {tail[0][:200]}"

    return run


def _ramp(store: FlagStore, args: argparse.Namespace) -> int:
    def sleep(seconds: float) -> None:
        print(f"next step in {seconds:g} s", flush=True)
        time.sleep(seconds)

    outcome = ramp(store, args.flag, args.actor, step_s=args.step_s, guard=_guard(args.guard_cmd),
                   start=args.start, increment=args.increment, target=args.target,
                   off_variant=args.off_variant, on_variant=args.on_variant, sleep=sleep)
    if outcome.completed:
        print(f"{args.flag}: ramp completed at {outcome.percent:g} %")
        return 0
    print(f"{args.flag}: ramp halted at {outcome.percent:g} %: {outcome.halted_reason}")
    return RAMP_HALTED


def _kill(store: FlagStore, args: argparse.Namespace) -> None:
    print(_describe(args.flag, store.kill(args.flag, args.actor, args.reason,
                                          release=args.release)))


def _audit(store: FlagStore, args: argparse.Namespace) -> None:
    for entry in store.audit(args.flag, args.count):
        when = datetime.datetime.fromtimestamp(entry.when, datetime.UTC).isoformat(
            timespec="seconds")
        old = f"{entry.old.rollout_percent:g} %{' killed' if entry.old.killed else ''}" \
            if entry.old else "(built-in)"
        new = f"{entry.new.rollout_percent:g} %{' killed' if entry.new.killed else ''}"
        print(f"{when} {entry.flag:<32} {entry.action:<10} {entry.who:<24} v{entry.new.version} "
              f"{old} -> {new}{'  ' + entry.reason if entry.reason else ''}")


def _default_actor() -> str:
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no passwd entry for this uid (containers)
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m oona flags", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="Redis URL (default: $OONA_REDIS_URL)")
    parser.add_argument("--namespace", default=FlagKeys.namespace,
                        help="the flag set (default: %(default)s)")
    parser.add_argument("--actor", default=_default_actor(),
                        help="who the audit entries name (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every flag").set_defaults(fn=_list)
    get = sub.add_parser("get", help="one flag's definition as JSON")
    get.add_argument("flag")
    get.set_defaults(fn=_get)

    set_ = sub.add_parser("set", help="change a flag")
    set_.add_argument("flag")
    set_.add_argument("--percent", type=float, help="rollout percentage of the rollout variant")
    set_.add_argument("--default-variant")
    set_.add_argument("--rollout-variant")
    set_.add_argument("--variant", type=_variant, action="append",
                      help="NAME=VALUE (JSON, or a bare word for a string); repeatable")
    set_.add_argument("--replace-variants", action="store_true",
                      help="the --variant options are the whole set (default: added)")
    set_.add_argument("--salt", help="a new salt reshuffles which jobs are in the rollout")
    set_.set_defaults(fn=_set)

    ramp_ = sub.add_parser("ramp", help="raise the rollout step by step while the guard holds")
    ramp_.add_argument("flag")
    ramp_.add_argument("--step-s", type=float, required=True,
                       help="seconds between steps (a week in production: 604800)")
    ramp_.add_argument("--start", type=float, default=RAMP_START)
    ramp_.add_argument("--increment", type=float, default=RAMP_INCREMENT)
    ramp_.add_argument("--target", type=float, default=100.0)
    ramp_.add_argument("--guard-cmd", help="run before each step (OONA_FLAG_PERCENT set); a "
                       "non-zero exit halts the ramp")
    ramp_.add_argument("--off-variant", help="what the jobs outside the rollout (and every job "
                       "while killed) get: the flag's default variant from the first step on "
                       "(default: the flag's own; legacy for kasmina.execution_path)")
    ramp_.add_argument("--on-variant", help="the variant ramped (default: the flag's rollout "
                       "variant; chunked for kasmina.execution_path)")
    ramp_.set_defaults(fn=_ramp)

    kill = sub.add_parser("kill", help="the kill switch: every job gets the default variant")
    kill.add_argument("flag")
    kill.add_argument("--release", action="store_true", help="turn the kill switch off")
    kill.add_argument("--reason", default="")
    kill.set_defaults(fn=_kill)

    audit = sub.add_parser("audit", help="the audit stream, oldest first")
    audit.add_argument("flag", nargs="?")
    audit.add_argument("--count", type=int, default=50)
    audit.set_defaults(fn=_audit)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = BusSettings.from_dsn(args.url) if args.url else BusSettings.from_env()
        if settings.url is None:
            print("error: OONA_REDIS_URL is not set (or pass --url): flags live in the fleet's "
                  "Redis", file=sys.stderr)
            return 2
        client = sync_client(settings)
        try:
            rc: int | None = args.fn(FlagStore(client, FlagKeys(args.namespace)), args)
        finally:
            client.close()
    except (InvalidFlag, UnknownFlag, ConcurrentFlagChange, BusUnavailable, ValueError) as exc:
        message = f"unknown flag {exc.args[0]}" if isinstance(exc, UnknownFlag) else str(exc)
        print(f"error: {message}", file=sys.stderr)
        return 2
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
