"""How the swarm sees a peer, with real daemons on 127.0.0.1: what the peer joined through
says at start, a volunteer nobody can reach switching to client mode on its own, a wrong
clock named in one line, and ``mergeswarm doctor``. (Peers behind a real NAT: the network
lab, tests/test_lab.py.)"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from node.training.tiny_model import CORPUS
from tests.swarm import MERGESWARM, run_cli, start_peer, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
# libfaketime, as Debian's faketime installs it (scripts/install_system.sh)
FAKETIME = next(iter(sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))), None)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _volunteer(tmp_path: Path, join: str, *extra: str, env: dict | None = None):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS))
    return start_peer(
        tmp_path / "v", "--join", join, "--data", str(data), *extra, command="node", env=env
    )


def test_a_peer_that_joins_learns_it_is_reachable_its_address_and_its_clock(local_peer):
    first = local_peer("first")
    second = local_peer("second", join=first.maddrs[:1])
    seen = second.reachability
    assert seen is not None and seen.reachable
    assert set(seen.reachable) <= set(second.maddrs)
    assert seen.observed.startswith("/ip4/127.0.0.1/tcp/")
    assert abs(seen.skew) < 1.0


def test_a_volunteer_nobody_can_reach_switches_to_client_mode_on_its_own(tmp_path):
    seed = start_peer(tmp_path / "seed", "--no-mirror")
    closed = f"/ip4/127.0.0.1/tcp/{_closed_port()}"  # what a NAT's inside address looks like
    volunteer = _volunteer(tmp_path, seed.maddrs[0], "--announce-maddr", closed)
    wait_for(lambda: "client mode: serves nobody" in volunteer.log.read_text(), 60, "the switch")
    log = volunteer.log.read_text()
    assert f"could not open a connection to any of {closed}" in log
    assert "(the swarm cannot reach this peer)" in log
    assert volunteer.proc.poll() is None  # and it runs on


@pytest.mark.skipif(FAKETIME is None, reason="needs faketime (scripts/install_system.sh)")
def test_a_volunteer_whose_clock_is_off_is_told_so_in_one_line(tmp_path):
    seed = start_peer(tmp_path / "seed", "--no-mirror")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS))
    skewed = os.environ | {"LD_PRELOAD": str(FAKETIME), "FAKETIME": "+60s",
                           "DONT_FAKE_MONOTONIC": "1"}  # fmt: skip
    argv = [MERGESWARM, "node", "--data-dir", str(tmp_path / "v"), "--host-maddr",
            "/ip4/127.0.0.1/tcp/0", "--join", seed.maddrs[0], "--data", str(data)]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=skewed)
    assert out.returncode == 1
    (error,) = [ln for ln in out.stderr.splitlines() if ln.startswith("mergeswarm: error")]
    assert error.startswith("mergeswarm: error: clock: 60 s ahead of the swarm's peers' clocks")
    assert "NTP" in error


def test_doctor_passes_a_working_swarm_and_names_what_is_missing_in_another(tmp_path, tiny_base):
    config = tmp_path / "swarm.toml"
    out = run_cli("init", "--genesis", str(tiny_base), "-o", str(config),
                  "--aggregator-dir", str(tmp_path / "agg"), timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    agg = start_peer(tmp_path / "agg", "--config", str(config), "--genesis", str(tiny_base),
                     "--heartbeat-every", "1", command="aggregator")  # fmt: skip
    doctor = ("doctor", "--host-maddr", "/ip4/127.0.0.1/tcp/0", "--join")
    wait_for(lambda: "published head" in agg.log.read_text(), 60, "the genesis head")
    out = run_cli(*doctor, agg.maddrs[0], timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    verdicts = {ln.split()[1]: ln.split()[0] for ln in out.stdout.splitlines()}
    assert verdicts == {name: "ok" for name in
                        ("join", "clock", "reachable", "config", "aggregators", "head", "blobs")}  # fmt: skip

    lone = start_peer(tmp_path / "lone", "--no-mirror")  # a swarm with no config, no head
    out = run_cli(*doctor, lone.maddrs[0], timeout=120)
    assert out.returncode == 1
    assert out.stdout.splitlines()[-1].startswith("FAIL  config")
    assert "is an aggregator of this swarm running?" in out.stdout


def test_doctor_says_what_to_do_when_the_join_peer_is_not_there(tmp_path):
    port = _closed_port()
    nobody = f"/ip4/127.0.0.1/tcp/{port}/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
    out = run_cli("doctor", "--host-maddr", "/ip4/127.0.0.1/tcp/0", "--join", nobody, timeout=120)
    assert out.returncode == 1
    assert out.stdout.startswith("FAIL  join") and "its port is open" in out.stdout
