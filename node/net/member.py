"""A peer's membership of its swarm, whatever carries it: signed records and blob transfers.

:class:`SwarmMember` is what the daemons hold. A peer publishes records under
its author (the DHT subkey), remembers the ones it owns so that it can refresh
them before they expire, and verifies every record it reads again (signature,
key, expiry, body schema), counting the ones it drops by reason;
:meth:`SwarmMember.transfers` gives its blob exchange.
Where the key-value pairs and blobs travel is the backend's business: a
hivemind DHT and libp2p streams (:class:`node.net.swarm.Swarm`) or tables and
stores shared by peers in one process (:class:`node.net.memory.MemorySwarm`).
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Generic, overload

from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from node.config import SwarmOptions
from protocol.errors import MergeswarmError
from protocol.identity import Identity
from protocol.peer_binding import PeerBinding, bind
from protocol.records import BODIES, B, Kind, RecordError, open_record, record_key, sign_record
from protocol.schema import Body

if TYPE_CHECKING:
    from node.net.blobs.serve import ServeLimits
    from node.net.blobs.transfers import Transfers
    from node.net.blobstore import BlobStore

logger = logging.getLogger(__name__)


def _known(kind: Kind | str) -> str:
    if str(kind) not in BODIES:
        raise ValueError(f"unknown record kind {kind!r}")
    return str(kind)


class SwarmError(MergeswarmError):
    """Joining or talking to the swarm failed; the message says what to try."""


class PeerDeaf(SwarmError):
    """This peer can no longer call or answer other peers, though it still runs: a daemon
    stops on it (exits non-zero, for its supervisor to restart it) rather than linger."""


@dataclass(frozen=True)
class Record(Generic[B]):
    """A verified record read from the swarm."""

    author: str
    body: B
    expires: float


class SwarmMember(ABC):
    """Publish, refresh, withdraw and read signed records, and exchange blobs; subclasses
    carry the bytes."""

    options: SwarmOptions
    data_dir: Path
    swarm_id: str
    identity: Identity  # signs records (the DHT subkey is its author)
    peer_id: PeerID
    maddrs: list[str]  # where others dial it (empty where nobody can)

    p2p_key: rsa.RSAPrivateKey  # the libp2p key the peer id hashes from

    def check_alive(self) -> None:  # noqa: B027 - only a peer on a real p2pd can go deaf
        """Raise PeerDeaf when this peer has lost its link to the network (see Swarm)."""

    @property
    def binding(self) -> PeerBinding:
        """This peer's libp2p key vouching for its author (provider records carry it)."""
        author = self.identity.author
        if self._binding is None or self._binding[0] != author:  # made once per author
            self._binding = (author, bind(self.p2p_key, author))
        return self._binding[1]

    def __init__(self) -> None:
        self._binding: tuple[str, PeerBinding] | None = None
        self.rejected: dict[str, int] = {}  # records dropped on read, by reason
        self._owned: dict[tuple[str, str], tuple[Body, float]] = {}
        self._lock = threading.Lock()

    # -- the backend --------------------------------------------------------------

    @abstractmethod
    def _put(self, key: str, value: bytes, expires: float, what: str) -> bool:
        """Store ``value`` under ``key`` and this peer's author; whether it was stored."""

    @abstractmethod
    def _get(self, key: str, what: str) -> dict[object, tuple[object, float]]:
        """Every entry under ``key``: subkey -> (value, expiration), unchecked."""

    def _get_many(
        self, keys: list[str], what: str
    ) -> dict[str, dict[object, tuple[object, float]]]:
        """:meth:`_get` of each of ``keys`` (a backend may look them up together)."""
        return {key: self._get(key, what) for key in keys}

    @abstractmethod
    def _store_rejections(self) -> dict[str, int]:
        """Records the backend itself refused (to store or to return), by reason."""

    @abstractmethod
    def transfers(self, store: BlobStore, limits: ServeLimits | None = None) -> Transfers:
        """This peer's blob exchange over ``store`` (serving starts now)."""

    @abstractmethod
    def shutdown(self) -> None:
        """Leave the swarm (idempotent)."""

    # -- records --------------------------------------------------------------------

    def publish(self, kind: Kind[B] | str, body: B, *, topic: str = "", ttl: float = 600.0) -> bool:
        """Sign and store a record (this author's entry under its key); remembered for refresh."""
        kind = str(kind)
        with self._lock:
            self._owned[(kind, topic)] = (body, ttl)
        return self._store(kind, topic, body, ttl)

    def _store(self, kind: str, topic: str, body: Body, ttl: float) -> bool:
        expires = get_dht_time() + ttl
        key, value = sign_record(self.identity, self.swarm_id, kind, topic, body, expires)
        return self._put(key, value, expires, f"storing a {kind} record")

    def withdraw(self, kind: Kind | str, *, topic: str = "") -> None:
        """Stop refreshing a record; it ages out at its expiration."""
        with self._lock:
            self._owned.pop((str(kind), topic), None)

    def publishing(self, kind: Kind | str) -> list[str]:
        """The topics of ``kind`` whose records this peer keeps refreshing."""
        with self._lock:
            return [topic for k, topic in self._owned if k == str(kind)]

    def refresh(self) -> int:
        """Re-publish every owned record with a fresh expiration; returns how many were stored."""
        with self._lock:
            owned = list(self._owned.items())
        stored = 0
        for (kind, topic), (body, ttl) in owned:
            with self._lock:
                if self._owned.get((kind, topic)) != (body, ttl):
                    continue  # replaced or withdrawn meanwhile
            stored += self._store(kind, topic, body, ttl)
        return stored

    @overload
    def read(self, kind: Kind[B], *, topic: str = "") -> list[Record[B]]: ...
    @overload
    def read(self, kind: str, *, topic: str = "") -> list[Record[Body]]: ...

    def read(self, kind: Kind | str, *, topic: str = "") -> list[Record]:
        """Every valid record of ``kind``/``topic``, one per author, verified again here
        (its body is of the kind's schema)."""
        key = record_key(self.swarm_id, _known(kind), topic)
        return self._open(str(kind), key, self._get(key, f"reading {kind} records"))

    def read_many(self, kind: Kind[B], topics: Sequence[str]) -> dict[str, list[Record[B]]]:
        """:meth:`read` of several topics of ``kind`` in one look-up, by topic."""
        keys = {record_key(self.swarm_id, _known(kind), topic): topic for topic in topics}
        found = self._get_many(list(keys), f"reading {kind} records")
        return {
            topic: self._open(str(kind), key, found.get(key, {})) for key, topic in keys.items()
        }

    def _open(
        self, kind: str, key: str, entries: dict[object, tuple[object, float]]
    ) -> list[Record]:
        now = get_dht_time()
        records = []
        for subkey, (value, expiration) in entries.items():
            try:
                if not isinstance(value, bytes):
                    raise RecordError("malformed", "record value is not an envelope")
                env, body = open_record(
                    value,
                    subkey=subkey,  # type: ignore[arg-type]  # checked by open_record
                    expiration=expiration,
                    now=now,
                    key=key,
                    swarm_id=self.swarm_id,
                )
            except RecordError as exc:
                self.rejected[exc.reason] = self.rejected.get(exc.reason, 0) + 1
                logger.info("dropped a %s record: %s", kind, exc)
                continue
            records.append(Record(env.author, body, env.expires))
        return sorted(records, key=lambda r: r.author)

    def rejection_counts(self) -> dict[str, int]:
        """Records this peer refused: on read here, and by its store (on store or lookup)."""
        counts = dict(self._store_rejections())
        counts.pop("accepted", None)
        for reason, n in self.rejected.items():
            counts[reason] = counts.get(reason, 0) + n
        return counts
