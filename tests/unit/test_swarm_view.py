"""The monitor's picture of a swarm, rendered as Prometheus metrics, from heartbeats alone."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import CollectorRegistry

from node.monitor.monitor import SwarmCollector
from node.monitor.view import PeerView, SwarmView
from protocol.records import Head, Heartbeat
from protocol.swarm_config import SwarmConfig

NOW = 1_800_000_000.0


def _peer(peer_id: str, role: str, head_round: int | None, head: Head, **beat) -> PeerView:
    hb = Heartbeat(role=role, version="0.1.0", peer_id=peer_id, head_round=head_round, **beat)
    lag = None if head_round is None else head.round - head_round
    return PeerView(peer_id, "ab" * 32, hb, lag)


def _registry(view: SwarmView) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(SwarmCollector(SimpleNamespace(view=view)))
    return registry


def test_the_swarm_renders_as_bounded_metrics():
    head = Head(base_id="cd" * 32, round=3, deltas=2, created=NOW - 30)
    config = SwarmConfig(swarm_id="swarm-test", genesis_id="ef" * 32, round_period=60)
    view = SwarmView(
        "swarm-test",
        head,
        [
            _peer("QmVolunteerOne000", "volunteer", 3, head, samples_per_second=2.0, bytes_in=100),
            _peer("QmVolunteerTwo000", "volunteer", 1, head, samples_per_second=3.5, bytes_in=50),
            _peer(
                "QmAggregator00000",
                "aggregator",
                3,
                head,
                deltas_accepted=5,
                deltas_rejected={"norm": 2},
                merge_seconds=1.5,
                lease=True,
                bytes_out=150,
            ),  # fmt: skip
            _peer("QmMonitor00000000", "monitor", None, head),
        ],
        now=NOW,
        config=config,
    )
    r = _registry(view)
    value = r.get_sample_value
    assert value("mergeswarm_swarm_peers", {"role": "volunteer", "version": "0.1.0"}) == 2
    assert value("mergeswarm_swarm_head_round") == 3
    assert value("mergeswarm_swarm_head_age_seconds") == 30
    assert value("mergeswarm_swarm_round_period_seconds") == 60
    assert (
        value("mergeswarm_swarm_peer_lag_rounds", {"peer": "QmVolunteerT", "role": "volunteer"})
        == 2
    )
    assert value("mergeswarm_swarm_max_lag_rounds") == 2
    assert value("mergeswarm_swarm_training_samples_per_second") == 5.5
    assert value("mergeswarm_swarm_lease_holders") == 1
    assert value("mergeswarm_swarm_lease_holder", {"peer": "QmAggregator"}) == 1
    assert value("mergeswarm_swarm_merge_duration_seconds") == 1.5
    assert value("mergeswarm_swarm_deltas_accepted_total") == 5
    assert value("mergeswarm_swarm_deltas_rejected_total", {"reason": "norm"}) == 2
    assert value("mergeswarm_swarm_deltas_rejected_total", {"reason": "size"}) == 0  # shown at 0
    assert value("mergeswarm_swarm_received_bytes_total") == 150
    assert value("mergeswarm_swarm_sent_bytes_total") == 150


def test_a_swarm_without_a_head_still_reports_its_peers():
    view = SwarmView("swarm-test", None, [], now=NOW)
    r = _registry(view)
    assert r.get_sample_value("mergeswarm_swarm_head_round") is None
    assert r.get_sample_value("mergeswarm_swarm_lease_holders") == 0
    assert r.get_sample_value("mergeswarm_swarm_max_lag_rounds") == 0
