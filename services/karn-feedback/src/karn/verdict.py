"""`python -m karn verdict`: the guarded rollout's decision from Karn's field reports (DESIGN §9).

Compares the seeds' metric gain on the chunked path (the new one) against the legacy path with
the always-valid sequential test of `karn.sequential` (CUPED on the metric before germination),
prints the comparison as one JSON line and exits 0 (promote or hold) or 3 (roll back), so it
can guard a ramp: `python -m oona flags ramp kasmina.execution_path --off-variant legacy
--on-variant chunked --step-s 604800 --guard-cmd "python -m karn verdict --kill-on-rollback"`
halts the ramp and, with `--kill-on-rollback`, sets the flag's kill switch (every job back to
legacy at its next boundary). `--since` judges a new rollout on the reports received since it
began. Reads KARN_DATABASE_URL (and OONA_REDIS_URL for the kill switch).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from dataclasses import dataclass

from karn.sequential import Comparison, Moments, SequentialConfig, Verdict, compare
from karn.settings import KarnSettings
from karn.store import FieldReportStore

ROLL_BACK_EXIT = 3


@dataclass(frozen=True)
class Decision:
    verdict: Verdict  # HOLD until both paths have min_jobs_per_path reports
    reports: dict[str, int]
    comparison: Comparison


def decide(store: FieldReportStore, config: SequentialConfig | None = None,
           since: datetime.datetime | None = None) -> Decision:
    """The verdict on the chunked path against legacy from the stored reports (those received
    from `since` on, when given): what this command prints and Karn exports."""
    config = config or SequentialConfig()
    paths = store.gains_by_path(since)
    arms = {p: Moments.of(*paths.get(p, ([], []))) for p in ("legacy", "chunked")}
    result = compare(arms["legacy"], arms["chunked"], config)
    return Decision(result.verdict if result.ready else Verdict.HOLD,
                    {p: int(m.n) for p, m in arms.items()}, result)


def _since(text: str) -> datetime.datetime:
    """An ISO 8601 time; without a zone, UTC."""
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an ISO 8601 time, got {text!r}") from None
    return (when if when.tzinfo else when.replace(tzinfo=datetime.UTC)).astimezone(datetime.UTC)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m karn verdict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", help="default: $KARN_DATABASE_URL")
    parser.add_argument("--min-per-path", type=int, default=SequentialConfig.min_jobs_per_path,
                        help="no verdict before each path has this many reports")
    parser.add_argument("--alpha", type=float, default=SequentialConfig.alpha)
    parser.add_argument("--margin", type=float, default=0.0,
                        help="a loss of gain up to this much still promotes (non-inferiority)")
    parser.add_argument("--since", type=_since, metavar="TIME",
                        help="judge only the reports received from TIME on (ISO 8601, UTC "
                        "unless it says otherwise): a new rollout on its own evidence")
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
        decision = decide(store, config, args.since)
    finally:
        store.close()
    result = decision.comparison
    print(json.dumps({
        "verdict": str(decision.verdict), "reports": decision.reports,
        "gain_difference": _number(result.estimate), "lower": _number(result.lower),
        "upper": _number(result.upper), "cuped_theta": _number(result.theta)}))
    if decision.verdict is not Verdict.ROLL_BACK:
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
