"""The whole swarm at a glance, from its records: who is there, the head, lags, rounds, rates.

Volunteers behind NAT cannot be scraped, but every peer heart-beats into the
DHT; :func:`read_view` turns those heartbeats (and the head and lease
records) into one picture, which ``mergeswarm monitor`` exports to Prometheus
and ``mergeswarm status`` prints. Heartbeats expire after a minute, so a peer
that stops beating drops out by itself.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from hivemind.utils import get_dht_time

from node.chain.history import current_head, find_config, trusted_authors
from node.net.member import SwarmMember
from protocol.records import HEARTBEAT, Head, Heartbeat
from protocol.swarm_config import SwarmConfig


@dataclass(frozen=True)
class PeerView:
    peer_id: str
    author: str
    beat: Heartbeat
    lag: int | None  # rounds behind the head (None: no head seen by it, or none yet)


@dataclass
class SwarmView:
    swarm_id: str
    head: Head | None
    peers: list[PeerView] = field(default_factory=list)
    now: float = 0.0
    config: SwarmConfig | None = None

    @property
    def head_age_seconds(self) -> float | None:
        if self.head is None or self.head.created is None:
            return None
        return max(0.0, self.now - self.head.created)

    def count_by(self) -> Counter[tuple[str, str]]:
        return Counter((p.beat.role, p.beat.version) for p in self.peers)

    def sum(self, name: str, role: str | None = None) -> float:
        return sum(
            float(getattr(p.beat, name) or 0) for p in self.peers if role in (None, p.beat.role)
        )

    def rejected(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for p in self.peers:
            total.update(p.beat.deltas_rejected)
        return total

    def lease_holders(self) -> list[PeerView]:
        return [p for p in self.peers if p.beat.role == "aggregator" and p.beat.lease]

    def max_lag(self) -> int:
        return max((p.lag for p in self.peers if p.lag is not None), default=0)

    def merge_seconds(self) -> float | None:
        """The last merge time of the aggregator that published the most recent round."""
        done = [p for p in self.peers if p.beat.merge_seconds is not None]
        if not done:
            return None
        return max(done, key=lambda p: (p.beat.head_round or 0, p.beat.lease)).beat.merge_seconds

    def to_json(self) -> dict:
        return {
            "swarm_id": self.swarm_id,
            "head": self.head.model_dump(mode="json") if self.head else None,
            "head_age_seconds": self.head_age_seconds,
            "peers": [
                {"peer_id": p.peer_id, "author": p.author, "lag": p.lag}
                | p.beat.model_dump(mode="json", exclude={"peer_id"})
                for p in self.peers
            ],
            "totals": {
                "samples_per_second": self.sum("samples_per_second", "volunteer"),
                "bytes_in": self.sum("bytes_in"),
                "bytes_out": self.sum("bytes_out"),
                "deltas_accepted": self.sum("deltas_accepted"),
                "deltas_rejected": dict(self.rejected()),
            },
        }


def read_view(swarm: SwarmMember, trusted: set[str] | None = None) -> SwarmView:
    """The swarm as its records tell it now (``trusted``: whose heads count; default: the
    aggregators the swarm's config names, or anyone; nobody's while a swarm whose id
    carries a trust anchor shows no config)."""
    config = find_config(swarm)
    head = current_head(swarm, trusted if trusted is not None else trusted_authors(swarm, config))
    peers = []
    for record in swarm.read(HEARTBEAT):
        beat = record.body
        lag = None
        if head is not None and beat.head_round is not None:
            lag = max(0, head.round - beat.head_round)
        peers.append(PeerView(beat.peer_id, record.author, beat, lag))
    peers.sort(key=lambda p: (p.beat.role, p.peer_id))
    return SwarmView(swarm.swarm_id, head, peers, now=get_dht_time(), config=config)
