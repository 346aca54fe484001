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


class Declare:
    """Metrics on one registry, one line each; names get the ``mergeswarm_`` prefix here."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def gauge(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
        return Gauge(f"mergeswarm_{name}", doc, labels, registry=self.registry)

    def counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
        return Counter(f"mergeswarm_{name}", doc, labels, registry=self.registry)

    def histogram(self, name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(f"mergeswarm_{name}", doc, buckets=buckets, registry=self.registry)

    def by_reason(self, name: str, doc: str, reasons: tuple[str, ...]) -> Counter:
        """A counter by reason, every known reason at zero from the start (dashboards show
        the labels before anything is refused)."""
        counter = self.counter(name, doc, ("reason",))
        for reason in reasons:
            counter.labels(reason=reason)
        return counter


class PeerMetrics:
    """What every peer exports; roles add their own on the same registry."""

    def __init__(self, role: str) -> None:
        self.registry = CollectorRegistry()
        d = Declare(self.registry)
        self.info = d.gauge("peer_info", "This peer's role", ("role",))
        self.info.labels(role=role).set(1)
        self.bytes_sent = d.counter("blob_sent_bytes_total", "Blob bytes served to other peers")
        self.bytes_received = d.counter(
            "blob_received_bytes_total", "Blob bytes fetched from other peers"
        )
        self.rejected = d.counter(
            "rejected_total", "Inputs refused from peers, by reason", ("reason",)
        )
        self.records_rejected = d.by_reason(
            "records_rejected_total",
            "DHT records refused (bad signature, forged author, wrong swarm, ...), by reason",
            RECORD_REJECT_REASONS,
        )
        self.head_round = d.gauge("head_round", "Round of the newest head seen")
        self.uptime = d.gauge("uptime_seconds", "Seconds since the daemon started")


class NodeMetrics(PeerMetrics):
    """A volunteer's training and publishing."""

    def __init__(self) -> None:
        super().__init__("volunteer")
        d = Declare(self.registry)
        self.loss = d.gauge("training_loss", "Training loss of the last step")
        self.heldout_loss = d.gauge("heldout_loss", "Held-out loss after the last round")
        self.steps = d.counter("training_steps_total", "Optimizer steps")
        self.samples = d.counter("training_samples_total", "Training blocks consumed")
        self.samples_per_second = d.gauge(
            "training_samples_per_second", "Training throughput of the last round"
        )
        self.deltas = d.counter("deltas_published_total", "Deltas announced by this volunteer")
        self.publish_seconds = d.histogram(
            "delta_publish_duration_seconds",
            "Seconds from the end of training to the delta being announced",
            (0.1, 0.5, 1, 2, 5, 15, 60, 300),
        )
        self.head_lag = d.gauge(
            "head_lag_rounds", "Rounds between the newest head and the trained one"
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
        d = Declare(self.registry)
        self.round = d.gauge("round", "Round of the last head this peer merged")
        self.round_seconds = d.histogram(
            "round_duration_seconds",
            "Seconds from taking the lease to publishing the head",
            (1, 5, 15, 60, 300, 900, 3600),
        )
        self.deltas_received = d.counter("deltas_received_total", "Deltas fetched for a round")
        self.deltas_accepted = d.counter("deltas_accepted_total", "Deltas merged into a head")
        self.deltas_rejected = d.by_reason(
            "deltas_rejected_total",
            "Deltas refused, by reason (bad_signature, non_finite, norm, ...)",
            DELTA_REJECT_REASONS,
        )
        self.merge_seconds = d.histogram(
            "merge_duration_seconds",
            "Seconds spent merging one round",
            (0.1, 0.5, 1, 5, 15, 60, 300, 900),
        )
        self.merge_bytes_per_second = d.gauge(
            "merge_throughput_bytes_per_second", "Base bytes merged per second in the last round"
        )
        self.published_bytes = d.counter(
            "published_bytes_total", "Bytes of patches and snapshots made"
        )
        self.lease_held = d.gauge("lease_held", "1 while this aggregator holds the round's lease")
        self.heads_published = d.counter("heads_published_total", "Heads this aggregator published")
