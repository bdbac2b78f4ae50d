"""Prometheus metrics of Karn. Labels are bounded: `outcome` is one of the four end stages or
"other", `blueprint` a catalog name (the catalog is small, operator-curated data)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from karn.store import OUTCOMES

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
PATHS = ("legacy", "chunked")
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
