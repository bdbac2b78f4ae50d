"""Prometheus metrics of Karn. Labels are bounded: `outcome` is one of the four end stages or
"other", `blueprint` a catalog name (the catalog is small, operator-curated data),
`execution_path` one of PATHS or "other", `flag` a flag key, `verdict` a Verdict.

`ROLLOUT` (RolloutMetrics) exports the migration's success metrics from the database and the
flags' state from Redis (DESIGN §9), refreshed on a thread once `start`ed; until then (and in a
process that never starts it) its series stand at 0."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

from oona import metrics as oona_metrics
from oona.flags import DEFAULT_FLAGS, EXECUTION_PATH, FlagDefinition, FlagStore
from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from karn.sequential import SequentialConfig, Verdict
from karn.store import OUTCOMES, PATHS, FieldReportStore, PathOutcomes

log = logging.getLogger(__name__)

REPORTS_STORED = Counter("karn_field_reports_stored", "Field reports stored (first delivery).",
                         ["outcome"])
REPORT_DUPLICATES = Counter("karn_field_report_duplicates",
                            "Field reports received again (same report_id) and not stored again.")
STORE_ERRORS = Counter("karn_store_errors",
                       "Field reports the database could not take; each is retried.")
STORE_SECONDS = Histogram(
    "karn_store_seconds", "Time to store one field report, commit included.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))
# The rollout's per-path view (DESIGN §9): rollback rate, culls and each path's share of seeds.
REPORTS_BY_PATH = Counter("karn_field_reports_by_path",
                          "Field reports stored, by the execution path the seed grew on.",
                          ["execution_path", "outcome"])
RECOMMENDATIONS = Counter("karn_recommendations",
                          "Recommendations served, by the blueprint ranked first.", ["blueprint"])


def outcome_label(stage: str) -> str:
    return stage if stage in OUTCOMES else "other"


def path_label(path: str) -> str:
    return path if path in PATHS else "other"


# Every outcome's series exists from the start, at 0, so rates and dashboards see it.
for _outcome in (*OUTCOMES, "other"):
    REPORTS_STORED.labels(_outcome)
    for _path in (*PATHS, "other"):
        REPORTS_BY_PATH.labels(_path, _outcome)


# How often the rollout's metrics are recomputed: each refresh scans every stored report (its
# path, outcome, gain and metric before) and reads the flags' hash and audit stream.
ROLLOUT_REFRESH_S = 15.0


class RolloutMetrics(Collector):
    """The guarded rollout as gauges: per path the plan's success metrics (rollback rate,
    failures per 1,000 adaptations, jobs and their share), the sequential test's current
    verdict on kasmina.execution_path (the one `python -m karn verdict` gives with the same
    config), and each flag's rollout percentage, kill switch and ramp state
    (oona.metrics.flag_families). Computed on a daemon thread, never on a scrape; a failed
    refresh keeps the last values and logs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._outcomes: dict[str, PathOutcomes] = {p: PathOutcomes() for p in PATHS}
        self._verdict: Verdict | None = None
        self._flags: dict[str, FlagDefinition] = dict(DEFAULT_FLAGS)
        self._ramp_states: dict[str, str] = dict.fromkeys(DEFAULT_FLAGS, "idle")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        REGISTRY.register(self)

    def start(self, store: FieldReportStore, flags: FlagStore | None,
              config: SequentialConfig | None = None,
              refresh_s: float = ROLLOUT_REFRESH_S) -> None:
        """Refresh now, then every `refresh_s` until `stop()`; without a FlagStore the flags'
        series keep their built-in values."""
        config = config or SequentialConfig()
        self.refresh(store, flags, config)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(store, flags, config, refresh_s),
                                        daemon=True, name="karn-rollout-metrics")
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self, store: FieldReportStore, flags: FlagStore | None, config: SequentialConfig,
             refresh_s: float) -> None:
        while not self._stop.wait(refresh_s):
            try:
                self.refresh(store, flags, config)
            except Exception as exc:  # noqa: BLE001 - a metrics thread must outlive a failure
                log.warning("rollout metrics not refreshed (the last values stay): %s", exc)

    def refresh(self, store: FieldReportStore, flags: FlagStore | None,
                config: SequentialConfig | None = None) -> None:
        from karn.verdict import decide  # the CLI's decision, one home

        outcomes = store.outcomes_by_path()
        verdict = decide(store, config).verdict
        definitions = flags.list() if flags is not None else dict(DEFAULT_FLAGS)
        states = (flags.ramp_states(list(definitions)) if flags is not None
                  else dict.fromkeys(definitions, "idle"))
        with self._lock:
            self._outcomes, self._verdict = outcomes, verdict
            self._flags, self._ramp_states = definitions, states

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            outcomes, verdict = dict(self._outcomes), self._verdict
            definitions, states = dict(self._flags), dict(self._ramp_states)
        rate = GaugeMetricFamily(
            "karn_rollback_rate", "Share of the adaptations (seeds ended, all stored reports) "
            "that ended ROLLED_BACK, for any reason (plan target: < 0.001).",
            labels=["execution_path"])
        failures = GaugeMetricFamily(
            "karn_failures_per_1000_adaptations", "Seeds ROLLED_BACK by a safety rule (not by "
            "an execution path switch) per 1,000 seeds ended (plan target: < 1).",
            labels=["execution_path"])
        jobs = GaugeMetricFamily("karn_jobs_by_path", "Jobs whose latest field report is on "
                                 "the execution path.", labels=["execution_path"])
        share = GaugeMetricFamily("karn_job_share", "Each execution path's share of the jobs "
                                  "Karn has reports of (karn_jobs_by_path / all).",
                                  labels=["execution_path"])
        by_label: dict[str, PathOutcomes] = {}
        for path, o in outcomes.items():  # a path from a newer Kasmina counts as "other"
            seen = by_label.get(path_label(path), PathOutcomes())
            by_label[path_label(path)] = PathOutcomes(
                seen.reports + o.reports, seen.rolled_back + o.rolled_back,
                seen.failures + o.failures, seen.jobs + o.jobs)
        total_jobs = sum(o.jobs for o in by_label.values())
        for label, o in by_label.items():
            rate.add_metric([label], o.rolled_back / o.reports if o.reports else 0.0)
            failures.add_metric([label], 1000.0 * o.failures / o.reports if o.reports else 0.0)
            jobs.add_metric([label], o.jobs)
            share.add_metric([label], o.jobs / total_jobs if total_jobs else 0.0)
        verdicts = GaugeMetricFamily(
            "karn_rollout_verdict", "The sequential test's current verdict on the flag's "
            "rollout (1: this verdict), from every stored report.", labels=["flag", "verdict"])
        for v in Verdict:
            verdicts.add_metric([EXECUTION_PATH, str(v)], 1.0 if v is verdict else 0.0)
        yield from (rate, failures, jobs, share, verdicts)
        yield from oona_metrics.flag_families(definitions, states)


ROLLOUT = RolloutMetrics()
