"""The seed role: trains nothing; mirrors and serves what the swarm needs.

For volunteers with bandwidth but no GPU, and as a stable bootstrap peer. Each
tick it follows the head (fork choice over head records), fetches the head's
patch and snapshot and the deltas announced against the head, pins them, and
serves them; blobs no longer needed are unpinned and left to garbage
collection.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path

from node.chain.history import (
    ConfigWatch,
    chain_back,
    current_head,
    head_blobs,
    trusted_authors,
)
from node.config import SeedSettings
from node.daemon.backoff import Backoff
from node.daemon.peer import PeerDaemon
from node.net.blobstore import DELTA_PIN, HEAD_PIN, BlobStore
from node.net.member import SwarmMember
from protocol.errors import MergeswarmError
from protocol.model_dir import ModelDir
from protocol.patch import write_patch
from protocol.records import ANNOUNCE, Head
from protocol.swarm_config import SwarmConfig

logger = logging.getLogger(__name__)

DELTA_MANIFEST_TIMEOUT = 5.0  # seconds to find a provider of an announced delta


class Seed(PeerDaemon):
    role = "seed"
    fetch_timeout = 600.0

    def __init__(
        self, swarm: SwarmMember, store: BlobStore, settings: SeedSettings | None = None
    ) -> None:
        settings = settings or SeedSettings()
        super().__init__(swarm, store, settings)
        self.settings = settings
        self.config: SwarmConfig | None = None  # the swarm's, once in sight
        self.configs = ConfigWatch(swarm)
        self.mirror = settings.mirror
        self.upload = settings.upload
        self.retries = Backoff(first=60.0)  # blob ids that could not be fetched
        self._chain: tuple[str, set[str]] = ("", set())  # (head, the blobs that rebuild it)

    def wanted(self) -> dict[str, tuple[str, int | None]]:
        """Blob id -> (pin reason, size when a record states it), for what the swarm needs."""
        chain = self.configs.newer(self.config)  # the config may be handed over
        if chain is not None:
            self.config = chain.latest
        trusted = trusted_authors(self.swarm, self.config, self.settings.trusted_aggregators)
        head = self.head = current_head(self.swarm, trusted)  # heart-beaten: shows its lag
        if head is None:
            return {}
        wanted = {b: (HEAD_PIN, None) for b in self._chain_blobs(head, trusted)}
        if head.momentum_id:  # for aggregators
            wanted[head.momentum_id] = (HEAD_PIN, None)
        limit = self.config.max_delta_bytes if self.config else None
        for record in self.swarm.read(ANNOUNCE, topic=head.base_id):  # one per author
            a = record.body
            if a.base_id != head.base_id:  # filed under another base than it names
                continue
            if limit is not None and a.size > limit:  # no aggregator would take it
                continue
            wanted[a.delta_id] = (DELTA_PIN, a.size)
        return wanted

    def _chain_blobs(self, head: Head, trusted: set[str]) -> set[str]:
        """The patches and snapshots that rebuild ``head`` from its nearest snapshot, which a
        newcomer fetches (walked once per head; the head's own when the walk fails)."""
        if self._chain[0] != head.base_id:
            try:
                chain = chain_back(self.swarm, head, trusted, held=lambda _: False)
            except MergeswarmError as exc:
                logger.info("the chain to round %d: %s", head.round, exc)
                chain = [head]
            self._chain = (head.base_id, head_blobs(chain))
        return self._chain[1] | head_blobs([head])

    def mirror_forever(self, stop: threading.Event, interval: float = 2.0) -> None:
        """The mirroring thread: housekeeping (heartbeats, records) goes on while it fetches."""
        while not stop.is_set():
            if self.mirror:
                try:
                    self.mirror_once(stop)
                except Exception:  # noqa: BLE001 - a bad round of mirroring must not stop the seed
                    logger.exception("mirroring failed; retrying in %.0f s", interval)
            stop.wait(interval)

    def mirror_once(self, stop: threading.Event) -> None:
        wanted = self.wanted()
        for reason in (HEAD_PIN, DELTA_PIN):
            for blob_id in self.store.ids():
                if reason in self.store.pins(blob_id) and wanted.get(blob_id, ("",))[0] != reason:
                    self.store.unpin(blob_id, reason)
        for blob_id, (reason, size) in wanted.items():
            if stop.is_set():
                return
            if not self.retries.ready(blob_id):
                continue
            if not self.store.has(blob_id):
                try:
                    self.fetch(
                        blob_id,
                        timeout=self.fetch_timeout,
                        # an announced id nobody provides must not hold the others up
                        manifest_timeout=DELTA_MANIFEST_TIMEOUT if reason == DELTA_PIN else None,
                        serve_while_fetching=self.upload,
                        expected_size=size,
                    )
                except (MergeswarmError, OSError, TimeoutError) as exc:
                    self.retries.failed(blob_id)
                    logger.warning("mirroring %s: %s", blob_id[:16], exc)
                    continue
            self.store.pin(blob_id, reason)


def genesis_head(
    store: BlobStore, model_dir: Path, round_: int = 0, parent: str | None = None
) -> Head:
    """A stand-in head for a model directory (before an aggregator exists): snapshot it.
    Past round 0 a head must name its parent to be followed."""
    with tempfile.TemporaryDirectory(dir=store.root) as tmp:
        path = Path(tmp) / "snapshot.msp"
        base = write_patch(ModelDir(model_dir), path)
        snapshot = store.add_file(path, pin=HEAD_PIN)
    return Head(base_id=base, round=round_, parent=parent, deltas=0, snapshot_id=snapshot)
