"""The seed role: trains nothing; mirrors and serves what the swarm needs.

For volunteers with bandwidth but no GPU, and as a stable bootstrap peer. Each
tick it follows the head (fork choice over head records), fetches the head's
patch and snapshot and the deltas announced against the head, pins them, and
serves them; blobs no longer needed are unpinned and left to garbage
collection.
"""

from __future__ import annotations

import logging

from node.blobs import FetchError, fetch
from node.blobstore import QuotaError
from node.peer import PeerDaemon
from protocol.forkchoice import choose_head
from protocol.records import DeltaAnnouncement, Head

logger = logging.getLogger(__name__)

HEAD_PIN = "head"
DELTA_PIN = "unmerged-delta"


class Seed(PeerDaemon):
    role = "seed"
    mirror = True
    fetch_timeout = 600.0

    def tick(self) -> None:
        super().tick()
        if self.mirror:
            self.mirror_once()

    def wanted(self) -> dict[str, str]:
        """Blob id -> pin reason, for what the swarm currently needs."""
        heads = [(r.author, r.body) for r in self.swarm.read("head") if isinstance(r.body, Head)]
        chosen = choose_head(heads)
        if chosen is None:
            return {}
        head = chosen[1]
        wanted = {b: HEAD_PIN for b in (head.patch_id, head.snapshot_id) if b}
        for record in self.swarm.read("announce", topic=head.base_id):
            if isinstance(record.body, DeltaAnnouncement):
                wanted[record.body.delta_id] = DELTA_PIN
        return wanted

    def mirror_once(self) -> None:
        wanted = self.wanted()
        for reason in (HEAD_PIN, DELTA_PIN):
            for blob_id in self.store.ids():
                if reason in self.store.pins(blob_id) and wanted.get(blob_id) != reason:
                    self.store.unpin(blob_id, reason)
        for blob_id, reason in wanted.items():
            if not self.store.has(blob_id):
                try:
                    fetch(self.swarm, self.store, blob_id, timeout=self.fetch_timeout)
                except (FetchError, QuotaError) as exc:
                    logger.warning("mirroring %s: %s", blob_id[:16], exc)
                    continue
            self.store.pin(blob_id, reason)
