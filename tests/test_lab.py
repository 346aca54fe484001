"""The swarm across real networks (node/demo/lab.py): volunteers behind a NAT and on a slow,
lossy link get their deltas merged, and a partitioned aggregator's round is finished by the
other. Every daemon is the real CLI in its own network namespace."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from node.daemon.faults import PAUSE_ENV
from node.daemon.launch import PeerStartError
from node.demo.lab import (
    MERGESWARM,
    PORT,
    TRAIN,
    Lab,
    lab_unavailable,
    leftovers,
    log_records,
)
from node.training.tiny_model import CORPUS
from protocol.swarm_config import load_swarm_config
from tests.swarm import register_process, run_cli, wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(lab_unavailable() is not None, reason=str(lab_unavailable())),
]


@pytest.fixture
def lab():
    made = Lab()
    try:
        yield made
    finally:
        made.close()
        assert leftovers(made.tag) == []


def _daemon(lab: Lab, host: str, data_dir: Path, command: str, *args: str, env=None):
    try:
        return lab.launch(host, data_dir, command, *args, env=env, started=register_process)
    except PeerStartError as exc:
        raise AssertionError(str(exc)) from None


def _volunteer(lab: Lab, host: str, tmp_path: Path, join: str):
    data = tmp_path / f"{host}.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS * 2))
    return _daemon(lab, host, tmp_path / host, "node", "--join", join, "--data", str(data), *TRAIN)


def _swarm(lab: Lab, tmp_path: Path, tiny_base: Path, aggregators: int, *rules: str):
    """A config made by init, a seed on pub1 and the aggregators on the next public hosts:
    (config path, the seed's multiaddr, the aggregators)."""
    config = tmp_path / "swarm.toml"
    dirs = [tmp_path / f"agg{i}" for i in range(1, aggregators + 1)]
    args = [a for d in dirs for a in ("--aggregator-dir", str(d))]
    out = run_cli("init", "--genesis", str(tiny_base), "-o", str(config), "--drop-rate", "0.5",
                  "--staleness", "0", *args, *rules, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    swarm_id = load_swarm_config(config).swarm_id
    seed_host = lab.public()
    seed = _daemon(lab, seed_host, tmp_path / "seed", "seed", "--swarm-id", swarm_id)
    join = lab.maddr(seed_host, seed.peer_id)
    return config, join, dirs


def test_volunteers_behind_a_nat_and_on_a_lossy_link_get_their_deltas_merged(
    lab, tmp_path, tiny_base
):
    config, join, (agg_dir,) = _swarm(lab, tmp_path, tiny_base, 1, "--round-period", "5",
                                      "--min-deltas", "3")  # fmt: skip
    agg = _daemon(lab, lab.public(), agg_dir, "aggregator", "--config", str(config),
                  "--genesis", str(tiny_base), "--join", join)  # fmt: skip
    volunteers = {host: _volunteer(lab, host, tmp_path, join)
                  for host in (lab.home(), lab.home(), lab.lossy())}  # fmt: skip

    def everyone_merged_then_trained_on() -> bool:
        merged_in = {d: h["round"] for h in log_records(agg.log, "published head")
                     for d in h.get("merged", [])}  # fmt: skip
        for v in volunteers.values():
            mine = log_records(v.log, "round ")  # "round N: delta ... announced"
            rounds = [merged_in[a["delta_id"]] for a in mine if a.get("delta_id") in merged_in]
            if not rounds or not any(a.get("round", -1) >= min(rounds) for a in mine):
                return False
        return True

    wait_for(everyone_merged_then_trained_on, 420, "every volunteer's delta merged, then "
             "a delta trained on a head that merged it")  # fmt: skip
    for host, v in volunteers.items():
        log = v.log.read_text()
        if host.startswith("home"):  # found out on its own: no flag given
            assert "not reachable: " in log and "restarting in client mode" in log
            assert "(the swarm cannot reach this peer)" in log
        else:
            assert "reachable: " in log and "client mode" not in log
    print(f"lossy link: {lab.shaping}")


def test_a_partitioned_lease_holders_round_is_finished_by_the_other_and_all_agree_after(
    lab, tmp_path, tiny_base
):
    config, join, (dir1, dir2) = _swarm(lab, tmp_path, tiny_base, 2, "--round-period", "3",
                                        "--min-deltas", "2")  # fmt: skip
    lease = ("--lease-seconds", "6", "--heartbeat-every", "1")
    host1, host2, observer = lab.public(), lab.public(), lab.public()
    holder = _daemon(lab, host1, dir1, "aggregator", "--config", str(config), "--genesis",
                     str(tiny_base), "--join", join, *lease,
                     env={PAUSE_ENV: "aggregator:fetched:1=45"})  # fmt: skip
    for host in (lab.home(), lab.public()):
        _volunteer(lab, host, tmp_path, join)
    claim = "holding the lease of round 1 with "
    wait_for(lambda: claim in holder.log.read_text(), 300, "the first aggregator to hold round 1")
    accepted = int(holder.log.read_text().split(claim, 1)[1].split()[0])
    # the other starts now, so that the holder's claim is the one it sees, and stands by
    other = _daemon(lab, host2, dir2, "aggregator", "--config", str(config), "--join", join,
                    *lease)  # fmt: skip
    wait_for(lambda: "head: round 0" in other.log.read_text(), 60, "the other to follow")
    time.sleep(5)  # a few of its ticks: it has read the holder's lease
    lab.cut(host1)  # mid-round: it stalls with the deltas it took, then cannot be heard

    def finished_by_the_other():
        return [h for h in log_records(other.log, "published head") if h["round"] == 1]

    (round1,) = wait_for(finished_by_the_other, 180, "the other to finish round 1")
    # the lapsed lease's deltas, each one or the newer delta its volunteer replaced it with
    assert len(round1["merged"]) == accepted
    lab.heal(host1)

    def one_head():  # both aggregators on the head, past round 1; volunteers at most a round
        view = _status(lab, observer, join)  # behind (heads come every few seconds)
        head = view["head"]
        aggs = [p for p in view["peers"] if p["role"] == "aggregator"]
        vols = [p for p in view["peers"] if p["role"] == "volunteer"]
        if not head or head["round"] < 2 or len(aggs) != 2 or len(vols) != 2:
            return None
        if {p["head_id"] for p in aggs} == {head["base_id"]} and all(
            p["lag"] is not None and p["lag"] <= 1 for p in vols
        ):
            return head
        return None

    head = wait_for(one_head, 300, "every peer on one head after the heal")
    assert head["round"] >= 2


def _status(lab: Lab, host: str, join: str) -> dict:
    """``mergeswarm status --json`` from ``host``."""
    argv = lab.cmd(host, MERGESWARM, "status", "--join", join, "--json",
                   "--host-maddr", f"/ip4/0.0.0.0/tcp/{PORT + 1}")  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)
