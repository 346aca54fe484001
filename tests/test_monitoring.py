"""A real Prometheus scraping a live local swarm: every dashboard query returns data.

An aggregator, two volunteers and the monitor run as daemons on 127.0.0.1;
Prometheus (Debian's package, which .ci/run installs) scrapes them every
second with docker/prometheus/rules.yml loaded. Every PromQL expression of the
Grafana dashboard must return a series, so dashboard and metrics cannot drift
apart.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from protocol.swarm_config import load_swarm_config
from tests.swarm import register_process, run_cli, start_peer, wait_for
from tests.test_aggregator import TRAIN, _data

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
DOCKER = Path(__file__).resolve().parent.parent / "docker"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port(peer) -> int:
    path = peer.data_dir / "metrics_port"
    return int(wait_for(lambda: path.is_file() and path.read_text().strip(), 60, "metrics port"))


def _query(base: str, expr: str) -> list:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    reply = json.loads(urllib.request.urlopen(url, timeout=10).read())
    assert reply["status"] == "success", reply
    return reply["data"]["result"]


def test_every_dashboard_query_returns_data_from_a_live_swarm(tmp_path, tiny_base):
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.fail("Debian's package `prometheus` is not installed (.ci/run installs it)")
    config_path = tmp_path / "swarm.toml"
    out = run_cli(
        "init", "--genesis", str(tiny_base), "-o", str(config_path), "--round-period", "2",
        "--min-deltas", "2", "--staleness", "0", "--drop-rate", "0.5",
        "--aggregator-dir", str(tmp_path / "agg"), timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    config = load_swarm_config(config_path)
    metrics = ("--metrics-port", "0", "--heartbeat-every", "1")
    agg = start_peer(
        tmp_path / "agg", "--config", str(config_path), "--genesis", str(tiny_base), *metrics,
        command="aggregator",
    )  # fmt: skip
    join = agg.maddrs[0]
    volunteers = [
        start_peer(
            tmp_path / f"v{i}",
            "--join",
            join,
            "--data",
            str(_data(tmp_path, i)),
            *TRAIN,
            "--metrics-port",
            "0",
            command="node",
        )  # fmt: skip
        for i in range(2)
    ]
    monitor = start_peer(
        tmp_path / "monitor", "--join", join, "--swarm-id", config.swarm_id, *metrics,
        command="monitor",
    )  # fmt: skip
    targets = {
        "aggregator": [_port(agg)],
        "volunteer": [_port(v) for v in volunteers],
        "monitor": [_port(monitor)],
    }
    shutil.copy(DOCKER / "prometheus" / "rules.yml", tmp_path / "rules.yml")
    scrape = [
        {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in ports]}]}
        for job, ports in targets.items()
    ]
    prom_config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp_path / "rules.yml")],
        "scrape_configs": scrape,
    }
    (tmp_path / "prometheus.yml").write_text(json.dumps(prom_config))  # JSON is YAML
    web = f"127.0.0.1:{_free_port()}"
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address={web}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    register_process(proc)
    base = f"http://{web}"

    def scraped() -> bool:
        try:
            up = _query(base, "up")
        except OSError:
            return False
        return len(up) == 4 and all(r["value"][1] == "1" for r in up)

    wait_for(scraped, 60, "Prometheus to scrape all four daemons")
    wait_for(
        lambda: (r := _query(base, "mergeswarm_swarm_head_round")) and float(r[0]["value"][1]) >= 1,
        300,
        "a round merged, seen through the monitor",
    )
    time.sleep(5)  # a few more scrapes, for the rate() windows
    dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "mergeswarm.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 10
    empty = []
    for expr in exprs:
        deadline = time.monotonic() + 30
        while not _query(base, expr):
            if time.monotonic() > deadline:
                empty.append(expr)
                break
            time.sleep(1)
    assert not empty, f"dashboard queries with no data: {empty}"
    rules = json.loads(urllib.request.urlopen(f"{base}/api/v1/rules", timeout=10).read())
    names = {r["name"] for g in rules["data"]["groups"] for r in g["rules"]}
    assert {"MergeswarmStalled", "MergeswarmNoLeaseHolder"} <= names

    # The same picture in a terminal, for people who run no Grafana.
    loopback = ("--host-maddr", "/ip4/127.0.0.1/tcp/0")
    out = run_cli("status", "--join", join, *loopback, "--json", timeout=120)
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    roles = sorted(p["role"] for p in status["peers"])
    assert roles == ["aggregator", "monitor", "volunteer", "volunteer"]
    assert status["swarm_id"] == config.swarm_id and status["head"]["round"] >= 1
    assert all(p["lag"] is not None for p in status["peers"] if p["role"] == "volunteer")
    table = run_cli("status", "--join", join, *loopback, timeout=120)
    assert table.returncode == 0 and f"swarm   {config.swarm_id}" in table.stdout
    assert table.stdout.count("volunteer") == 2
