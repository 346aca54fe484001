"""Provider records: a peer announces the blobs it offers (whole or in part) and finds who
offers one."""

from __future__ import annotations

import logging

from node.net.member import SwarmMember
from protocol.records import PROVIDER, Provider

logger = logging.getLogger(__name__)

PROVIDER_TTL = 300.0  # refreshed while the peer offers the blob


def announce(swarm: SwarmMember, blob_id: str, complete: bool = True) -> bool:
    """Publish that this peer provides ``blob_id`` (refreshed until withdrawn)."""
    body = Provider(
        blob_id=blob_id,
        peer_id=swarm.peer_id.to_base58(),
        maddrs=tuple(swarm.maddrs[:8]),
        complete=complete,
        binding=swarm.binding,
    )
    return swarm.publish(PROVIDER, body, topic=blob_id, ttl=PROVIDER_TTL)


def providers(swarm: SwarmMember, blob_id: str) -> list[Provider]:
    """Peers that announced ``blob_id`` (complete ones first), this peer excluded."""
    me = swarm.peer_id.to_base58()
    found = [r.body for r in swarm.read(PROVIDER, topic=blob_id)]
    found = [p for p in found if p.peer_id != me]
    return sorted(found, key=lambda p: not p.complete)
