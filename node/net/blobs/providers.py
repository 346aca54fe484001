"""Provider records: a peer announces the blobs it offers (whole or in part) and finds who
offers one.

A blob's records stand under its first key until that holds FIRST_KEY_ROOM of them; later
holders announce under the one of ``PROVIDER_SHARDS`` overflow keys that their peer id
picks (protocol.records.provider_topic). A reader reads the first key alone while it is not
crowded: a swarm of up to a few hundred holders costs one look-up, as one key always did.
Once it is, the reader also reads OVERFLOW_READS overflow keys picked at random and keeps as
large a random share of the first key, so that each reader sees its own random eighth of
the holders: no key fills (the DHT keeps MAX_AUTHORS_PER_KEY authors a key) and no holder is
everyone's source. scripts/simulate_swarm.py decides through the same functions.
"""

from __future__ import annotations

import logging
import math
import random

from node.net.member import SwarmMember
from protocol.records import PROVIDER, PROVIDER_SHARDS, Provider, provider_shard, provider_topic

logger = logging.getLogger(__name__)

PROVIDER_TTL = 300.0  # refreshed while the peer offers the blob
FIRST_KEY_ROOM = 256  # holders under a blob's first key past which it is crowded
OVERFLOW_READS = 2  # overflow keys a reader of a crowded first key reads


def crowded(first_key_holders: int) -> bool:
    """Whether a blob's first key holds enough records that newcomers announce under their
    overflow key, and readers read overflow keys too."""
    return first_key_holders >= FIRST_KEY_ROOM


def overflow_shards(rng: random.Random | None = None) -> list[int]:
    """The overflow keys a reader of a crowded first key reads: OVERFLOW_READS at random."""
    return (rng or random).sample(range(PROVIDER_SHARDS), OVERFLOW_READS)


def first_key_share(first_key_holders: int) -> int:
    """How many of a crowded first key's records a reader keeps (a random pick of them): the
    share the overflow keys it read have of theirs, so its first holders are no busier."""
    return math.ceil(first_key_holders * OVERFLOW_READS / PROVIDER_SHARDS)


def _overflow_topic(swarm: SwarmMember, blob_id: str) -> str:
    return provider_topic(blob_id, provider_shard(swarm.peer_id.to_base58()))


def announce(
    swarm: SwarmMember, blob_id: str, complete: bool = True, first_key: int | None = None
) -> bool:
    """Publish that this peer provides ``blob_id`` (refreshed until withdrawn): under the
    blob's first key while it is not crowded (or already holds this peer's record), under
    this peer's overflow key otherwise, or when the first key's DHT nodes refuse it.
    ``first_key``: how many records a fetch just read there, which spares reading it again
    (a fetch announces as its first piece lands, and a look-up then delays the others)."""
    me = swarm.peer_id.to_base58()
    body = Provider(
        blob_id=blob_id,
        peer_id=me,
        maddrs=tuple(swarm.maddrs[:8]),
        complete=complete,
        binding=swarm.binding,
    )
    topic = provider_topic(blob_id)
    if first_key is None or crowded(first_key):  # maybe crowded: is this peer there already?
        first = {r.body.peer_id for r in swarm.read(PROVIDER, topic=topic)}
        if me not in first and crowded(len(first)):
            topic = _overflow_topic(swarm, blob_id)
    stored = swarm.publish(PROVIDER, body, topic=topic, ttl=PROVIDER_TTL)
    if not stored and topic == provider_topic(blob_id):  # filled up meanwhile
        topic = _overflow_topic(swarm, blob_id)
        stored = swarm.publish(PROVIDER, body, topic=topic, ttl=PROVIDER_TTL)
    for other in (provider_topic(blob_id), _overflow_topic(swarm, blob_id)):
        if other != topic:  # an earlier record (a partial one) stops being refreshed
            swarm.withdraw(PROVIDER, topic=other)
    return stored


def withdraw(swarm: SwarmMember, blob_id: str) -> None:
    """Stop refreshing this peer's provider record of ``blob_id`` (it ages out)."""
    swarm.withdraw(PROVIDER, topic=provider_topic(blob_id))
    swarm.withdraw(PROVIDER, topic=_overflow_topic(swarm, blob_id))


def providers(
    swarm: SwarmMember,
    blob_id: str,
    *,
    everyone: bool = False,
    rng: random.Random | None = None,
) -> list[Provider]:
    """Peers that announced ``blob_id`` (complete ones first), this peer excluded: the first
    key's, and once it is crowded a random share of them and OVERFLOW_READS overflow keys'
    (``everyone``: every record under every key, for a count)."""
    return read_providers(swarm, blob_id, everyone=everyone, rng=rng)[0]


def read_providers(
    swarm: SwarmMember,
    blob_id: str,
    *,
    everyone: bool = False,
    rng: random.Random | None = None,
) -> tuple[list[Provider], int]:
    """:func:`providers`, and how many records stand under the blob's first key."""
    rng = rng or random
    found = [r.body for r in swarm.read(PROVIDER, topic=provider_topic(blob_id))]
    first_key = len(found)
    if everyone or crowded(len(found)):
        shards = range(PROVIDER_SHARDS) if everyone else overflow_shards(rng)
        if not everyone:
            found = rng.sample(found, first_key_share(len(found)))
        topics = [provider_topic(blob_id, shard) for shard in shards]
        for records in swarm.read_many(PROVIDER, topics).values():
            found += [r.body for r in records]
    me = swarm.peer_id.to_base58()
    by_peer: dict[str, Provider] = {}
    for body in found:
        if body.blob_id != blob_id or body.peer_id == me:
            continue
        if body.peer_id not in by_peer or body.complete:  # a peer's newer, whole record
            by_peer[body.peer_id] = body
    return sorted(by_peer.values(), key=lambda p: not p.complete), first_key
