"""Reading a swarm's state from its records: its config, its head, the chain of bases behind it."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

from hivemind.utils import get_dht_time

from node.chain.bases import Bases
from node.net.member import Record, SwarmMember
from protocol.errors import MergeswarmError
from protocol.forkchoice import choose_head
from protocol.handover import MAX_EPOCHS, Handover, config_digest, next_config
from protocol.records import (
    BASE,
    CONFIG,
    HANDOVER,
    HEAD,
    OWNER_MARK,
    B,
    Head,
    Kind,
    owned_topic,
)
from protocol.swarm_config import SwarmConfig, swarm_anchor

logger = logging.getLogger(__name__)

MAX_CHAIN = 10_000  # rounds walked back at most (a loop of forged parents ends here)


CONFIG_LOOK_SECONDS = 60.0  # between looks for a handover of a config already known


@dataclass(frozen=True)
class ConfigChain:
    """The swarm's first config and the handovers that follow it (protocol.handover)."""

    root: SwarmConfig
    handovers: list[Handover]

    @property
    def latest(self) -> SwarmConfig:
        return self.handovers[-1].config if self.handovers else self.root


def find_config(swarm: SwarmMember) -> SwarmConfig | None:
    """The swarm's config as its aggregators published it and handed it over, or None.

    The root is a config record of epoch 0 by an aggregator it names (anyone, for an open
    swarm that names none): the smallest such author, so every reader picks the same. Where the
    swarm id carries a trust anchor, only the aggregators the swarm was made with can be named
    (protocol.swarm_config). From the root, each handover that most of the aggregators before
    it endorsed leads to the next config (protocol.handover). Every DHT node checks both on
    store (protocol.records). Pin a config file to trust nothing here.
    """
    chain = config_chain(swarm)
    return chain.latest if chain else None


def config_chain(swarm: SwarmMember) -> ConfigChain | None:
    """The root config and the handovers that follow it, as far as they are in sight."""
    anchored = swarm_anchor(swarm.swarm_id) is not None
    # open_record keeps only epoch-0 configs of this swarm by an aggregator they name
    root = next((r.body for r in swarm.read(CONFIG)), None)  # sorted by author
    if root is None:
        return None
    handovers: list[Handover] = []
    config = root
    while anchored and config.aggregators and len(handovers) < MAX_EPOCHS:
        offered = swarm.read(HANDOVER, topic=config_digest(config))
        found = next_config(config, (r.body for r in offered))
        if found is None:
            break
        handovers.append(found)
        config = found.config
    return ConfigChain(root, handovers)


class ConfigWatch:
    """A role's look at the swarm's config as it is handed over: at once while the role knows
    none, then at most every CONFIG_LOOK_SECONDS, and only ever forward (a handover record
    out of sight does not undo one)."""

    def __init__(self, swarm: SwarmMember) -> None:
        self.swarm = swarm
        self.read_at = -math.inf  # when the records were last read (time.monotonic)

    def newer(self, current: SwarmConfig | None) -> ConfigChain | None:
        """The chain, when its latest config is past ``current`` (any, for None) and a look
        is due; else None."""
        if current is not None and time.monotonic() - self.read_at < CONFIG_LOOK_SECONDS:
            return None
        self.read_at = time.monotonic()
        chain = config_chain(self.swarm)
        if chain is None or (current is not None and chain.latest.epoch <= current.epoch):
            return None
        return chain


def trusted_authors(
    swarm: SwarmMember, config: SwarmConfig | None, own: Collection[str] = ()
) -> set[str] | None:
    """Whose heads count: ``own`` and the config's aggregators (empty: anyone's). None while
    a swarm whose id carries a trust anchor has no config in sight: follow nothing yet."""
    if config is None:
        return None if swarm_anchor(swarm.swarm_id) else set(own)
    return set(own) | set(config.aggregators)


def current_head(swarm: SwarmMember, trusted: Collection[str] | None) -> Head | None:
    """The head every role follows: fork choice over the heads by ``trusted`` authors (any
    author when empty; none when None)."""
    if trusted is None:
        return None
    records = read_owned(swarm, HEAD, trusted)
    chosen = choose_head([(r.author, r.body) for r in records], trusted, get_dht_time())
    return chosen[1] if chosen else None


def read_owned(
    swarm: SwarmMember, kind: Kind[B], trusted: Collection[str], subject: str = ""
) -> list[Record[B]]:
    """The records of ``kind`` (about ``subject``) by ``trusted`` authors, each read under its
    author's owned topic, where a crowd under the shared key cannot hide it; for an empty
    ``trusted`` (anyone's), the shared key's."""
    if not trusted:
        return swarm.read(kind, topic=subject)
    return [r for a in sorted(trusted) for r in swarm.read(kind, topic=owned_topic(a, subject))]


def publish_both(swarm: SwarmMember, kind: Kind[B], body: B, ttl: float, subject: str = "") -> None:
    """Publish (and keep refreshing) ``body`` under the shared key, which readers who trust
    anyone read, and under this author's owned topic, which readers who trust it read."""
    swarm.publish(kind, body, topic=subject, ttl=ttl)
    swarm.publish(kind, body, topic=owned_topic(swarm.identity.author, subject), ttl=ttl)


def withdraw_both(swarm: SwarmMember, kind: Kind, subject: str = "") -> None:
    """Stop refreshing what :func:`publish_both` published."""
    swarm.withdraw(kind, topic=subject)
    swarm.withdraw(kind, topic=owned_topic(swarm.identity.author, subject))


def withdraw_bases_but(swarm: SwarmMember, keep: Collection[str]) -> None:
    """Stop refreshing this peer's records of bases other than ``keep``: they age out, and
    what a peer refreshes stays bounded however long it runs."""
    for subject in swarm.publishing(BASE):
        if OWNER_MARK not in subject and subject not in keep:
            withdraw_both(swarm, BASE, subject)


def publish_head(swarm: SwarmMember, head: Head, ttl: float) -> None:
    """Publish ``head`` as the head, and as the record of its base for walking chains back."""
    publish_both(swarm, BASE, head, ttl, subject=head.base_id)
    publish_both(swarm, HEAD, head, ttl)


def base_record(swarm: SwarmMember, base: str, trusted: set[str]) -> Head | None:
    """What an aggregator published about ``base`` when it was the head."""
    records = read_owned(swarm, BASE, trusted, subject=base)
    heads = [(r.author, r.body) for r in records if r.body.base_id == base]
    chosen = choose_head(heads, trusted)
    return chosen[1] if chosen else None


def chain_to(
    swarm: SwarmMember, *, round_: int | None = None, base: str | None = None
) -> list[Head]:
    """The heads from the nearest snapshot up to the target (the head, round N or base ID)."""
    trusted = trusted_authors(swarm, find_config(swarm))
    if trusted is None:
        raise MergeswarmError(
            "no config of this swarm from the aggregators its id was made with is in sight yet"
        )
    head = current_head(swarm, trusted)
    if head is None:
        raise MergeswarmError("the swarm has no head yet (no aggregator has published one)")
    target = head
    if base is not None and base != head.base_id:
        target = base_record(swarm, base, trusted)
        if target is None:
            raise MergeswarmError(f"no aggregator of the swarm knows base {base[:16]}")
    elif round_ is not None:
        if round_ > head.round:
            raise MergeswarmError(f"round {round_} is ahead of the head (round {head.round})")
        while target.round > round_:
            target = _parent(swarm, target, trusted)
    return chain_back(swarm, target, trusted, held=lambda _: False)


def chain_back(
    swarm: SwarmMember, head: Head, trusted: set[str], held: Callable[[str], bool]
) -> list[Head]:
    """The heads to apply, oldest first, to get ``head`` from the bases already ``held``:
    patches back to a held base, or to the nearest snapshot when none is held."""
    chain: list[Head] = []
    current = head
    while not held(current.base_id):
        chain.append(current)
        if current.snapshot_id is not None or (current.parent and held(current.parent)):
            break
        if len(chain) > MAX_CHAIN:
            raise MergeswarmError("no snapshot within reach of the target base")
        current = _parent(swarm, current, trusted)
    return chain[::-1]


def _parent(swarm: SwarmMember, head: Head, trusted: set[str]) -> Head:
    if head.parent is None:
        raise MergeswarmError(f"base {head.base_id[:16]} (round {head.round}) has no parent")
    parent = base_record(swarm, head.parent, trusted)
    if parent is None:
        raise MergeswarmError(f"the parent of round {head.round} is no longer published")
    if parent.round != head.round - 1:  # a head may not skip rounds, nor loop back
        raise MergeswarmError(
            f"round {head.round} names a parent of round {parent.round}: not its chain"
        )
    return parent


def descends(swarm: SwarmMember, head: Head, ancestor: str, trusted: set[str], within: int) -> bool:
    """Whether ``head`` was merged from base ``ancestor``, at most ``within`` rounds back
    (False when the records that would tell are gone)."""
    current = head
    for _ in range(within):
        if current.parent is None:
            return False
        if current.parent == ancestor:
            return True
        try:
            current = _parent(swarm, current, trusted)
        except MergeswarmError:
            return False
    return False


def head_blobs(heads: Iterable[Head]) -> set[str]:
    """The patches and snapshots ``heads`` name: what a peer needs to rebuild them."""
    return {b for h in heads for b in (h.patch_id, h.snapshot_id) if b}


def sync_head(swarm: SwarmMember, bases: Bases, head: Head, trusted: set[str]) -> Path:
    """The head's verified model directory, patched forward from a held base or the nearest
    snapshot; with the history gone, from the head's own patch or snapshot."""
    try:
        chain = chain_back(swarm, head, trusted, bases.has)
    except MergeswarmError:
        chain = [head]
    for step in chain:
        bases.sync(step)
    return bases.sync(head)
