"""`python -m oona`: bus admin tools and the embedded broker."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from oona import admin, dead_letters, flags_cli
from oona.connection import Client, connect
from oona.embedded import EmbeddedRedis
from oona.settings import BusSettings


def _serve_embedded(args: argparse.Namespace) -> int:
    directory = Path(args.dir) if args.dir else None
    if directory:
        directory.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with EmbeddedRedis(directory, port=args.port) as broker:
        print(f"OONA_REDIS_URL={broker.url}", flush=True)
        stop.wait()
    return 0


async def _streams(redis: Client, args: argparse.Namespace) -> None:
    print(f"{'stream':<48} {'length':>8}  {'group':<20} {'consumers':>9} {'pending':>8} "
          f"{'lag':>8}")
    for info in await admin.list_streams(redis, args.pattern):
        if not info.groups:
            print(f"{info.name:<48} {info.length:>8}")
        for group in info.groups:
            lag = "?" if group.lag is None else str(group.lag)
            print(f"{info.name:<48} {info.length:>8}  {group.name:<20} {group.consumers:>9} "
                  f"{group.pending:>8} {lag:>8}")


async def _pending(redis: Client, args: argparse.Namespace) -> None:
    for row in await admin.pending_entries(redis, args.stream, args.group, args.count):
        print(f"{row['id']:<24} {row['consumer']:<24} idle {row['idle_ms']:>9} ms  "
              f"deliveries {row['deliveries']}")


async def _dlq_list(redis: Client, args: argparse.Namespace) -> None:
    for letter in await dead_letters.list_dead_letters(redis, args.stream, args.count):
        print(f"{letter.entry_id:<24} {letter.reason:<20} deliveries {letter.deliveries:<3} "
              f"original {letter.original_id}  {letter.detail[:80]}")


async def _dlq_inspect(redis: Client, args: argparse.Namespace) -> None:
    letter = await dead_letters.get_dead_letter(redis, args.stream, args.entry_id)
    if letter is None:
        raise SystemExit(f"no dead letter {args.entry_id} in {args.stream}.dlq")
    print(f"reason: {letter.reason}\ndetail: {letter.detail}\noriginal: {letter.stream} "
          f"{letter.original_id}\ndeliveries: {letter.deliveries}\ngroup: {letter.group} "
          f"consumer: {letter.consumer}")
    print(admin.describe_entry(letter.original_fields))


async def _dlq_replay(redis: Client, args: argparse.Namespace) -> None:
    ids = args.entry_ids
    if args.all:
        ids = [d.entry_id for d in await dead_letters.list_dead_letters(redis, args.stream,
                                                                         count=1_000_000)]
    for new_id in await dead_letters.replay(redis, args.stream, ids, args.settings):
        print(f"replayed as {new_id}")


async def _trim(redis: Client, args: argparse.Namespace) -> None:
    print(f"removed {await admin.trim(redis, args.stream, args.maxlen, args.exact)} entries")


Command = Callable[[Client, argparse.Namespace], Coroutine[Any, Any, None]]


async def _with_redis(command: Command, args: argparse.Namespace) -> None:
    settings = BusSettings.from_dsn(args.url) if args.url else BusSettings.from_env()
    if settings.url is None:
        raise SystemExit("set OONA_REDIS_URL or pass --url (see `python -m oona serve-embedded`)")
    args.settings = settings
    redis = await connect(settings)
    try:
        await command(redis, args)
    finally:
        await redis.aclose()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m oona", description=__doc__)
    parser.add_argument("--url", help="Redis URL (default: $OONA_REDIS_URL)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("flags", add_help=False,  # dispatched before parsing (main)
                   help="feature flags: list, get, set, ramp, kill, audit (flags --help)")

    serve = sub.add_parser("serve-embedded", help="run the embedded redis-server and print its URL")
    serve.add_argument("--port", type=int, default=0,
                       help="TCP port (0: a free one; -1: unix socket only)")
    serve.add_argument("--dir", help="data directory (default: a temporary one, deleted on exit)")
    serve.set_defaults(run=_serve_embedded)

    streams = sub.add_parser("streams", help="streams with length, and per group pending and lag")
    streams.add_argument("--pattern", default="*")
    streams.set_defaults(command_fn=_streams)

    pending = sub.add_parser("pending", help="pending entries of a group")
    pending.add_argument("stream")
    pending.add_argument("group")
    pending.add_argument("--count", type=int, default=100)
    pending.set_defaults(command_fn=_pending)

    dlq = sub.add_parser("dlq", help="dead letters of a stream").add_subparsers(
        dest="dlq_command", required=True)
    dlq_list = dlq.add_parser("list")
    dlq_list.add_argument("stream", help="the original stream (its DLQ is <stream>.dlq)")
    dlq_list.add_argument("--count", type=int, default=100)
    dlq_list.set_defaults(command_fn=_dlq_list)
    inspect = dlq.add_parser("inspect")
    inspect.add_argument("stream")
    inspect.add_argument("entry_id")
    inspect.set_defaults(command_fn=_dlq_inspect)
    replay = dlq.add_parser("replay", help="re-publish dead letters to their stream")
    replay.add_argument("stream")
    replay.add_argument("entry_ids", nargs="*")
    replay.add_argument("--all", action="store_true")
    replay.set_defaults(command_fn=_dlq_replay)

    trim = sub.add_parser("trim", help="trim a stream to a maximum length")
    trim.add_argument("stream")
    trim.add_argument("--maxlen", type=int, required=True)
    trim.add_argument("--exact", action="store_true", help="exact instead of approximate (~)")
    trim.set_defaults(command_fn=_trim)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["flags"]:  # feature flags: their own parser (oona/flags_cli.py)
        return flags_cli.main(argv[1:])
    args = build_parser().parse_args(argv)
    if hasattr(args, "run"):
        if args.port == -1:
            args.port = None
        result: int = args.run(args)
        return result
    asyncio.run(_with_redis(args.command_fn, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
