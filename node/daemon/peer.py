"""What every long-running peer does besides its role: serve and announce blobs, refresh its
records, heart-beat. Roles (seed, volunteer, aggregator) subclass :class:`PeerDaemon`."""

from __future__ import annotations

import logging
import threading
import time
from importlib.metadata import PackageNotFoundError, version

from node.config import DaemonSettings
from node.daemon.metrics import PeerMetrics
from node.net.blobs import ServeLimits
from node.net.blobs import withdraw as withdraw_provider
from node.net.blobstore import BlobStore
from node.net.member import PeerDeaf, SwarmMember
from protocol.container import DeltaReader
from protocol.errors import DeltaFormatError
from protocol.records import HEARTBEAT, Head, Heartbeat

logger = logging.getLogger(__name__)

HEARTBEAT_TTL = 60.0
REFRESH_EVERY = 60.0  # owned records (TTL >= 300 s) are re-published this often
COLLECT_EVERY = 600.0  # seconds between looks for blobs past their retention
REACHABLE_ROLES = ("seed", "aggregator")
NOTICE_EVERY = 60.0  # seconds between reminders of what a waiting daemon waits for


def package_version() -> str:
    try:
        return version("mergeswarm")
    except PackageNotFoundError:
        return "0+unknown"


class PeerDaemon:
    """A peer's housekeeping; call :meth:`tick` every few seconds from the daemon's loop."""

    role = "seed"
    head: Head | None = None  # the head this peer works on (roles that follow heads set it)
    status = "running"
    upload = True  # False: fetch but never offer blobs to others (metered links, baselines)

    def __init__(
        self,
        swarm: SwarmMember,
        store: BlobStore,
        settings: DaemonSettings | None = None,
        limits: ServeLimits | None = None,
    ) -> None:
        self.swarm = swarm
        self.store = store
        settings = settings or DaemonSettings()
        self.heartbeat_every = settings.heartbeat_every
        self.retention = settings.retention_hours * 3600
        self.transfers = swarm.transfers(store, limits)
        self.started = time.monotonic()
        self.shared: set[str] = set()  # blobs announced (or pushed, in client mode)
        self._last_refresh = time.monotonic()
        self._last_collect = time.monotonic()
        self._last_heartbeat = 0.0
        self.metrics = self.new_metrics()
        self._reported: dict[str, float] = {}  # counter totals already added to the metrics
        self._notice = ("", 0.0)  # the last wait told to the operator, and when
        # set when the peer is told to stop (run_until links the signal's event): a download
        # under way gives up then instead of holding the shutdown for its whole timeout
        self.stopping = threading.Event()

    def waiting(self, status: str, advice: str) -> None:
        """Set ``status`` and tell the operator what the daemon waits for and what to do:
        now, and again every NOTICE_EVERY seconds while it lasts (no waiting in silence)."""
        now = time.monotonic()
        if status != self._notice[0] or now - self._notice[1] >= NOTICE_EVERY:
            logger.warning("%s: %s", status, advice)
            self._notice = (status, now)
        self.status = status

    def new_metrics(self) -> PeerMetrics:
        return PeerMetrics(self.role)

    def tick(self) -> None:
        self.swarm.check_alive()
        self.share_new_blobs()
        self.update_metrics()
        now = time.monotonic()
        if now - self._last_heartbeat >= self.heartbeat_every:
            self._last_heartbeat = now
            self.swarm.publish(HEARTBEAT, self.heartbeat(), ttl=HEARTBEAT_TTL)
        if now - self._last_refresh >= REFRESH_EVERY:
            self._last_refresh = now
            self.swarm.refresh()
        if self.retention and now - self._last_collect >= COLLECT_EVERY:
            self._last_collect = now
            self.collect_garbage()

    def collect_garbage(self) -> list[str]:
        """Delete the blobs nothing pins that went unused for the retention period (deltas
        of past rounds, mirrored copies); what the head needs stays pinned."""
        dropped = self.store.collect(self.retention)  # their provider records: share_new_blobs
        if dropped:
            logger.info("collected %d blobs unused for %.0f h", len(dropped), self.retention / 3600)
        return dropped

    def fetch(self, blob_id: str, **kwargs) -> object:
        """Download a blob into this peer's store, counting its bytes in this peer's stats;
        FetchError at once when the peer is told to stop."""
        return self.transfers.fetch(blob_id, cancel=self.stopping, **kwargs)

    def update_metrics(self) -> None:
        """Bring the metrics up to the blob service's and the DHT's own counts."""
        m = self.metrics
        m.uptime.set(time.monotonic() - self.started)
        self._add(m.bytes_sent, "sent", self.transfers.stats.bytes_out)
        self._add(m.bytes_received, "received", self.transfers.stats.bytes_in)
        for reason, total in self.swarm.rejection_counts().items():
            self._add(m.records_rejected.labels(reason=reason), f"record:{reason}", total)

    def _add(self, counter, name: str, total: float) -> None:
        counter.inc(max(0.0, total - self._reported.get(name, 0.0)))
        self._reported[name] = total

    def heartbeat(self) -> Heartbeat:
        head = self.head
        return Heartbeat(
            role=self.role,
            version=package_version(),
            peer_id=self.swarm.peer_id.to_base58(),
            head_round=head.round if head else None,
            head_id=head.base_id if head else None,
            bytes_in=self.transfers.stats.bytes_in,
            bytes_out=self.transfers.stats.bytes_out,
            uptime_seconds=round(time.monotonic() - self.started, 1),
        )

    def ready(self) -> bool:
        """Joined the swarm and, for roles that need one, holding the head's verified base."""
        return True

    def health(self) -> dict:
        """What ``/healthz`` says; roles add their own fields."""
        return {
            "ok": True,
            "role": self.role,
            "status": self.status,
            "swarm": self.swarm.swarm_id,
            "head_round": self.head.round if self.head else None,
        }

    def share_new_blobs(self) -> None:
        """Announce blobs that appeared in the store; a peer others cannot dial pushes them."""
        if not self.upload:
            return
        held = set(self.store.ids())
        for gone in self.shared - held:  # garbage-collected: stop offering it
            withdraw_provider(self.swarm, gone)
            self.shared.discard(gone)
        for blob_id in sorted(held):
            if blob_id in self.shared:
                continue
            if not self.swarm.options.client_mode:
                if self.transfers.announce(blob_id):
                    self.shared.add(blob_id)
            elif self._push_somewhere(blob_id):
                self.shared.add(blob_id)

    def _push_somewhere(self, blob_id: str) -> bool:
        """Push a delta to a reachable seed or aggregator; True once one took it (or it is
        not a delta, which nobody would take)."""
        try:
            with DeltaReader(self.store.path(blob_id)) as reader:
                base = reader.header.base_id
        except DeltaFormatError:
            return True
        for record in self.swarm.read(HEARTBEAT):
            body = record.body
            if body.role not in REACHABLE_ROLES:
                continue
            try:
                result = self.transfers.push(blob_id, base, body.peer_id)
            except Exception as exc:  # noqa: BLE001 - try the next reachable peer
                logger.info("pushing %s to %s failed: %s", blob_id[:16], body.peer_id, exc)
                continue
            if result.accepted:
                logger.info("pushed %s to %s %s", blob_id[:16], body.role, body.peer_id)
                return True
            logger.info("%s refused %s: %s", body.peer_id, blob_id[:16], result.reason)
        return False


def run_until(daemon: PeerDaemon, stop: threading.Event, interval: float = 2.0) -> None:
    """Tick until ``stop`` is set; a failing tick is logged, never fatal, except when the
    peer has gone deaf (PeerDeaf): then it raises, and the daemon exits non-zero."""
    daemon.stopping = stop  # the daemon's downloads give up when it is set
    while not stop.is_set():
        try:
            daemon.tick()
        except PeerDeaf:
            raise
        except Exception:  # noqa: BLE001 - one bad round of housekeeping must not kill the peer
            logger.exception("housekeeping failed; retrying in %.0f s", interval)
        stop.wait(interval)
