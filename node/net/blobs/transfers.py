"""A peer's blob exchange as the daemons use it: serve, fetch, announce, push.

:class:`Transfers` is the interface; :class:`P2PTransfers` is the libp2p one
(a registered :class:`BlobService`, the torrent-like fetcher, pushes over a
stream), and :class:`node.net.memory.MemoryTransfers` the in-process one.
A swarm hands out its own kind: ``swarm.transfers(store, limits)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from hivemind.p2p import PeerID

from node.net.blobs.fetch import fetch
from node.net.blobs.providers import announce
from node.net.blobs.push import push
from node.net.blobs.serve import BlobService, ServeLimits
from node.net.blobs.wire import TransferStats
from node.net.blobstore import BlobStore
from protocol import transfer_pb2 as pb

if TYPE_CHECKING:
    from node.net.swarm import Swarm


class Transfers(Protocol):
    stats: TransferStats  # bytes in and out, served and fetched

    def fetch(self, blob_id: str, **kwargs) -> object:
        """Download ``blob_id`` into the store (blocking); FetchError when it cannot."""
        ...

    def announce(self, blob_id: str) -> bool:
        """Offer a held blob to the swarm (a provider record, refreshed until withdrawn)."""
        ...

    def push(self, blob_id: str, base: str, peer_id: str) -> pb.UploadResult:
        """Hand an announced delta (trained on ``base``) to a reachable peer."""
        ...


class P2PTransfers:
    """Blob exchange over libp2p streams; serving starts when it is made."""

    def __init__(self, swarm: Swarm, store: BlobStore, limits: ServeLimits | None = None) -> None:
        self.swarm = swarm
        self.store = store
        self.service = BlobService(swarm, store, limits)
        self.service.register()
        self.stats = self.service.stats

    def fetch(self, blob_id: str, **kwargs):
        return fetch(self.swarm, self.store, blob_id, stats=self.stats, **kwargs)

    def announce(self, blob_id: str) -> bool:
        return announce(self.swarm, blob_id)

    def push(self, blob_id: str, base: str, peer_id: str) -> pb.UploadResult:
        return push(self.swarm, self.store, blob_id, base, PeerID.from_base58(peer_id))
