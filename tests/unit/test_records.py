"""Record envelopes, the hivemind validator and fork choice, without a network."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer

from protocol.forkchoice import choose_head
from protocol.identity import Identity
from protocol.peer_binding import bind, peer_id_of
from protocol.record_validator import SwarmRecordValidator
from protocol.records import (
    BASE,
    BODIES,
    HEAD,
    KINDS,
    MAX_AUTHORS_PER_KEY,
    MAX_KEY_BYTES,
    MAX_RECORD_BYTES,
    MAX_TTL_SECONDS,
    PROVIDER_SHARDS,
    DeltaAnnouncement,
    Head,
    Provider,
    RecordError,
    key_admits,
    open_record,
    owned_topic,
    provider_shard,
    provider_topic,
    record_key,
    sign_record,
)

NOW = 1_800_000_000.0
SWARM = "test-swarm"


@pytest.fixture(scope="module")
def alice() -> Identity:
    return Identity.generate()


def _announcement() -> DeltaAnnouncement:
    return DeltaAnnouncement(
        base_id="aa" * 32, delta_id="bb" * 32, size=1234, round=3, tags=("math",), samples=64
    )


def _signed(identity, body=None, kind="announce", topic="aa" * 32, expires=NOW + 60):
    return sign_record(identity, SWARM, kind, topic, body or _announcement(), expires)


def _rewrap(data: bytes, **changes) -> bytes:
    env = json.loads(data) | changes
    return json.dumps(env, sort_keys=True, separators=(",", ":")).encode()


def test_a_signed_record_opens_to_its_body(alice):
    key, data = _signed(alice)
    assert key == f"mergeswarm/{SWARM}/announce/{'aa' * 32}"
    env, body = open_record(
        data, subkey=alice.author, expiration=NOW + 60, now=NOW, key=key, swarm_id=SWARM
    )
    assert body == _announcement() and env.author == alice.author


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d, a: (d[:-5], a.author, NOW + 60), "malformed"),
        (lambda d, a: (_rewrap(d, sig="0" * 128), a.author, NOW + 60), "bad_signature"),
        (lambda d, a: (_rewrap(d, body={"size": 1}), a.author, NOW + 60), "bad_signature"),
        (lambda d, a: (d, "cd" * 32, NOW + 60), "forged_author"),
        (lambda d, a: (_rewrap(d, swarm="other-swarm"), a.author, NOW + 60), "wrong_swarm"),
        (lambda d, a: (d, a.author, NOW + 3600), "bad_expiration"),  # extended by a relayer
        (lambda d, a: (d + b" " * MAX_RECORD_BYTES, a.author, NOW + 60), "oversized"),
    ],
)
def test_tampered_records_are_refused_with_a_reason(alice, mutate, reason):
    _, data = _signed(alice)
    value, subkey, expiration = mutate(data, alice)
    with pytest.raises(RecordError) as err:
        open_record(value, subkey=subkey, expiration=expiration, now=NOW)
    assert err.value.reason == reason


def test_expired_and_far_future_records_are_refused(alice):
    _, data = _signed(alice, expires=NOW - 1)
    with pytest.raises(RecordError, match="expired"):
        open_record(data, subkey=alice.author, expiration=NOW - 1, now=NOW)
    far = NOW + MAX_TTL_SECONDS + 10
    _, data = _signed(alice, expires=far)
    with pytest.raises(RecordError) as err:
        open_record(data, subkey=alice.author, expiration=far, now=NOW)
    assert err.value.reason == "bad_expiration"


def test_a_record_read_from_another_key_is_refused(alice):
    _, data = _signed(alice)
    other = record_key(SWARM, "announce", "cc" * 32)
    with pytest.raises(RecordError) as err:
        open_record(data, subkey=alice.author, expiration=NOW + 60, now=NOW, key=other)
    assert err.value.reason == "wrong_key"


def test_bodies_reject_unknown_fields_and_wrong_types():
    with pytest.raises(ValueError, match="extra"):
        Head(base_id="aa" * 32, round=1, deltas=0, surprise=1)
    with pytest.raises(ValueError):
        DeltaAnnouncement(base_id="aa" * 32, delta_id="bb" * 32, size="12", round=0)
    with pytest.raises(ValueError):
        Provider(blob_id="xyz", peer_id="QmPeer")


@pytest.fixture(scope="module")
def libp2p_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)  # the size hivemind makes


def test_the_largest_valid_bodies_fit_under_the_cap(alice, libp2p_key):
    binding = bind(libp2p_key, alice.author)
    provider = Provider(
        blob_id="aa" * 32,
        peer_id=peer_id_of(binding),
        maddrs=tuple("/" + "x" * 255 for _ in range(8)),
        binding=binding,
    )
    announcement = _announcement().model_copy(update={"tags": tuple("t" * 128 for _ in range(16))})
    for kind, body in (("provider", provider), ("announce", announcement)):
        _, data = sign_record(alice, SWARM, kind, "aa" * 32, body, NOW + 60)
        assert len(data) <= MAX_RECORD_BYTES


def test_a_provider_record_names_only_the_peer_whose_key_vouches_for_its_author(alice, libp2p_key):
    bob = Identity.generate()
    mine = bind(libp2p_key, alice.author)
    peer = peer_id_of(mine)
    honest = Provider(blob_id="aa" * 32, peer_id=peer, binding=mine)
    topic = provider_topic("aa" * 32, provider_shard(peer))
    _, data = _signed(alice, honest, kind="provider", topic=topic)
    assert open_record(data, subkey=alice.author, expiration=NOW + 60, now=NOW)[1] == honest
    other_peer = bind(rsa.generate_private_key(65537, 1024), alice.author)
    forged = [
        (bob, honest),  # alice's binding copied into bob's record
        (alice, honest.model_copy(update={"peer_id": peer_id_of(other_peer)})),  # another peer
        (
            alice,
            honest.model_copy(update={"binding": mine.model_copy(update={"sig": "AAAA" * 64})}),
        ),
    ]
    for author, body in forged:
        _, data = _signed(author, body, kind="provider", topic=topic)
        with pytest.raises(RecordError) as err:
            open_record(data, subkey=author.author, expiration=NOW + 60, now=NOW)
        assert err.value.reason == "unbound_peer"


def test_a_provider_record_stands_only_under_its_blobs_first_key_or_the_shard_its_peer_picks(
    alice, libp2p_key
):
    binding = bind(libp2p_key, alice.author)
    peer = peer_id_of(binding)
    body = Provider(blob_id="aa" * 32, peer_id=peer, binding=binding)
    shard = provider_shard(peer)
    for topic in (provider_topic("aa" * 32), provider_topic("aa" * 32, shard)):
        _, data = _signed(alice, body, kind="provider", topic=topic)
        assert open_record(data, subkey=alice.author, expiration=NOW + 60, now=NOW)[1] == body
    for topic in (
        provider_topic("aa" * 32, (shard + 1) % PROVIDER_SHARDS),  # a shard of its choosing
        provider_topic("bb" * 32, shard),  # another blob's
        provider_topic("bb" * 32),
    ):
        _, data = _signed(alice, body, kind="provider", topic=topic)
        with pytest.raises(RecordError) as err:
            open_record(data, subkey=alice.author, expiration=NOW + 60, now=NOW)
        assert err.value.reason == "wrong_key", topic


def test_peer_ids_spread_evenly_over_the_provider_shards():
    counts = Counter(provider_shard(f"12D3KooW{i:040d}") for i in range(16_000))
    assert set(counts) == set(range(PROVIDER_SHARDS))
    assert max(counts.values()) < 1.15 * 16_000 / PROVIDER_SHARDS


def _dht_record(key: str, subkey: str, value: bytes, expiration: float) -> DHTRecord:
    return DHTRecord(
        DHTID.generate(source=key).to_bytes(),
        MSGPackSerializer.dumps(subkey),
        MSGPackSerializer.dumps(value),
        expiration,
    )


def test_the_validator_counts_what_it_refuses(alice, monkeypatch):
    monkeypatch.setattr("protocol.record_validator.get_dht_time", lambda: NOW)
    validator = SwarmRecordValidator()
    key, data = _signed(alice)
    assert validator.validate(_dht_record(key, alice.author, data, NOW + 60))
    other_key = record_key(SWARM, "announce", "cc" * 32)  # replayed under another key
    assert not validator.validate(_dht_record(other_key, alice.author, data, NOW + 60))
    assert not validator.validate(_dht_record(key, "cd" * 32, data, NOW + 60))
    garbage = DHTRecord(b"k" * 20, b"\xc1", b"\xc1\xc1", NOW + 60)
    assert not validator.validate(garbage)
    assert validator.accepted == 1
    assert dict(validator.rejected) == {"wrong_key": 1, "forged_author": 1, "malformed": 1}


def test_fork_choice_prefers_round_then_deltas_then_the_smaller_id():
    def head(base, rnd, deltas):
        merged = tuple(f"{i:064x}" for i in range(deltas))
        return Head(base_id=base * 32, round=rnd, parent="ff" * 32, deltas=deltas, merged=merged)

    heads = [("a", head("aa", 3, 5)), ("b", head("bb", 4, 1)), ("c", head("cc", 4, 2))]
    assert choose_head(heads)[0] == "c"
    tie = [("a", head("bb", 4, 2)), ("b", head("aa", 4, 2))]
    assert choose_head(tie)[0] == "b" and choose_head(reversed(tie))[0] == "b"
    assert choose_head(heads, trusted={"a"})[0] == "a"
    assert choose_head(heads, trusted={"z"}) is None
    assert choose_head([]) is None


def test_fork_choice_counts_the_deltas_a_head_names_not_the_count_it_claims():
    named = Head(base_id="bb" * 32, round=4, parent="ff" * 32, deltas=1, merged=("01" * 32,))
    boast = Head(base_id="aa" * 32, round=4, parent="ff" * 32, deltas=32)  # names none
    assert choose_head([("honest", named), ("boaster", boast)])[0] == "honest"


def test_fork_choice_ignores_a_head_dated_in_the_future_until_then():
    now = 1_000_000.0
    on_time = Head(base_id="aa" * 32, round=1, parent="ff" * 32, deltas=0, created=now + 30)
    ahead = Head(base_id="bb" * 32, round=2, parent="aa" * 32, deltas=0, created=now + 3600)
    assert choose_head([("a", on_time), ("b", ahead)], now=now)[0] == "a"
    assert choose_head([("a", on_time), ("b", ahead)], now=now + 3600)[0] == "b"


def test_fork_choice_ignores_a_later_round_without_a_parent_or_its_own_parent():
    genesis = Head(base_id="cc" * 32, round=0, deltas=0)
    orphan = Head(base_id="aa" * 32, round=999999, deltas=0)
    loop = Head(base_id="bb" * 32, round=999999, parent="bb" * 32, deltas=0)
    assert choose_head([("g", genesis), ("o", orphan), ("l", loop)])[0] == "g"


def test_every_record_kind_is_named_once_and_keys_as_its_name():
    assert set(KINDS) == set(BODIES) == {str(kind) for kind in KINDS.values()}
    for name, kind in KINDS.items():
        assert BODIES[name] is kind.body
        assert record_key("s", kind, "t") == record_key("s", name, "t") == f"mergeswarm/s/{name}/t"
    assert HEAD.body is BASE.body is Head  # the same schema, under two keys


def test_an_owned_topic_holds_only_its_authors_record(alice):
    bob = Identity.generate()
    for topic in (owned_topic(alice.author), owned_topic(alice.author, "aa" * 32)):
        _, data = _signed(alice, topic=topic)
        open_record(data, subkey=alice.author, expiration=NOW + 60, now=NOW)
        _, data = _signed(bob, topic=topic)
        with pytest.raises(RecordError) as err:
            open_record(data, subkey=bob.author, expiration=NOW + 60, now=NOW)
        assert err.value.reason == "wrong_key"


def test_a_key_takes_new_authors_only_while_there_is_room_and_refreshes_always():
    assert key_admits({}, "a", MAX_KEY_BYTES)
    assert not key_admits({}, "a", MAX_KEY_BYTES + 1)
    full = {str(i): 10 for i in range(MAX_AUTHORS_PER_KEY)}
    assert not key_admits(full, "newcomer", 10)
    assert key_admits(full, "7", 10)
    heavy = {"x": MAX_KEY_BYTES - 100}
    assert key_admits(heavy, "y", 100) and not key_admits(heavy, "y", 101)
    assert key_admits(heavy, "x", 4000)
