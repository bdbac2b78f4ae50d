"""deploy/grafana: the provisioned data source, the dashboard provider and the compose mounts
agree, and the dashboard is well formed (its queries are checked against a live scrape in
test_deploy_metrics.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the provisioning files")

GRAFANA = Path(__file__).resolve().parents[2] / "deploy" / "grafana"
SECTIONS = ("Fleet overview", "Training (per job)", "Seeds", "Karn and Tamiyo",
            "Migration (execution paths)")


def _dashboard() -> dict:
    return json.loads((GRAFANA / "dashboards" / "kasmina-fleet.json").read_text())


def test_panels_use_the_provisioned_data_source() -> None:
    sources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
                             .read_text())["datasources"]
    assert [s["uid"] for s in sources] == ["prometheus"]
    assert sources[0]["url"] == "http://prometheus:9090"
    panels = [p for p in _dashboard()["panels"] if p["type"] != "row"]
    for panel in panels:
        uids = {panel["datasource"]["uid"], *(t["datasource"]["uid"] for t in panel["targets"])}
        assert uids == {"prometheus"}, panel["title"]


def test_provider_path_is_mounted_and_holds_the_home_dashboard() -> None:
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "kasmina.yml")
                              .read_text())["providers"][0]
    compose = yaml.safe_load((GRAFANA.parent / "docker-compose.yml").read_text())
    grafana = compose["services"]["grafana"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in grafana["volumes"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/kasmina-fleet.json"


def test_dashboard_layout_and_sections() -> None:
    dashboard = _dashboard()
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "duplicate panel ids"
    assert [p["title"] for p in panels if p["type"] == "row"] == list(SECTIONS)
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
    cells = [(p["gridPos"]["y"], p["gridPos"]["x"]) for p in panels]
    assert len(set(cells)) == len(cells), "overlapping panels"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    exprs = " ".join(t["expr"] for p in panels if p["type"] != "row" for t in p["targets"])
    assert variables == {"job"} and '=~"$job"' in exprs
