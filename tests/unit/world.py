"""A swarm in one process for the roles' tests: a MemoryNet and helpers that make its peers.

Real daemons' classes, real signed records, real blob stores and a real tiny model; only
the DHT and the streams are in memory (node.net.memory), so a round takes milliseconds.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from aggregator.daemon import Aggregator
from node.chain.history import publish_both
from node.config import AggregatorSettings
from node.data_dir import DataDir
from node.net.blobstore import BlobStore
from node.net.memory import MemoryNet, MemorySwarm
from protocol.delta import create_delta
from protocol.handover import Handover
from protocol.identity import Identity
from protocol.ids import base_id
from protocol.records import ANNOUNCE, DeltaAnnouncement, Head, owned_topic
from protocol.swarm_config import SwarmConfig, anchored_swarm_id, parse_config


class World:
    """Peers of one MemoryNet, each with a data dir under ``root``; ``genesis`` is the base."""

    def __init__(self, root: Path, genesis: Path) -> None:
        self.root = root
        self.genesis = genesis
        self.genesis_id = base_id(genesis)
        self.net = MemoryNet("mem-swarm")
        self.made = 0

    def anchor(self, aggregators: list[str]) -> str:
        """Give the swarm an id that commits to the genesis and these aggregators (as
        ``mergeswarm init`` does); call before any peer joins. The new id."""
        assert not self.net.peers, "peers joined under the old id"
        names = [self.author(name) for name in aggregators]
        self.net = MemoryNet(anchored_swarm_id("mem-swarm", self.genesis_id, names))
        return self.net.swarm_id

    def peer(self, name: str) -> tuple[MemorySwarm, BlobStore]:
        """Join (or, with a data dir used before, rejoin) the swarm: (swarm, blob store)."""
        swarm = self.net.join(self.root / name)
        return swarm, BlobStore(self.root / name / "blobs")

    def author(self, name: str) -> str:
        """The author key of the peer ``name`` (made now if it is new)."""
        return Identity.load_or_create(DataDir(self.root / name).identity).author

    def config(self, aggregators: list[str], **rules) -> SwarmConfig:
        """A swarm config that trusts the peers named ``aggregators``."""
        values = {
            "swarm_id": self.net.swarm_id,
            "genesis_id": self.genesis_id,
            "aggregators": [self.author(name) for name in aggregators],
            "round_period": 1,  # never waited for: see step()
            "drop_rate": 0.5,
        }
        return parse_config(values | rules, "test")

    def aggregator(
        self, name: str, config: SwarmConfig, handovers: Sequence[Handover] = (), **settings
    ) -> Aggregator:
        """An aggregator on the peer ``name`` (give ``genesis=world.genesis`` to the first)."""
        agg = Aggregator(*self.peer(name), config, AggregatorSettings(**settings), handovers)
        agg.lease_settle = 0.0  # one process: every claim is visible at once
        return agg

    def announce_delta(
        self, finetuned: Path, *, base: Path | None = None, head: Head | None = None, seed: int = 1
    ) -> str:
        """A new volunteer-like peer offers ``finetuned - base`` against ``head`` (default: the
        genesis, and ``base`` the genesis model); the delta's id."""
        self.made += 1
        swarm, store = self.peer(f"author{self.made}")
        path = self.root / f"delta{self.made}.msd"
        base = base or self.genesis
        create_delta(base, finetuned, path, identity=swarm.identity, drop_rate=0.5, seed=seed)
        return self.offer(swarm, store, path, head)

    def offer(
        self, swarm: MemorySwarm, store: BlobStore, path: Path, head: Head | None = None
    ) -> str:
        """``swarm`` stores, serves and announces the delta file ``path`` against ``head`` (as a
        volunteer does: under the base's shared key and its owned topic)."""
        delta = store.add_file(path)
        swarm.transfers(store).announce(delta)
        base, round_ = (head.base_id, head.round) if head else (self.genesis_id, 0)
        body = DeltaAnnouncement(base_id=base, delta_id=delta, size=store.size(delta), round=round_)
        publish_both(swarm, ANNOUNCE, body, ttl=600.0, subject=base)
        assert swarm.read(ANNOUNCE, topic=owned_topic(swarm.identity.author, base))
        return delta

    def holder_path(self, blob_id: str) -> Path:
        """Where some peer keeps ``blob_id``."""
        for peer in self.net.peers.values():
            if peer.transfer is not None and peer.transfer.store.has(blob_id):
                return peer.transfer.store.path(blob_id)
        raise AssertionError(f"nobody holds {blob_id[:8]}")


def step(agg: Aggregator) -> None:
    """One look at the swarm, as if the round period had passed since the head appeared."""
    agg.head_seen_at = time.monotonic() - agg.config.round_period
    agg.step()
