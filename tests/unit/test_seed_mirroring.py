"""What a seed mirrors, on an in-memory swarm (tests/unit/world.py): the head its trusted
aggregators chose, that head's blobs and the deltas announced against it, and nothing once
it is not needed. With daemons on libp2p: tests/test_blob_exchange.py."""

from __future__ import annotations

import os
import threading
import time

import pytest

from node.config import SeedSettings
from node.net.blobstore import DELTA_PIN, HEAD_PIN
from node.net.member import SwarmError
from node.net.swarm import HEAD_TTL
from node.seed import Seed, genesis_head
from protocol.records import ANNOUNCE, HEAD, DeltaAnnouncement, Head
from tests.unit.world import World, step


@pytest.fixture
def world(tmp_path, tiny_base) -> World:
    return World(tmp_path, tiny_base)


def test_a_seed_follows_only_trusted_aggregators_and_mirrors_what_the_head_needs(world, finetunes):
    agg = world.aggregator("agg", world.config(["agg"]), genesis=world.genesis)
    step(agg)
    rogue, rogue_store = world.peer("rogue")  # a higher head from a key nobody trusts
    fake = genesis_head(rogue_store, finetunes[0], round_=99, parent=world.genesis_id)
    rogue.transfers(rogue_store).announce(fake.snapshot_id)
    assert rogue.publish(HEAD, fake, ttl=HEAD_TTL)
    seed = Seed(*world.peer("seed"), SeedSettings(trusted_aggregators=[world.author("agg")]))
    plain_seed = Seed(*world.peer("plain-seed"))  # no list: the swarm's config names "agg"
    delta = world.announce_delta(finetunes[1])
    for s in (seed, plain_seed):
        s.mirror_once(threading.Event())
    assert seed.head == agg.head == plain_seed.head != fake
    assert HEAD_PIN in seed.store.pins(agg.head.snapshot_id)
    assert DELTA_PIN in seed.store.pins(delta)
    step(agg)  # round 1 merges the delta: the seed lets go of it
    seed.mirror_once(threading.Event())
    assert seed.head.round == 1
    assert seed.store.pins(delta) == []
    root = agg.chain[agg.head.parent].snapshot_id  # a newcomer rebuilds round 1 from it
    assert HEAD_PIN in seed.store.pins(root) and HEAD_PIN in seed.store.pins(agg.head.patch_id)

    # A day later, what was let go of and not served since is collected; the head's blobs stay.
    seed.tick()  # offering everything it holds
    day_ago = time.time() - 25 * 3600
    for blob_id in seed.store.ids():
        os.utime(seed.store.path(blob_id), (day_ago, day_ago))
    collected = seed.collect_garbage()
    assert collected == [delta]
    assert {root, agg.head.patch_id} <= set(seed.store.ids())
    assert delta in seed.shared
    seed.tick()  # and it stops refreshing its offer of what it no longer holds
    assert delta not in seed.shared


def test_a_seed_without_mirroring_fetches_nothing(world):
    step(world.aggregator("agg", world.config(["agg"]), genesis=world.genesis))
    seed = Seed(*world.peer("seed"), SeedSettings(mirror=False))
    stop = threading.Event()
    thread = threading.Thread(target=seed.mirror_forever, args=(stop, 0.01))
    thread.start()
    time.sleep(0.1)
    stop.set()
    thread.join()
    assert seed.store.ids() == []


def test_a_blob_whose_holder_went_offline_is_retried_later_not_at_once(world):
    agg = world.aggregator("agg", world.config(["agg"]), genesis=world.genesis)
    step(agg)
    seed = Seed(*world.peer("seed"))
    agg.swarm.online = False
    with pytest.raises(SwarmError, match="offline"):
        agg.swarm.publish(HEAD, Head(base_id=agg.head.base_id, round=5, deltas=0), ttl=60)
    seed.mirror_once(threading.Event())  # the head record is still there, its blob is not
    assert seed.head == agg.head and seed.store.ids() == []
    agg.swarm.online = True
    seed.mirror_once(threading.Event())  # backing off: not asked again yet
    assert seed.store.ids() == []
    seed.retries.clear()
    seed.mirror_once(threading.Event())
    assert seed.store.has(agg.head.snapshot_id)


def test_a_seed_mirrors_no_delta_larger_than_the_swarm_allows_or_filed_elsewhere(world, finetunes):
    agg = world.aggregator(
        "agg", world.config(["agg"], max_delta_bytes=1 << 20), genesis=world.genesis
    )
    step(agg)
    fine = world.announce_delta(finetunes[0])
    liar, _ = world.peer("liar")
    claim = DeltaAnnouncement(base_id=world.genesis_id, delta_id="e" * 64, size=1 << 30, round=0)
    assert liar.publish(ANNOUNCE, claim, topic=world.genesis_id)  # too large to be merged
    other, _ = world.peer("other")
    elsewhere = claim.model_copy(update={"base_id": "d" * 64, "size": 1000})
    assert other.publish(ANNOUNCE, elsewhere, topic=world.genesis_id)  # names another base
    seed = Seed(*world.peer("seed"))
    wanted = seed.wanted()
    assert fine in wanted and "e" * 64 not in wanted
    assert {reason for reason, _ in wanted.values()} == {HEAD_PIN, DELTA_PIN}
    assert [b for b, (reason, _) in wanted.items() if reason == DELTA_PIN] == [fine]
