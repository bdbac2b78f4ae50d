"""Every metric the Grafana dashboard and the alert rules query is one the services really export.

The names come from a live scrape: the embedded broker, `python -m karn`, `python -m tamiyo` and
`python -m kasmina serve` as real processes, a short digits job submitted over gRPC and run to
the end (so per-job series exist), then each /metrics. A metric family declared in a scrape
(`# TYPE`) exports its samples by type (counter `_total`, histogram `_bucket/_sum/_count`);
training and seed metrics (`kasmina_*`) must also have samples after the job, since an empty
family would leave its panel blank forever."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from oona.embedded import free_port
from oona.proto.kasmina.runtime.v1 import runtime_service_pb2 as pb
from oona.proto.kasmina.runtime.v1 import runtime_service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration
yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the alert rules")

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
# Series Prometheus makes itself for every target, not exported by any service.
PROMETHEUS_SYNTHETIC = {"up"}
# Counted only when something goes wrong (a dead letter, a full outbox): no samples in a
# healthy run, so their labels are not checked against a scrape.
EVENT_DRIVEN = {"oona_dead_lettered_total", "oona_dropped_total"}
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "untyped": ("",),
            "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("", "_sum", "_count", "_created"), "info": ("_info",)}
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
             "unless", "offset", "bool", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (Grafana variables allowed): strip strings, label
    matchers, ranges and grouping clauses, then keep identifiers that are not functions."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[a-zA-Z_:][\w:]*", expr):
        following = expr[match.end():].lstrip()
        if not following.startswith("(") and match.group(0).lower() not in _KEYWORDS:
            names.add(match.group(0))
    return names


def test_promql_metric_names_parses_what_the_dashboard_uses() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, job) (rate(kasmina_epoch_seconds_bucket'
            '{job=~"$job", stage!="x y"}[$__rate_interval]))) / on (job) '
            'sum(rate(x_total[1d] offset 15m)) > 3 * up and absent(up{job="k"})')
    assert promql_metric_names(expr) == {"kasmina_epoch_seconds_bucket", "x_total", "up"}


def _dashboard_queries() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "kasmina-fleet.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    queries = [t["expr"] for p in panels for t in p["targets"]]
    for variable in dashboard["templating"]["list"]:
        queries.append(re.sub(r"label_values\((\w+),\s*\w+\)", r"\1",
                              variable["query"]["query"]))
    assert all(p["targets"] for p in panels), "a panel without a query"
    return queries


def _alert_queries() -> list[str]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [r["expr"] for group in rules["groups"] for r in group["rules"]]


def _get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
        return reply.read().decode()


def _start(args: list[str], env: dict[str, str], http_port: int, log: Path) -> subprocess.Popen:
    with log.open("wb") as sink:
        process = subprocess.Popen([sys.executable, "-m", *args], env={**os.environ, **env},
                                   stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while True:
        assert process.poll() is None, f"{args} exited:\n{log.read_text()}"
        try:
            _get(http_port, "/readyz")
            return process
        except OSError:
            assert time.monotonic() < deadline, f"{args} not ready:\n{log.read_text()}"
            time.sleep(0.2)


@pytest.fixture(scope="module")
def scrapes(oona_redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Karn, Tamiyo and the runtime as processes; an 8-epoch digits job; each one's /metrics."""
    tmp = tmp_path_factory.mktemp("fleet")
    bus = {"OONA_REDIS_URL": oona_redis_url}
    ports = {name: (free_port(), free_port()) for name in ("karn", "tamiyo", "kasmina")}
    processes = []
    try:
        processes.append(_start(["karn"], {**bus, "KARN_DATABASE_URL": f"sqlite:///{tmp}/k.db",
                                           "KARN_GRPC_PORT": str(ports["karn"][0]),
                                           "KARN_HTTP_PORT": str(ports["karn"][1])},
                                ports["karn"][1], tmp / "karn.log"))
        processes.append(_start(["tamiyo"], {**bus, "TAMIYO_GRPC_PORT": str(ports["tamiyo"][0]),
                                             "TAMIYO_HTTP_PORT": str(ports["tamiyo"][1]),
                                             "TAMIYO_KARN_ADDRESS": f"127.0.0.1:{ports['karn'][0]}",
                                             # Germinate at the first epoch boundary,
                                             # so commands and acks have samples too.
                                             "TAMIYO_PLATEAU_EPOCHS": "1",
                                             "TAMIYO_MIN_DELTA": "100",
                                             "TAMIYO_TICK_S": "0.1",
                                             "TAMIYO_REPORT_GRACE_S": "0.2"},
                                ports["tamiyo"][1], tmp / "tamiyo.log"))
        processes.append(_start(["kasmina", "serve"], {
            **bus, "KASMINA_GRPC_PORT": str(ports["kasmina"][0]),
            "KASMINA_HTTP_PORT": str(ports["kasmina"][1]),
            "KASMINA_CHECKPOINT_DIR": str(tmp / "ckpt")}, ports["kasmina"][1], tmp / "k.log"))
        with grpc.insecure_channel(f"127.0.0.1:{ports['kasmina'][0]}") as channel:
            stub = pb_grpc.KasminaRuntimeStub(channel)
            job = f"deploy-metrics-{os.getpid()}"
            stub.SubmitJob(pb.SubmitJobRequest(job_id=job, recipe="digits",
                                               parameters={"epochs": "8"}), timeout=30)
            states = [u.state for u in stub.WatchJob(pb.WatchJobRequest(job_id=job), timeout=120)]
        assert states[-1] == pb.JobState.JOB_STATE_SUCCEEDED, (tmp / "k.log").read_text()
        time.sleep(1.0)  # let Tamiyo and Karn consume the job's last messages
        yield {name: _get(http, "/metrics") for name, (_, http) in ports.items()}
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


def _exported(scrapes: dict[str, str]) -> tuple[set[str], set[str]]:
    """(every series name the scrapes declare, the names that have samples now)."""
    declared, sampled = set(), set()
    for text in scrapes.values():
        for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE):
            if kind == "counter":  # the 0.0.4 text format names a counter with its _total
                name = name.removesuffix("_total")
            declared |= {name + suffix for suffix in SUFFIXES[kind]}
        sampled |= set(re.findall(r"^([a-zA-Z_:][\w:]*)(?:\{| )", text, re.MULTILINE))
    return declared, sampled


def promql_label_names(expr: str) -> set[str]:
    """Label names a PromQL expression matches on or groups by."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    labels = {m for body in re.findall(r"\{([^}]*)\}", expr)
              for m in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", body)}
    for clause in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        labels |= {label.strip() for label in clause.split(",") if label.strip()}
    return labels


def _stored_labels(scrapes: dict[str, str]) -> dict[str, set[str]]:
    """Label names of each series as Prometheus stores it: the scrape job's `job` and `instance`
    win and a service's own are renamed `exported_*`, then prometheus.yml's relabelling."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    rules = {job["job_name"]: job.get("metric_relabel_configs", [])
             for job in config["scrape_configs"]}
    stored: dict[str, set[str]] = {"up": {"job", "instance"}}
    for service, text in scrapes.items():
        for name, body in re.findall(r"^([a-zA-Z_:][\w:]*)(?:\{([^}]*)\})? ", text, re.MULTILINE):
            labels = {f"exported_{n}" if n in ("job", "instance") else n
                      for n in re.findall(r'(\w+)="', body)}
            for rule in rules[service]:
                if rule.get("action", "replace") == "replace":
                    if set(rule["source_labels"]) <= labels:
                        labels.add(rule["target_label"])
                elif rule["action"] == "labeldrop":
                    labels = {n for n in labels if not re.fullmatch(rule["regex"], n)}
                else:
                    raise AssertionError(f"relabel action this test cannot model: {rule}")
            stored.setdefault(name, set()).update(labels | {"job", "instance"})
    return stored


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_queries_use_labels_the_stored_series_have(scrapes: dict[str, str], source: str) -> None:
    stored = _stored_labels(scrapes)
    for expr in _dashboard_queries() if source == "dashboard" else _alert_queries():
        for part in _operands(expr):
            for name in promql_metric_names(part):
                if name not in stored:  # no sample yet: its labels cannot be seen
                    assert name in EVENT_DRIVEN, f"{name}: no samples after a job ran"
                    continue
                missing = promql_label_names(part) - stored.get(name, set())
                assert not missing, f"{name} has no label {sorted(missing)} in Prometheus: {expr}"


def _operands(expr: str) -> list[str]:
    """The two sides of a filter `A and on (l) B` (or `unless on`), each with the `on` labels:
    A's grouping does not apply to B, which only needs the labels it is matched on."""
    left, on, right = (re.split(r"\b(?:and|unless)\s+on\s*(\([^)]*\))", expr, maxsplit=1)
                       + ["", ""])[:3]
    return [left + f" on {on}", right + f" on {on}"] if on else [expr]


def test_operands_split_a_filter_from_what_it_filters() -> None:
    expr = 'sum by (layer) (a{x="1"} and on (job_id) (increase(b[5m]) > 0))'
    left, right = _operands(expr)
    assert promql_metric_names(left) == {"a"} and promql_label_names(left) == {"layer", "x",
                                                                                 "job_id"}
    assert promql_metric_names(right) == {"b"} and promql_label_names(right) == {"job_id"}


def test_dashboard_queries_name_exported_metrics(scrapes: dict[str, str]) -> None:
    declared, sampled = _exported(scrapes)
    used = set().union(*map(promql_metric_names, _dashboard_queries()))
    assert len(used) >= 20, sorted(used)  # the parser found the dashboard's metrics
    assert not used - declared - PROMETHEUS_SYNTHETIC, \
        f"dashboard queries metrics no service exports: {sorted(used - declared - {'up'})}"
    per_job = {name for name in used if name.startswith("kasmina_")}
    assert not per_job - sampled, f"no samples after a job ran: {sorted(per_job - sampled)}"
    # Each service's panels are fed: karn_, tamiyo_, oona_ families are used.
    assert {n.split("_")[0] for n in used} >= {"kasmina", "tamiyo", "karn", "oona"}


def test_alert_rules_name_exported_metrics(scrapes: dict[str, str]) -> None:
    declared, _ = _exported(scrapes)
    used = set().union(*map(promql_metric_names, _alert_queries()))
    assert used - PROMETHEUS_SYNTHETIC, "no metric found in the alert rules"
    assert not used - declared - PROMETHEUS_SYNTHETIC, \
        f"alert rules query metrics no service exports: {sorted(used - declared - {'up'})}"


def test_the_migration_row_is_fed_by_karn_from_birth(scrapes: dict[str, str]) -> None:
    """The migration row (jobs per path, canary percentage, guard, rollbacks, A/B verdict) reads
    what Karn exports: its rollout metrics and the flags' state, every series there at 0 before
    any rollout, so a panel is never blank and the first change is a change."""
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "kasmina-fleet.json").read_text())
    rows = [i for i, p in enumerate(dashboard["panels"]) if p["type"] == "row"]
    start = next(i for i in rows if dashboard["panels"][i]["title"].startswith("Migration"))
    end = next((i for i in rows if i > start), len(dashboard["panels"]))
    used = set().union(*(promql_metric_names(t["expr"])
                         for p in dashboard["panels"][start + 1:end] for t in p["targets"]))
    assert used >= {"karn_jobs_by_path", "oona_flag_rollout_percent", "oona_flag_ramp_state",
                    "oona_flag_killed", "karn_rollback_rate", "karn_rollout_verdict",
                    "karn_failures_per_1000_adaptations", "karn_field_reports_by_path_total"}
    _, sampled = _exported({"karn": scrapes["karn"]})
    assert not used - sampled, f"not in Karn's scrape: {sorted(used - sampled)}"
    karn = scrapes["karn"]
    assert 'karn_job_share{execution_path="chunked"}' in karn  # the plan's share of jobs
    assert re.search(r'^oona_flag_ramp_state\{flag="kasmina.execution_path",state="idle"\} 1\.0$',
                     karn, re.MULTILINE), "the execution path's ramp is idle before any rollout"
