"""The monitor role: the whole swarm as one Prometheus scrape target.

It trains and serves nothing of its own; each tick it reads the swarm's
heartbeats, head and config (:mod:`node.monitor.view`) and its ``/metrics``
renders that picture under ``mergeswarm_swarm_*``. Sums over peers (bytes,
deltas) are exported as counters; they drop when a peer leaves, which
Prometheus's ``rate`` reads as a counter reset.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from node.config import MonitorSettings
from node.daemon.peer import PeerDaemon
from node.monitor.view import SwarmView, read_view
from node.net.blobstore import BlobStore
from node.net.member import SwarmMember
from protocol.constants import DELTA_REJECT_REASONS

logger = logging.getLogger(__name__)

PEER_LABEL_CHARS = 12  # a short peer id: bounded by the swarm's size, readable in a legend


class SwarmCollector(Collector):
    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator:
        view = self.monitor.view
        if view is None:
            return
        yield from swarm_metrics(view)


def swarm_metrics(view: SwarmView) -> Iterator:
    def gauge(name: str, doc: str, value: float | None, **labels: str):
        metric = GaugeMetricFamily(f"mergeswarm_swarm_{name}", doc, labels=list(labels))
        if value is not None:
            metric.add_metric(list(labels.values()), value)
        return metric

    peers = GaugeMetricFamily(
        "mergeswarm_swarm_peers",
        "Peers heart-beating, by role and version",
        labels=["role", "version"],
    )
    for (role, version), n in sorted(view.count_by().items()):
        peers.add_metric([role, version], n)
    yield peers
    head = view.head
    yield gauge("head_round", "Round of the swarm's head", head.round if head else None)
    period = view.config.round_period if view.config else None
    yield gauge("round_period_seconds", "The swarm config's round period", period)
    yield gauge("head_age_seconds", "Seconds since the head was published", view.head_age_seconds)
    yield gauge("head_deltas", "Deltas merged into the head", head.deltas if head else None)
    lag = GaugeMetricFamily(
        "mergeswarm_swarm_peer_lag_rounds",
        "Rounds each peer's base is behind the head",
        labels=["peer", "role"],
    )
    for p in view.peers:
        if p.lag is not None:
            lag.add_metric([p.peer_id[:PEER_LABEL_CHARS], p.beat.role], p.lag)
    yield lag
    yield gauge("max_lag_rounds", "Rounds the furthest-behind peer lags", view.max_lag())
    yield gauge(
        "training_samples_per_second",
        "Training throughput summed over volunteers",
        view.sum("samples_per_second", "volunteer"),
    )
    yield gauge("merge_duration_seconds", "Duration of the last merge", view.merge_seconds())
    holders = view.lease_holders()
    yield gauge("lease_holders", "Aggregators holding a round's lease", len(holders))
    holder = GaugeMetricFamily(
        "mergeswarm_swarm_lease_holder", "1 for the aggregator holding the lease", labels=["peer"]
    )
    for p in holders:
        holder.add_metric([p.peer_id[:PEER_LABEL_CHARS]], 1)
    yield holder
    for name, doc, field in (
        ("deltas_published_total", "Deltas announced, summed over volunteers", "deltas_published"),
        ("deltas_accepted_total", "Deltas merged, summed over aggregators", "deltas_accepted"),
        ("received_bytes_total", "Blob bytes received, summed over peers", "bytes_in"),
        ("sent_bytes_total", "Blob bytes sent, summed over peers", "bytes_out"),
    ):
        counter = CounterMetricFamily(f"mergeswarm_swarm_{name}", doc)
        counter.add_metric([], view.sum(field))
        yield counter
    rejected = CounterMetricFamily(
        "mergeswarm_swarm_deltas_rejected_total",
        "Deltas refused by aggregators, by reason",
        labels=["reason"],
    )
    counts = view.rejected()
    for reason in sorted(set(DELTA_REJECT_REASONS) | set(counts)):
        rejected.add_metric([reason], counts.get(reason, 0))
    yield rejected


class Monitor(PeerDaemon):
    role = "monitor"
    upload = False  # it holds no blobs worth offering

    def __init__(
        self, swarm: SwarmMember, store: BlobStore, settings: MonitorSettings | None = None
    ) -> None:
        super().__init__(swarm, store, settings or MonitorSettings())
        self.view: SwarmView | None = None
        self.metrics.registry.register(SwarmCollector(self))

    def tick(self) -> None:
        super().tick()
        self.view = read_view(self.swarm)
        self.head = self.view.head

    def ready(self) -> bool:
        return self.view is not None

    def health(self) -> dict:
        view = self.view
        return super().health() | {"peers": len(view.peers) if view else 0}
