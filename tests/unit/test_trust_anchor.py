"""A swarm id that commits to its genesis and aggregators: a stranger's key that sorts first
cannot hand newcomers its own config or head (the hijack of issue 18), on an in-memory swarm
with real signed records (tests/unit/world.py)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from hivemind.utils import get_dht_time

from node.chain.history import chain_to, current_head, find_config
from node.config import VolunteerSettings
from node.data_dir import DataDir
from node.monitor.view import read_view
from node.net.swarm import HEAD_TTL
from node.seed import Seed, genesis_head
from node.volunteer.volunteer import Volunteer
from protocol.errors import MergeswarmError
from protocol.identity import Identity
from protocol.records import (
    CONFIG,
    HEAD,
    LEASE,
    MAX_AUTHORS_PER_KEY,
    Lease,
    owned_topic,
    record_key,
    sign_record,
)
from protocol.swarm_config import (
    SwarmConfigError,
    anchored_swarm_id,
    parse_config,
    swarm_anchor,
    trust_anchor,
)
from tests.unit.world import World, step

GENESIS, ALICE, BOB = "a" * 64, "b" * 64, "c" * 64


def test_the_anchor_commits_to_the_genesis_and_the_set_of_aggregators():
    assert trust_anchor(GENESIS, [ALICE, BOB]) == trust_anchor(GENESIS, [BOB, ALICE, ALICE])
    assert trust_anchor(GENESIS, [ALICE]) != trust_anchor(GENESIS, [ALICE, BOB])
    assert trust_anchor(GENESIS, [ALICE]) != trust_anchor("d" * 64, [ALICE])
    swarm_id = anchored_swarm_id("swarm-1234", GENESIS, [ALICE])
    assert swarm_anchor(swarm_id) == trust_anchor(GENESIS, [ALICE])
    assert swarm_anchor("swarm-1234") is None


def test_a_config_naming_other_aggregators_than_its_swarm_ids_anchor_does_not_validate():
    swarm_id = anchored_swarm_id("swarm-1234", GENESIS, [ALICE])
    good = {"swarm_id": swarm_id, "genesis_id": GENESIS, "aggregators": [ALICE]}
    assert parse_config(good, "test").aggregators == (ALICE,)
    for bad in ({"aggregators": [BOB]}, {"aggregators": [ALICE, BOB]}, {"aggregators": []},
                {"genesis_id": "d" * 64}):  # fmt: skip
        with pytest.raises(SwarmConfigError, match="trust anchor"):
            parse_config(good | bad, "test")
    legacy = {"swarm_id": "swarm-1234", "genesis_id": GENESIS, "aggregators": [BOB]}
    assert parse_config(legacy, "test").aggregators == (BOB,)  # no anchor: as before


@pytest.fixture
def hijacked(tmp_path, tiny_base, finetunes) -> World:
    """A swarm made with aggregator "agg", and a stranger whose key sorts first publishing a
    config that names itself, with absurd rules, and a head of round 999999."""
    world = World(tmp_path, tiny_base)
    world.anchor(["agg"])
    _grind_key_sorting_before(world.author("agg"), tmp_path / "rogue")
    rogue, store = world.peer("rogue")
    fake = genesis_head(store, finetunes[0], round_=999999, parent=world.genesis_id)
    rogue.transfers(store).announce(fake.snapshot_id)
    assert rogue.publish(HEAD, fake, ttl=HEAD_TTL)
    own = world.config(["agg"]).model_dump() | {"aggregators": [rogue.identity.author]}
    with pytest.raises(SwarmConfigError):  # it cannot even be made to validate
        parse_config(own | {"round_period": 1}, "rogue")
    forged = world.config(["agg"]).model_copy(update={"aggregators": (rogue.identity.author,)})
    assert not rogue.publish(CONFIG, forged, ttl=600)  # built unchecked: the DHT refuses it
    assert world.net.rejected["malformed"] == 1
    # the real aggregators and genesis (so the anchor matches) with absurd rules, signed by the
    # stranger: a config stands only from an aggregator it names
    assert not rogue.publish(CONFIG, world.config(["agg"], max_deltas=1), ttl=600)
    assert world.net.rejected["untrusted"] == 1
    world.fake = fake  # type: ignore[attr-defined]
    return world


def _grind_key_sorting_before(author: str, data_dir: Path) -> None:
    """Make the key of ``data_dir`` one that sorts before ``author`` (a few tries)."""
    path = DataDir(data_dir).identity
    while Identity.load_or_create(path).author >= author:
        path.unlink()


def test_before_the_real_config_appears_nobody_follows_the_strangers_head(hijacked):
    observer, _ = hijacked.peer("observer")
    assert find_config(observer) is None
    settings = VolunteerSettings(data=["unused.txt"])
    volunteer = Volunteer(*hijacked.peer("v"), settings)
    volunteer.tick()
    assert volunteer.latest is None and volunteer.config is None
    seed = Seed(*hijacked.peer("seed"))
    seed.mirror_once(threading.Event())
    assert seed.head is None and seed.store.ids() == []
    assert read_view(observer).head is None
    with pytest.raises(MergeswarmError, match="config"):
        chain_to(observer)


def test_newcomers_take_the_real_config_and_follow_the_real_head(hijacked):
    agg = hijacked.aggregator("agg", hijacked.config(["agg"]), genesis=hijacked.genesis)
    step(agg)  # publishes its config and the genesis head
    volunteer = Volunteer(*hijacked.peer("v"), VolunteerSettings(data=["unused.txt"]))
    volunteer.tick()
    assert volunteer.config == agg.config and volunteer.latest == agg.head
    seed = Seed(*hijacked.peer("seed"))
    seed.mirror_once(threading.Event())
    assert seed.head == agg.head and not seed.store.has(hijacked.fake.snapshot_id)
    observer, _ = hijacked.peer("observer")
    assert read_view(observer).head == agg.head
    assert [h.base_id for h in chain_to(observer)] == [agg.head.base_id]
    assert current_head(observer, set()) == hijacked.fake  # what following anyone would do


def test_a_head_under_another_authors_key_is_refused_and_trusted_readers_skip_the_flood(
    tmp_path, tiny_base
):
    world = World(tmp_path, tiny_base)
    world.anchor(["agg"])
    agg = world.aggregator("agg", world.config(["agg"]), genesis=world.genesis)
    step(agg)
    author = world.author("agg")
    for i in range(20):  # throwaway keys: heads of round 999 under the shared key and under
        stranger, _ = world.peer(f"stranger{i}")  # the aggregator's own one
        flood = agg.head.model_copy(update={"round": 999, "deltas": 0, "parent": "ab" * 32})
        assert stranger.publish(HEAD, flood, ttl=600)
        assert not stranger.publish(HEAD, flood, topic=owned_topic(author), ttl=600)
    assert world.net.rejected["wrong_key"] == 20
    observer, _ = world.peer("observer")
    assert [r.author for r in observer.read(HEAD, topic=owned_topic(author))] == [author]
    assert current_head(observer, {author}) == agg.head
    assert current_head(observer, set()).round == 999  # the shared key: what anyone-readers see


def test_a_crowd_fills_a_shared_key_only_up_to_the_cap_and_owned_topics_stay_readable(
    tmp_path, tiny_base
):
    """1,800 heads from throwaway keys once hid the head (p2pd's message cap): a DHT node now
    keeps MAX_AUTHORS_PER_KEY authors under a key, a refresh of one of them still lands, and
    the aggregators' heads, bases and leases stand under their owned topics, out of reach."""
    world = World(tmp_path, tiny_base)
    world.anchor(["agg"])
    agg = world.aggregator("agg", world.config(["agg"]), genesis=world.genesis)
    step(agg)
    flood = agg.head.model_copy(update={"round": 999, "deltas": 0, "parent": "ab" * 32})
    expires = get_dht_time() + 600
    stored = 0
    for _ in range(MAX_AUTHORS_PER_KEY + 100):
        stranger = Identity.generate()
        key, data = sign_record(stranger, world.net.swarm_id, "head", "", flood, expires)
        stored += world.net.put(key, stranger.author, data, expires)
    assert stored == MAX_AUTHORS_PER_KEY - 1  # the aggregator's own entry took one place
    assert world.net.rejected["key_full"] == 101
    assert len(world.net.get(record_key(world.net.swarm_id, "head"))) == MAX_AUTHORS_PER_KEY
    assert agg.swarm.refresh() > 0 and world.net.rejected["key_full"] == 101  # its refresh lands
    observer, _ = world.peer("observer")
    assert current_head(observer, {world.author("agg")}) == agg.head
    claim = Lease(round=1, parent=agg.head.base_id, claimed_at=get_dht_time())
    stranger, _ = world.peer("stranger")
    assert not stranger.publish(LEASE, claim, topic=owned_topic(world.author("agg")), ttl=60)
