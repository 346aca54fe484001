"""A whole swarm inside one process: the records and blob exchange of many peers, in memory.

The daemons talk to their swarm through two interfaces: records (publish,
read, withdraw, refresh: :class:`node.net.member.SwarmMember`) and blob
transfers (``swarm.transfers(store)``: fetch, announce, push). A
:class:`MemoryNet` provides both for peers that share it, so that the roles'
logic (leases, following the head, mirroring, screening) runs in milliseconds
in one test process, with real signed records, real blob stores and real
models, and no DHT, libp2p daemon or subprocess.

What it keeps of the real thing: every record is signed and checked when
stored (as the DHT's validator does) and again when read; a peer's newer
record replaces its older one under the same key; records expire; a fetch
finds its sources through provider records and copies a blob only from a peer
that holds it whole, checking the size a record promised; a push is accepted
only for a delta announced against the base it names. What it leaves out:
pieces, streams, timing and bandwidth (the piece policy is tested on its own,
:mod:`node.net.pieces`), and partial providers.
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from node.config import SwarmOptions
from node.data_dir import DataDir
from node.net.blobs.fetch import FetchError
from node.net.blobs.providers import announce, providers
from node.net.blobs.serve import ServeLimits
from node.net.blobs.wire import TransferStats
from node.net.blobstore import BlobStore
from node.net.member import SwarmError, SwarmMember
from protocol import transfer_pb2 as pb
from protocol.identity import Identity
from protocol.peer_binding import load_p2p_key, peer_id_of, write_p2p_key
from protocol.records import ANNOUNCE, RecordError, key_admits, open_record

DEFAULT_SWARM_ID = "memory-swarm"


class MemoryNet:
    """The shared medium: a DHT table and the peers that joined, by peer id."""

    def __init__(self, swarm_id: str = DEFAULT_SWARM_ID) -> None:
        self.swarm_id = swarm_id
        self.rejected: Counter[str] = Counter()
        self.peers: dict[str, MemorySwarm] = {}
        self._table: dict[str, dict[str, tuple[bytes, float]]] = {}
        self._lock = threading.Lock()

    def join(self, data_dir: Path, *, client_mode: bool = False) -> MemorySwarm:
        """A new peer (or a restarted one: same data dir, same identity)."""
        return MemorySwarm(self, SwarmOptions(data_dir=data_dir, client_mode=client_mode))

    def put(self, key: str, author: str, value: bytes, expires: float) -> bool:
        now = get_dht_time()
        try:  # what the swarm's record validator checks on every store
            open_record(value, subkey=author, expiration=expires, now=now, key=key)
        except RecordError as exc:
            self.rejected[exc.reason] += 1
            return False
        with self._lock:
            entries = self._table.setdefault(key, {})
            held = {a: len(v) for a, (v, e) in entries.items() if e > now}
            if not key_admits(held, author, len(value)):  # what node.net.key_cap keeps
                self.rejected["key_full"] += 1
                return False
            old = entries.get(author)
            if old is not None and old[1] > expires:  # the DHT keeps the later expiration
                return False
            entries[author] = (value, expires)
        return True

    def get(self, key: str) -> dict[str, tuple[bytes, float]]:
        now = get_dht_time()
        with self._lock:
            entries = self._table.get(key, {})
            return {author: item for author, item in entries.items() if item[1] > now}

    def holder(self, peer_id: str) -> MemorySwarm | None:
        """The online peer with this id, if any."""
        peer = self.peers.get(peer_id)
        return peer if peer is not None and peer.online else None


class MemorySwarm(SwarmMember):
    """One peer of a :class:`MemoryNet`, with the interface of :class:`node.net.swarm.Swarm`.

    Set :attr:`online` to False to cut it off (a partition or a crash): its
    stores and reads then fail as a real peer's would, and nobody fetches from it.
    """

    def __init__(self, net: MemoryNet, options: SwarmOptions) -> None:
        super().__init__()
        if options.swarm_id is not None and options.swarm_id != net.swarm_id:
            raise SwarmError(f"this peer is in swarm {net.swarm_id!r}, not {options.swarm_id!r}")
        self.net = net
        self.options = options
        self.data_dir = Path(options.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.identity = Identity.load_or_create(DataDir(self.data_dir).identity)
        key_path = DataDir(self.data_dir).p2p_key
        # a libp2p key file as a real peer keeps (1024 bits: made fast, still checked)
        self.p2p_key = (
            load_p2p_key(key_path) if key_path.is_file() else write_p2p_key(key_path, 1024)
        )
        self.peer_id = PeerID.from_base58(peer_id_of(self.binding))
        self.swarm_id = net.swarm_id
        self.maddrs: list[str] = []
        self.online = True
        self.transfer: MemoryTransfers | None = None
        net.peers[self.peer_id.to_base58()] = self

    def transfers(self, store: BlobStore, limits: ServeLimits | None = None) -> MemoryTransfers:
        """This peer's blob exchange (``limits`` are not modelled in memory)."""
        self.transfer = MemoryTransfers(self, store)
        return self.transfer

    def _check_online(self, what: str) -> None:
        if not self.online:
            raise SwarmError(f"{what}: this peer is offline")

    def _put(self, key: str, value: bytes, expires: float, what: str) -> bool:
        self._check_online(what)
        return self.net.put(key, self.identity.author, value, expires)

    def _get(self, key: str, what: str) -> dict[object, tuple[object, float]]:
        self._check_online(what)
        return dict(self.net.get(key))

    def _store_rejections(self) -> dict[str, int]:
        return dict(self.net.rejected)

    def shutdown(self) -> None:
        self.online = False
        if self.net.peers.get(self.peer_id.to_base58()) is self:
            del self.net.peers[self.peer_id.to_base58()]


class MemoryTransfers:
    """Blob exchange between the stores of a :class:`MemoryNet`'s peers: whole-file copies."""

    def __init__(self, swarm: MemorySwarm, store: BlobStore) -> None:
        self.swarm = swarm
        self.store = store
        self.stats = TransferStats()

    def announce(self, blob_id: str) -> bool:
        return announce(self.swarm, blob_id)

    def fetch(
        self,
        blob_id: str,
        *,
        timeout: float = 600.0,
        serve_while_fetching: bool = True,
        expected_size: int | None = None,
        **_: object,
    ) -> None:
        """Copy ``blob_id`` from a peer that announced it whole; FetchError when none can."""
        if self.store.has(blob_id):
            return
        errors = []
        offers = providers(self.swarm, blob_id, everyone=True)
        for offer in sorted(offers, key=lambda p: p.peer_id):  # the same order every run
            source = self.swarm.net.holder(offer.peer_id)
            if source is None or source.transfer is None:
                continue
            if not source.transfer.store.has(blob_id):
                errors.append(f"{offer.peer_id[:12]} does not hold it")
                continue
            size = source.transfer.store.size(blob_id)
            if expected_size is not None and size != expected_size:
                errors.append(f"{size} bytes where a record promised {expected_size}")
                continue
            got = self.store.add_file(source.transfer.store.path(blob_id))
            if got != blob_id:  # a store's file was changed under it
                self.store.delete(got)
                errors.append(f"{offer.peer_id[:12]} sent blob {got[:16]}")
                continue
            self.stats.bytes_in += size
            source.transfer.stats.bytes_out += size
            if serve_while_fetching and not self.swarm.options.client_mode:
                self.announce(blob_id)
            return
        tail = f" ({'; '.join(errors)})" if errors else ""
        raise FetchError(f"blob {blob_id[:16]}: no provider could send it{tail}")

    def push(self, blob_id: str, base: str, peer_id: str) -> pb.UploadResult:
        """Hand an announced delta to another peer, which then provides it."""
        target = self.swarm.net.holder(peer_id)
        if target is None or target.transfer is None or target.options.client_mode:
            raise FetchError(f"peer {peer_id[:12]} cannot be reached")
        size = self.store.size(blob_id)
        announced = any(
            r.body.delta_id == blob_id and r.body.size == size
            for r in target.read(ANNOUNCE, topic=base)
        )
        if not announced:
            return pb.UploadResult(reason="not an announced delta")
        target.transfer.store.add_file(self.store.path(blob_id))
        self.stats.bytes_out += size
        target.transfer.stats.bytes_in += size
        target.transfer.announce(blob_id)
        return pb.UploadResult(accepted=True)
