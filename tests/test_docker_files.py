"""docker/ checked without a Docker engine: the compose file against the compose schema
(docker-compose), Prometheus's config and alert rules with promtool (and the rules' own
unit tests), the Grafana provisioning and dashboard JSON by structure."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DOCKER = Path(__file__).resolve().parent.parent / "docker"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (scripts/install_system.sh installs it)")
    return path


def _run(*cmd: str, cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_the_compose_file_is_valid_and_wires_the_swarm():
    text = _run(_tool("docker-compose"), "-f", "compose.yaml", "config", cwd=DOCKER)
    services = yaml.safe_load(text)["services"]
    roles = {"aggregator-1", "aggregator-2", "monitor", "prometheus", "grafana"}
    assert roles <= set(services)
    assert len([s for s in services if s.startswith("volunteer-")]) == 3
    assert services["grafana"]["ports"][0]["published"] in (3000, "3000")
    scraped = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    targets = {
        t.split(":")[0]
        for job in scraped["scrape_configs"]
        for cfg in job["static_configs"]
        for t in cfg["targets"]
    }
    assert targets <= set(services)  # Prometheus scrapes services that exist
    assert "monitor" in targets


def test_prometheus_config_and_rules_pass_promtool():
    promtool = _tool("promtool")
    _run(promtool, "check", "config", "prometheus.yml", cwd=DOCKER / "prometheus")
    out = _run(promtool, "check", "rules", "rules.yml", cwd=DOCKER / "prometheus")
    assert "4 rules found" in out
    _run(promtool, "test", "rules", "rules_test.yml", cwd=DOCKER / "prometheus")


def test_the_dashboard_is_provisioned_against_the_prometheus_datasource():
    datasource = yaml.safe_load(
        (DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"][0]
    provider = yaml.safe_load(
        (DOCKER / "grafana" / "provisioning" / "dashboards" / "mergeswarm.yml").read_text()
    )["providers"][0]
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in mounts
    dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "mergeswarm.json").read_text())
    assert dashboard["title"] == "mergeswarm swarm" and dashboard["uid"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["title"] and panel["type"] in ("stat", "timeseries")
        assert panel["datasource"]["uid"] == datasource["uid"]
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"])
