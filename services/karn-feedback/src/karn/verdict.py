"""`python -m karn verdict`: the guarded rollout's decision from Karn's field reports (DESIGN §9).

Compares the seeds' metric gain on the chunked path (the new one) against the legacy path with
the always-valid sequential test of `karn.sequential` (CUPED on the metric before germination),
prints the comparison as one JSON line and exits 0 (promote or hold) or 3 (roll back), so it
can guard a ramp: `python -m oona flags ramp kasmina.execution_path --guard-cmd "python -m karn
verdict --kill-on-rollback"` halts the ramp and, with `--kill-on-rollback`, sets the flag's
kill switch (every job back to legacy at its next boundary). Reads KARN_DATABASE_URL (and
OONA_REDIS_URL for the kill switch).
"""

from __future__ import annotations

import argparse
import json
import sys

from karn.sequential import Moments, SequentialConfig, Verdict, compare
from karn.settings import KarnSettings
from karn.store import FieldReportStore

ROLL_BACK_EXIT = 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m karn verdict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", help="default: $KARN_DATABASE_URL")
    parser.add_argument("--min-per-path", type=int, default=SequentialConfig.min_jobs_per_path,
                        help="no verdict before each path has this many reports")
    parser.add_argument("--alpha", type=float, default=SequentialConfig.alpha)
    parser.add_argument("--margin", type=float, default=0.0,
                        help="a loss of gain up to this much still promotes (non-inferiority)")
    parser.add_argument("--kill-on-rollback", action="store_true",
                        help="on a roll back, set kasmina.execution_path's kill switch")
    args = parser.parse_args(argv)
    try:
        url = args.database_url or KarnSettings.from_env().database_url
        config = SequentialConfig(alpha=args.alpha, min_jobs_per_path=args.min_per_path,
                                  margin=args.margin)
    except ValueError as exc:
        print(f"karn verdict: {exc}", file=sys.stderr)
        return 2
    store = FieldReportStore.open(url)
    try:
        paths = store.gains_by_path()
    finally:
        store.close()
    arms = {p: Moments.of(*paths.get(p, ([], []))) for p in ("legacy", "chunked")}
    result = compare(arms["legacy"], arms["chunked"], config)
    verdict = result.verdict if result.ready else Verdict.HOLD
    print(json.dumps({
        "verdict": str(verdict), "reports": {p: int(m.n) for p, m in arms.items()},
        "gain_difference": _number(result.estimate), "lower": _number(result.lower),
        "upper": _number(result.upper), "cuped_theta": _number(result.theta)}))
    if verdict is not Verdict.ROLL_BACK:
        return 0
    if args.kill_on_rollback:
        import oona
        from oona.flags import EXECUTION_PATH, FlagStore, sync_client
        settings = oona.BusSettings.from_env()
        if settings.url is None:
            print("karn verdict: --kill-on-rollback needs OONA_REDIS_URL", file=sys.stderr)
            return 2
        FlagStore(sync_client(settings)).kill(EXECUTION_PATH, "karn verdict",
                                              reason="sequential test: roll back")
    return ROLL_BACK_EXIT


def _number(value: object) -> float | None:
    number = float(value)  # type: ignore[arg-type]
    return number if number == number and abs(number) != float("inf") else None
