"""Provider records: under a blob's first key until it is crowded, then under the overflow key
a peer's id picks; a reader of a crowded first key reads a share of it and two overflow keys."""

from __future__ import annotations

import importlib
import random
from types import SimpleNamespace

import pytest
from hivemind.p2p import PeerID

from node.net.blobs.providers import (
    FIRST_KEY_ROOM,
    OVERFLOW_READS,
    announce,
    crowded,
    first_key_share,
    overflow_shards,
    providers,
    withdraw,
)
from node.net.member import Record
from node.net.memory import MemoryNet
from protocol.records import PROVIDER, PROVIDER_SHARDS, provider_shard, provider_topic

BLOB = "ab" * 32


def test_a_small_swarms_holders_announce_under_the_first_key_and_a_reader_finds_them_all(
    tmp_path,
):
    net = MemoryNet("mem-swarm")
    peers = [net.join(tmp_path / f"p{i}") for i in range(4)]
    for i, peer in enumerate(peers[1:]):
        assert announce(peer, BLOB, complete=i == 0)
    first = peers[0].read(PROVIDER, topic=provider_topic(BLOB))
    assert {r.body.peer_id for r in first} == {p.peer_id.to_base58() for p in peers[1:]}
    found = providers(peers[0], BLOB)
    assert {p.peer_id for p in found} == {p.peer_id.to_base58() for p in peers[1:]}
    assert found[0].complete and not any(p.complete for p in found[1:])  # complete ones first
    assert announce(peers[2], BLOB)  # now whole: the same key, the record replaced
    assert sum(p.complete for p in providers(peers[0], BLOB)) == 2
    assert peers[2].publishing(PROVIDER) == [provider_topic(BLOB)]  # refreshed
    withdraw(peers[2], BLOB)
    assert peers[2].publishing(PROVIDER) == []


def test_once_the_first_key_is_crowded_a_newcomer_announces_under_its_overflow_key(
    tmp_path, monkeypatch
):
    module = importlib.import_module("node.net.blobs.providers")  # the package names a function so
    monkeypatch.setattr(module, "FIRST_KEY_ROOM", 2)  # a crowd of two
    net = MemoryNet("mem-swarm")
    peers = [net.join(tmp_path / f"p{i}") for i in range(4)]
    for peer in peers[:3]:
        assert announce(peer, BLOB)
    newcomer = peers[2].peer_id.to_base58()
    overflow = provider_topic(BLOB, provider_shard(newcomer))
    assert peers[2].publishing(PROVIDER) == [overflow]
    (record,) = peers[3].read(PROVIDER, topic=overflow)
    assert record.body.peer_id == newcomer
    assert len(peers[3].read(PROVIDER, topic=provider_topic(BLOB))) == 2
    assert len(providers(peers[3], BLOB, everyone=True)) == 3
    assert announce(peers[0], BLOB, complete=False)  # already under the first key: stays
    assert peers[0].publishing(PROVIDER) == [provider_topic(BLOB)]


class _Crowd:
    """A reader's view of a blob with ``first`` records under its first key and ``per_shard``
    under each overflow key, counting the keys it reads (a DHT with thousands of holders)."""

    def __init__(self, first: int, per_shard: int) -> None:
        self.peer_id = PeerID(b"\x00\x24\x08\x01reader")
        self.first, self.per_shard = first, per_shard
        self.keys: list[str] = []

    def read(self, kind, *, topic):
        assert kind is PROVIDER and topic == provider_topic(BLOB)
        self.keys.append(topic)
        return [self._record("first", i) for i in range(self.first)]

    def read_many(self, kind, topics):
        assert kind is PROVIDER
        self.keys += topics
        return {t: [self._record(t, i) for i in range(self.per_shard)] for t in topics}

    @staticmethod
    def _record(where: str, i: int) -> Record:
        body = SimpleNamespace(blob_id=BLOB, peer_id=f"{where}-{i}", complete=i % 2 == 0)
        return Record(author=f"{where}-{i}", body=body, expires=0.0)  # type: ignore[arg-type]


def test_a_reader_of_an_uncrowded_first_key_reads_that_key_alone():
    crowd = _Crowd(first=FIRST_KEY_ROOM - 1, per_shard=50)
    found = providers(crowd, BLOB)  # type: ignore[arg-type]
    assert crowd.keys == [provider_topic(BLOB)] and len(found) == FIRST_KEY_ROOM - 1


def test_a_reader_of_a_crowded_first_key_sees_as_large_a_share_of_it_as_of_the_overflow():
    crowd = _Crowd(first=4 * FIRST_KEY_ROOM, per_shard=600)
    found = providers(crowd, BLOB, rng=random.Random(0))  # type: ignore[arg-type]
    assert len(crowd.keys) == 1 + OVERFLOW_READS
    from_first = [p for p in found if p.peer_id.startswith("first-")]
    assert len(from_first) == first_key_share(4 * FIRST_KEY_ROOM) == 4 * FIRST_KEY_ROOM // 8
    assert len(found) - len(from_first) == OVERFLOW_READS * 600
    small = _Crowd(first=30, per_shard=5)
    assert len(providers(small, BLOB, everyone=True)) == 30 + 5 * 16  # type: ignore[arg-type]


def test_readers_pick_overflow_keys_at_random_so_each_holder_is_read_about_as_often():
    assert not crowded(FIRST_KEY_ROOM - 1) and crowded(FIRST_KEY_ROOM)
    rng = random.Random(7)
    picks = [shard for _ in range(1600) for shard in overflow_shards(rng)]
    counts = [picks.count(shard) for shard in range(PROVIDER_SHARDS)]
    assert min(counts) > 0.7 * len(picks) / PROVIDER_SHARDS
    assert all(len(set(overflow_shards(random.Random(s)))) == OVERFLOW_READS for s in range(20))


def test_a_record_naming_another_blob_or_this_peer_is_not_a_provider():
    class _Liar(_Crowd):
        def _record(self, where: str, i: int) -> Record:
            blob = "cd" * 32 if i else BLOB
            body = SimpleNamespace(blob_id=blob, peer_id=f"x{i}", complete=True)
            if i == 1:
                body = SimpleNamespace(blob_id=BLOB, peer_id=self.peer_id.to_base58(), complete=1)
            return Record(author=f"{where}-{i}", body=body, expires=0.0)  # type: ignore[arg-type]

    liar = _Liar(first=3, per_shard=0)
    assert [p.peer_id for p in providers(liar, BLOB)] == ["x0"]  # type: ignore[arg-type]


def test_a_fetch_that_just_read_an_uncrowded_first_key_announces_without_reading_it_again(
    tmp_path, monkeypatch
):
    peer = MemoryNet("mem-swarm").join(tmp_path / "p")
    monkeypatch.setattr(peer, "read", lambda *_, **__: pytest.fail("read the first key again"))
    assert announce(peer, BLOB, complete=False, first_key=FIRST_KEY_ROOM - 1)
    assert peer.publishing(PROVIDER) == [provider_topic(BLOB)]
