"""Prometheus metrics of a peer and the HTTP endpoint serving them with ``/healthz``.

Metrics live on an explicit registry per daemon (never the global one), with
a ``mergeswarm_`` prefix, base units in names, ``_total`` on counters and
labels of bounded cardinality only (reasons, roles; never a peer or blob id).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from protocol.constants import DELTA_REJECT_REASONS
from protocol.records import REJECT_REASONS as RECORD_REJECT_REASONS

logger = logging.getLogger(__name__)


class PeerMetrics:
    """What every peer exports; roles add their own on the same registry."""

    def __init__(self, role: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.info = Gauge("mergeswarm_peer_info", "This peer's role", ["role"], registry=r)
        self.info.labels(role=role).set(1)
        self.bytes_sent = Counter(
            "mergeswarm_blob_sent_bytes_total", "Blob bytes served to other peers", registry=r
        )
        self.bytes_received = Counter(
            "mergeswarm_blob_received_bytes_total",
            "Blob bytes fetched from other peers",
            registry=r,
        )
        self.rejected = Counter(
            "mergeswarm_rejected_total",
            "Inputs refused from peers, by reason",
            ["reason"],
            registry=r,
        )
        self.records_rejected = Counter(
            "mergeswarm_records_rejected_total",
            "DHT records refused (bad signature, forged author, wrong swarm, ...), by reason",
            ["reason"],
            registry=r,
        )
        for reason in RECORD_REJECT_REASONS:  # zeros from the start: dashboards show the labels
            self.records_rejected.labels(reason=reason)
        self.head_round = Gauge(
            "mergeswarm_head_round", "Round of the newest head seen", registry=r
        )
        self.uptime = Gauge(
            "mergeswarm_uptime_seconds", "Seconds since the daemon started", registry=r
        )


class NodeMetrics(PeerMetrics):
    """A volunteer's training and publishing."""

    def __init__(self) -> None:
        super().__init__("volunteer")
        r = self.registry
        self.loss = Gauge("mergeswarm_training_loss", "Training loss of the last step", registry=r)
        self.heldout_loss = Gauge(
            "mergeswarm_heldout_loss", "Held-out loss after the last round", registry=r
        )
        self.steps = Counter("mergeswarm_training_steps_total", "Optimizer steps", registry=r)
        self.samples = Counter(
            "mergeswarm_training_samples_total", "Training blocks consumed", registry=r
        )
        self.samples_per_second = Gauge(
            "mergeswarm_training_samples_per_second",
            "Training throughput of the last round",
            registry=r,
        )
        self.deltas = Counter(
            "mergeswarm_deltas_published_total", "Deltas announced by this volunteer", registry=r
        )
        self.publish_seconds = Histogram(
            "mergeswarm_delta_publish_duration_seconds",
            "Seconds from the end of training to the delta being announced",
            buckets=(0.1, 0.5, 1, 2, 5, 15, 60, 300),
            registry=r,
        )
        self.head_lag = Gauge(
            "mergeswarm_head_lag_rounds",
            "Rounds between the newest head and the trained one",
            registry=r,
        )


class MetricsServer:
    """Serves ``/metrics``, ``/healthz`` (alive: what it does) and ``/readyz`` (200 once it has
    joined and holds a verified base, 503 before) on ``host:port`` (port 0 picks one)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        health: Callable[[], dict],
        host: str,
        port: int,
        ready: Callable[[], bool] = lambda: True,
    ) -> None:
        registry_ = registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                status = 200
                path = self.path.split("?")[0]
                if path == "/metrics":
                    body, ctype = generate_latest(registry_), CONTENT_TYPE_LATEST
                elif path == "/healthz":
                    body, ctype = json.dumps(health()).encode(), "application/json"
                elif path == "/readyz":
                    is_ready = ready()
                    status = 200 if is_ready else 503
                    body, ctype = json.dumps({"ready": is_ready}).encode(), "application/json"
                else:
                    self.send_error(404, "try /metrics, /healthz or /readyz")
                    return
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:  # scrapes are not news
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="metrics", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class AggregatorMetrics(PeerMetrics):
    """An aggregator's rounds."""

    def __init__(self) -> None:
        super().__init__("aggregator")
        r = self.registry
        self.round = Gauge(
            "mergeswarm_round", "Round of the last head this peer merged", registry=r
        )
        self.round_seconds = Histogram(
            "mergeswarm_round_duration_seconds",
            "Seconds from taking the lease to publishing the head",
            buckets=(1, 5, 15, 60, 300, 900, 3600),
            registry=r,
        )
        self.deltas_received = Counter(
            "mergeswarm_deltas_received_total", "Deltas fetched for a round", registry=r
        )
        self.deltas_accepted = Counter(
            "mergeswarm_deltas_accepted_total", "Deltas merged into a head", registry=r
        )
        self.deltas_rejected = Counter(
            "mergeswarm_deltas_rejected_total",
            "Deltas refused, by reason (bad_signature, non_finite, norm, ...)",
            ["reason"],
            registry=r,
        )
        for reason in DELTA_REJECT_REASONS:
            self.deltas_rejected.labels(reason=reason)
        self.merge_seconds = Histogram(
            "mergeswarm_merge_duration_seconds",
            "Seconds spent merging one round",
            buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900),
            registry=r,
        )
        self.merge_bytes_per_second = Gauge(
            "mergeswarm_merge_throughput_bytes_per_second",
            "Base bytes merged per second in the last round",
            registry=r,
        )
        self.published_bytes = Counter(
            "mergeswarm_published_bytes_total", "Bytes of patches and snapshots made", registry=r
        )
        self.lease_held = Gauge(
            "mergeswarm_lease_held", "1 while this aggregator holds the round's lease", registry=r
        )
        self.heads_published = Counter(
            "mergeswarm_heads_published_total", "Heads this aggregator published", registry=r
        )
