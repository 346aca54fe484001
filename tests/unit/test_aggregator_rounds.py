"""The aggregator's rounds on an in-memory swarm (tests/unit/world.py): who holds a round's
lease, what a standby finishes, which deltas a round refuses, and a chain whose momentum any
aggregator continues bit for bit. The same with daemons on libp2p: tests/test_aggregator.py."""

from __future__ import annotations

import json
import secrets
import threading
import time

import pytest
from hivemind.utils import get_dht_time
from prometheus_client import generate_latest

from aggregator.engine import MergeInput, merge_models
from aggregator.methods import Recipe
from aggregator.outer import OuterStep, outer_lr
from node.config import AggregatorSettings, MonitorSettings
from node.monitor.monitor import Monitor
from node.net.blobstore import HEAD_PIN
from node.seed import Seed
from node.training.tiny_model import CORPUS
from protocol.delta import TensorMap, create_delta
from protocol.identity import Identity
from protocol.ids import file_hasher
from protocol.model_dir import ModelDir
from protocol.records import (
    ANNOUNCE,
    BASE,
    LEASE,
    MAX_AUTHORS_PER_KEY,
    OWNER_MARK,
    DeltaAnnouncement,
    Lease,
    sign_record,
)
from tests.forge import nan_delta, scaled_finetune
from tests.unit.world import World, step


@pytest.fixture
def world(tmp_path, tiny_base) -> World:
    return World(tmp_path, tiny_base)


def test_a_round_merges_the_announced_deltas_into_a_head_every_role_follows(world, finetunes):
    agg = world.aggregator("agg", world.config(["agg"]), genesis=world.genesis)
    step(agg)  # no head yet: it publishes the genesis
    assert agg.head is not None and agg.head.round == 0
    ids = [world.announce_delta(ft, seed=i) for i, ft in enumerate(finetunes[:2])]
    step(agg)
    head = agg.head
    assert head.round == 1 and sorted(head.merged) == sorted(ids)
    assert agg.holding is None  # released once published
    seed = Seed(*world.peer("seed"))
    seed.mirror_once(threading.Event())
    assert seed.head == head
    assert HEAD_PIN in seed.store.pins(head.patch_id)
    monitor = Monitor(*world.peer("monitor"), MonitorSettings())
    agg.tick()  # its heartbeat
    monitor.tick()
    assert monitor.view.head == head
    assert sorted(p.beat.role for p in monitor.view.peers) == ["aggregator", "monitor"]


def _six_heads(world, agg, finetunes) -> list:
    """The genesis and five rounds, each merging one delta."""
    step(agg)
    heads = [agg.head]
    for r in range(1, 6):
        base = agg.bases.path(agg.head.base_id)
        world.announce_delta(finetunes[r % 3], base=base, head=agg.head, seed=r)
        step(agg)
        heads.append(agg.head)
    return heads


def test_an_aggregator_keeps_pinned_only_what_rebuilds_its_recent_heads(world, finetunes):
    agg = world.aggregator(
        "agg", world.config(["agg"], snapshot_every=3, staleness=0), genesis=world.genesis
    )
    heads = _six_heads(world, agg, finetunes)  # snapshots at rounds 0 and 3
    assert [h.snapshot_id is not None for h in heads] == [True, False, False, True, False, False]
    pinned = {b for b in agg.store.ids() if HEAD_PIN in agg.store.pins(b)}
    # the last KEEP_BASES - 1 heads (4, 5) and the chain back to round 3's snapshot
    assert pinned == {heads[5].patch_id, heads[4].patch_id, heads[3].patch_id, heads[3].snapshot_id}
    released = {heads[0].snapshot_id, heads[1].patch_id, heads[2].patch_id}
    assert released <= set(agg.store.ids())  # unpinned, kept until unused for the retention


def test_an_aggregator_keeps_publishing_only_the_base_records_of_its_recent_chain(
    world, finetunes, monkeypatch
):
    monkeypatch.setattr("aggregator.daemon.REPUTATION_WALK", 2)
    agg = world.aggregator(
        "agg", world.config(["agg"], snapshot_every=3, staleness=0), genesis=world.genesis
    )
    heads = _six_heads(world, agg, finetunes)  # snapshots at rounds 0 and 3
    # two rounds (5, 4), then back to round 3's snapshot; the others age out unrefreshed
    kept = {h.base_id for h in heads[3:]}
    assert set(agg.chain) == kept
    assert {t for t in agg.swarm.publishing(BASE) if OWNER_MARK not in t} == kept
    assert len(agg.swarm.publishing(BASE)) == 2 * len(kept)  # shared and owned topics
    assert agg.swarm.publishing(ANNOUNCE) == []


def test_authors_whose_deltas_weighed_in_a_merge_are_established_for_good(world, finetunes):
    config = world.config(["agg"], min_deltas=1, max_deltas=16)
    agg = world.aggregator("agg", config, genesis=world.genesis)
    step(agg)
    world.announce_delta(finetunes[0], seed=1)
    step(agg)  # a new swarm: nobody is held back, and author1 is established
    assert agg.reputation.established(world.author("author1"))
    known = [world.announce_delta(finetunes[i % 3], head=agg.head, base=_base(agg), seed=10 + i)
             for i in range(2)]  # fmt: skip
    agg.reputation.credit("an earlier head", [world.author("author2"), world.author("author3")])
    crowd = [world.announce_delta(finetunes[i % 3], head=agg.head, base=_base(agg), seed=20 + i)
             for i in range(8)]  # fmt: skip
    step(agg)  # eight new keys share a quarter of the round: 1/12 of a delta each, too little
    assert set(known + crowd) <= set(agg.head.merged)
    assert not any(agg.reputation.established(world.author(f"author{i}")) for i in range(4, 12))
    restarted = world.aggregator("agg", config)  # the same data directory
    assert restarted.reputation.merged == agg.reputation.merged


def test_a_delta_merged_in_one_round_is_not_merged_again_as_a_stale_one(world, finetunes):
    agg = world.aggregator(
        "agg", world.config(["agg"], min_deltas=1, staleness=2), genesis=world.genesis
    )
    step(agg)
    first = world.announce_delta(finetunes[0], seed=1)  # against the genesis
    step(agg)
    assert agg.head.merged == (first,)
    second = world.announce_delta(finetunes[1], head=agg.head, base=_base(agg), seed=2)
    step(agg)  # the first is still within the staleness window, but round 1 merged it
    assert agg.head.merged == (second,)
    third = world.announce_delta(finetunes[2], head=agg.head, base=_base(agg), seed=3)
    step(agg)
    assert agg.head.merged == (third,)


def test_every_aggregator_counts_the_reputation_the_signed_heads_give(world, finetunes):
    config = world.config(["a", "b"], min_deltas=1, max_deltas=16)
    a = world.aggregator("a", config, genesis=world.genesis)
    step(a)
    credited = []
    for r in range(1, 3):  # one new volunteer a round, each merged and credited in its head
        world.announce_delta(finetunes[r], head=a.head, base=_base(a), seed=r)
        step(a)
        credited += a.head.credited
    assert a.head.round == 2 and len(set(credited)) == 2 and len(a.head.merged) == 1
    b = world.aggregator("b", config)  # joins after both rounds, with no history of its own
    b.follow_head()
    assert b.head == a.head
    assert b.reputation.merged == a.reputation.merged == {author: 1 for author in credited}


def _base(agg):
    return agg.bases.path(agg.head.base_id)


def test_established_volunteers_take_the_slots_before_a_crowd_of_new_keys(world, finetunes):
    agg = world.aggregator(
        "agg", world.config(["agg"], min_deltas=2, max_deltas=2), genesis=world.genesis
    )
    step(agg)
    crowd = [world.announce_delta(finetunes[i % 3], seed=10 + i) for i in range(6)]
    known = [world.announce_delta(finetunes[i], seed=i) for i in range(2)]  # author7, author8
    agg.reputation.credit("an earlier head", [world.author("author7"), world.author("author8")])
    step(agg)
    assert sorted(agg.head.merged) == sorted(known)
    assert not set(crowd) & set(agg.head.merged)


def test_the_earliest_claim_holds_the_lease_and_the_other_aggregator_stands_by(world, finetunes):
    config = world.config(["a", "b"])
    a = world.aggregator("a", config, genesis=world.genesis)
    b = world.aggregator("b", config, genesis=world.genesis)
    step(a)
    step(b)
    assert a.head == b.head and a.head.round == 0
    world.announce_delta(finetunes[0])
    assert a._lease(a.head)  # a claims round 1 and, for now, does not finish it
    step(b)
    assert b.status.startswith(f"standby: round 1 is leased to {world.author('a')[:16]}")
    assert b.head.round == 0 and b.holding is None


def test_a_standby_finishes_a_lapsed_round_with_the_deltas_its_lease_named(world, finetunes):
    config = world.config(["a", "b"])
    a = world.aggregator("a", config, genesis=world.genesis, lease_seconds=0.5)
    b = world.aggregator("b", config, lease_seconds=0.5)
    step(a)
    step(b)
    first = world.announce_delta(finetunes[0])
    assert a._lease(a.head)
    a.swarm.online = False  # the holder dies before it merges
    step(b)  # standby: it remembers what the lease named
    late = world.announce_delta(finetunes[1])
    time.sleep(0.6)  # the lease record expires
    step(b)
    assert b.head.round == 1
    assert b.head.merged == (first,), f"the late delta {late[:8]} joined a round begun without it"


def test_hostile_deltas_are_refused_once_and_counted_and_the_honest_ones_merged(
    world, tiny_base, tiny_finetuned
):
    agg = world.aggregator("agg", world.config(["agg"], min_deltas=2), genesis=world.genesis)
    step(agg)
    made = world.root / "made"
    made.mkdir()
    honest = [world.announce_delta(tiny_finetuned, seed=s) for s in (1, 2)]
    big = world.announce_delta(scaled_finetune(tiny_base, tiny_finetuned, made / "big", 100))
    world.announce_delta(tiny_base, base=tiny_finetuned)  # made against another base
    nan_swarm, nan_store = world.peer("nan")
    nan_delta(made / "nan.msd", tiny_base, nan_swarm.identity)
    world.offer(nan_swarm, nan_store, made / "nan.msd")
    copier, copier_store = world.peer("copier")  # someone else's delta, announced as its own
    world.offer(copier, copier_store, world.holder_path(honest[0]))
    step(agg)
    assert sorted(agg.head.merged) == sorted(honest)
    assert agg.rejected == {"norm": 1, "unknown_base": 1, "non_finite": 1, "bad_signature": 1}
    text = generate_latest(agg.metrics.registry).decode()
    for reason in agg.rejected:
        assert f'mergeswarm_deltas_rejected_total{{reason="{reason}"}} 1.0' in text
    assert "mergeswarm_deltas_accepted_total 2.0" in text
    genesis = agg.chain[agg.head.parent]  # refused once: never a candidate again
    assert len(agg.refused) == 3
    left = {(c.author, c.delta_id) for c in agg.candidates(genesis)}
    assert left.isdisjoint(agg.refused)
    assert big in {d for _, d in left}  # too large for this round's deltas, not for every round's


def test_with_evaluation_data_a_sign_flip_is_refused_for_no_gain_before_it_takes_a_slot(
    world, tiny_base, tiny_finetuned
):
    eval_data = world.root / "eval.jsonl"
    eval_data.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS * 4))
    config = world.config(["agg"], min_deltas=2, max_deltas=2)
    agg = world.aggregator("agg", config, genesis=world.genesis, eval_data=[str(eval_data)])
    step(agg)
    made = world.root / "made"
    made.mkdir()
    with ModelDir(tiny_base) as b, ModelDir(tiny_finetuned) as f:
        flip = TensorMap({n: 2 * b.tensor(n) - f.tensor(n) for n in b.names()})
    flippers = []
    for i in range(3):  # more sign flips than slots: none may take one
        swarm, store = world.peer(f"flipper{i}")
        path = made / f"flip{i}.msd"
        create_delta(tiny_base, flip, path, identity=swarm.identity, drop_rate=0.5, seed=10 + i)
        flippers.append(world.offer(swarm, store, path))
    honest = [world.announce_delta(tiny_finetuned, seed=s) for s in (1, 2)]
    step(agg)
    assert sorted(agg.head.merged) == sorted(honest)
    assert agg.rejected == {"no_gain": 3}
    text = generate_latest(agg.metrics.registry).decode()
    assert 'mergeswarm_deltas_rejected_total{reason="no_gain"} 3.0' in text


def test_a_closed_swarms_aggregator_takes_deltas_only_from_the_volunteers_it_names(
    world, tiny_finetuned
):
    listed = world.root / "volunteers.txt"  # announce_delta's peers are author1, author2, ...
    listed.write_text(f"{world.author('author1')}\n{world.author('author3')}\n")
    agg = world.aggregator(
        "agg", world.config(["agg"]), genesis=world.genesis, volunteers=[str(listed)]
    )
    step(agg)
    deltas = [world.announce_delta(tiny_finetuned, seed=s) for s in (1, 2, 3)]
    step(agg)
    assert sorted(agg.head.merged) == sorted([deltas[0], deltas[2]])
    assert agg.rejected == {}  # not refused: never a candidate


def test_a_volunteer_list_with_something_else_than_keys_is_refused(tmp_path):
    bad = tmp_path / "volunteers.txt"
    bad.write_text("ab" * 32 + "\nnot-a-key\n")
    with pytest.raises(ValueError, match="not-a-key"):
        AggregatorSettings(volunteers=[str(bad)]).allowed_volunteers()
    assert AggregatorSettings(volunteers=["cd" * 32]).allowed_volunteers() == {"cd" * 32}
    assert AggregatorSettings().allowed_volunteers() is None


def test_outer_momentum_is_chain_state_that_any_aggregator_continues_exactly(world, finetunes):
    config = world.config(
        ["a", "b"], outer_optimizer="nesterov", outer_lr=0.5, outer_momentum=0.8, staleness=0
    )
    a = world.aggregator("a", config, genesis=world.genesis, lease_seconds=0.3)
    seed = Seed(*world.peer("seed"))  # holds every head's momentum for whoever comes next
    step(a)
    heads = {0: a.head}
    seed.mirror_once(threading.Event())

    def offer(n: int) -> None:
        head = heads[max(heads)]
        base = next(x for x in (a, b) if x and x.bases.has(head.base_id)).bases.path(head.base_id)
        world.announce_delta(finetunes[n % 3], base=base, head=head, seed=n)

    b = None
    for r in (1, 2):  # a makes rounds 1 and 2 ...
        offer(r)
        step(a)
        heads[r] = a.head
        seed.mirror_once(threading.Event())
    offer(3)
    assert a._lease(a.head)  # ... and dies holding the lease of round 3
    a.swarm.online = False
    b = world.aggregator("b", config, lease_seconds=0.3)  # a late joiner takes round 3 over
    step(b)
    time.sleep(0.4)
    step(b)
    heads[3] = b.head
    seed.mirror_once(threading.Event())
    offer(4)
    step(b)
    heads[4] = b.head
    seed.mirror_once(threading.Event())
    b.swarm.online = False
    a = world.aggregator("a", config, lease_seconds=0.3)  # a, restarted, goes on from b's momentum
    offer(5)
    step(a)
    step(a)
    heads[5] = a.head
    assert [heads[r].round for r in range(6)] == list(range(6))
    authors = {r: seed.swarm.read(BASE, topic=heads[r].base_id)[0].author for r in range(1, 6)}
    assert authors[2] == authors[5] == world.author("a") and authors[3] == authors[4]
    assert authors[3] == world.author("b")

    # Each head is its parent, the deltas it names and the parent's momentum, bit for bit.
    recipe = Recipe.for_swarm(config)
    for r in (3, 5):
        h, parent = heads[r], heads[r - 1]
        outer = OuterStep(
            lr=outer_lr(config.outer_lr, config.outer_warmup, r),
            momentum=config.outer_momentum,
            previous=world.holder_path(parent.momentum_id),
            out=world.root / f"momentum{r}",
        )
        inputs = [MergeInput(world.holder_path(d)) for d in h.merged]
        parent_dir = next(x for x in (a, b) if x.bases.has(parent.base_id)).bases.path(
            parent.base_id
        )
        report = merge_models(parent_dir, inputs, recipe, world.root / f"redo{r}",
                              density=config.density, outer=outer)  # fmt: skip
        assert report.child_id == h.base_id
        assert file_hasher(outer.out).hexdigest() == h.momentum_id


def test_made_up_announcements_from_sixteen_keys_do_not_stall_the_round(world, finetunes):
    agg = world.aggregator(
        "agg", world.config(["agg"], min_deltas=2, max_deltas=4), genesis=world.genesis
    )
    step(agg)
    sybils = []
    for i in range(16):  # each offers an id nobody holds (and claims to provide it)
        swarm, store = world.peer(f"sybil{i}")
        fake = secrets.token_hex(32)
        swarm.transfers(store).announce(fake)
        body = DeltaAnnouncement(base_id=world.genesis_id, delta_id=fake, size=1000, round=0)
        assert swarm.publish(ANNOUNCE, body, topic=world.genesis_id)
        sybils.append((swarm.identity.author, fake))
    honest = [world.announce_delta(ft, seed=i) for i, ft in enumerate(finetunes[:2])]
    step(agg)
    assert agg.head.round == 1 and sorted(agg.head.merged) == sorted(honest)
    assert set(agg.unavailable) == set(sybils)  # each tried once, now skipped for a while
    assert not any(agg.store.has(fake) for _, fake in sybils)
    assert all(k not in agg.refused for k in sybils)  # absent, not proven bad: tried later
    ranked = agg.candidates(agg.chain[agg.head.parent])
    assert {(c.author, c.delta_id) for c in ranked}.isdisjoint(sybils)


def test_a_slot_goes_only_to_a_delta_that_arrived_and_max_deltas_holds(world, finetunes):
    agg = world.aggregator(
        "agg", world.config(["agg"], min_deltas=1, max_deltas=2), genesis=world.genesis
    )
    step(agg)
    honest = [world.announce_delta(finetunes[i % 3], seed=i) for i in range(4)]
    step(agg)
    assert agg.head.deltas == 2 and set(agg.head.merged) <= set(honest)


def test_an_announcement_filed_under_another_base_or_too_large_takes_no_fetch(
    world, tiny_finetuned
):
    agg = world.aggregator(
        "agg", world.config(["agg"], max_delta_bytes=1 << 20), genesis=world.genesis
    )
    step(agg)
    swarm, store = world.peer("liar")
    path = world.root / "liar.msd"
    create_delta(world.genesis, tiny_finetuned, path, identity=swarm.identity, drop_rate=0.5)
    delta = store.add_file(path)
    swarm.transfers(store).announce(delta)
    other = "e" * 64  # names another base than the topic it is filed under
    body = DeltaAnnouncement(base_id=other, delta_id=delta, size=store.size(delta), round=0)
    assert swarm.publish(ANNOUNCE, body, topic=world.genesis_id)
    huge = body.model_copy(update={"base_id": world.genesis_id, "size": 1 << 30})
    big, big_store = world.peer("big")
    assert big.publish(ANNOUNCE, huge, topic=world.genesis_id)
    assert [c.author for c in agg.candidates(agg.head)] == [big.identity.author]
    step(agg)
    assert agg.rejected == {"size": 1} and not agg.store.has(delta)
    assert agg.head.round == 0


def test_a_lease_dated_before_the_head_or_in_the_future_puts_nobody_on_standby(world, finetunes):
    agg = world.aggregator("agg", world.config([]), genesis=world.genesis)  # an open swarm
    step(agg)
    world.announce_delta(finetunes[0])
    for name, claimed_at in (("past", 0.0), ("future", get_dht_time() + 3600)):
        stranger, _ = world.peer(name)
        claim = Lease(round=1, parent=agg.head.base_id, claimed_at=claimed_at)
        assert stranger.publish(LEASE, claim, ttl=600)
    step(agg)
    assert agg.head.round == 1, agg.status


def test_a_crowd_that_fills_a_bases_announce_key_cannot_hide_an_established_volunteer(
    world, finetunes
):
    """DHT nodes keep MAX_AUTHORS_PER_KEY authors under a key, first come: a crowd of
    throwaway keys that announces made-up deltas the moment a head appears fills the head's
    shared announce key. The aggregator then also reads the owned topics of the authors with
    the most rounds merged, so the swarm's known volunteers still come first."""
    agg = world.aggregator("agg", world.config(["agg"], max_deltas=4), genesis=world.genesis)
    step(agg)
    base, expires = agg.head.base_id, get_dht_time() + 600
    for _ in range(MAX_AUTHORS_PER_KEY):
        stranger = Identity.generate()
        made_up = DeltaAnnouncement(base_id=base, delta_id=secrets.token_hex(32), size=9, round=0)
        key, data = sign_record(stranger, world.net.swarm_id, "announce", base, made_up, expires)
        assert world.net.put(key, stranger.author, data, expires)
    known = world.author(f"author{world.made + 1}")  # the next announcer, merged in rounds past
    agg.reputation.credit("f" * 64, [known])
    delta = world.announce_delta(finetunes[0])
    assert world.net.rejected["key_full"] == 1  # its announcement under the shared key
    assert len(agg.swarm.read(ANNOUNCE, topic=base)) == MAX_AUTHORS_PER_KEY
    ranked = agg.candidates(agg.head)
    assert ranked[0].author == known and ranked[0].delta_id == delta
    step(agg)
    assert agg.head.round == 1 and agg.head.merged == (delta,)
