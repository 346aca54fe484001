"""Joining and records on a real hivemind DHT: daemons in their own processes on 127.0.0.1."""

from __future__ import annotations

import json
from functools import partial

import pytest
from hivemind.utils import get_dht_time

import node.net.swarm as swarm_module
from node.net.swarm import SwarmError
from protocol.identity import Identity
from protocol.records import HEARTBEAT, MAX_AUTHORS_PER_KEY, Heartbeat, sign_record
from tests.swarm import start_peer, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
FAST = ("--heartbeat-every", "1", "--no-mirror")


def _author(peer) -> str:
    return Identity.load(peer.data_dir / "identity.pem").author


def _heartbeat_authors(observer) -> set[str]:
    return {r.author for r in observer.read("heartbeat")}


def test_five_peers_see_each_other_and_another_swarm_sees_none(tmp_path, local_peer):
    boot = start_peer(tmp_path / "boot", *FAST)
    peers = [boot] + [
        start_peer(tmp_path / f"p{i}", "--join", boot.maddrs[0], *FAST) for i in range(4)
    ]
    swarm_ids = {(p.data_dir / "swarm_id").read_text().strip() for p in peers}
    assert len(swarm_ids) == 1  # learned from the bootstrap peer
    authors = {_author(p) for p in peers}
    for i, p in enumerate(peers):  # through each peer's own view of the DHT
        observer = local_peer(f"observer{i}", join=[p.maddrs[0]])
        assert observer.swarm_id in swarm_ids
        wait_for(lambda o=observer: authors <= _heartbeat_authors(o), 30, f"5 heartbeats via {i}")

    other = start_peer(
        tmp_path / "other", "--join", boot.maddrs[0], "--swarm-id", "other-swarm", *FAST
    )
    stranger = local_peer("stranger", join=[boot.maddrs[0]], swarm_id="other-swarm")
    wait_for(lambda: _author(other) in _heartbeat_authors(stranger), 30, "the other swarm's beat")
    assert _heartbeat_authors(stranger) == {_author(other)}
    assert _author(other) not in _heartbeat_authors(observer)


def test_a_restarted_peer_keeps_its_peer_id_and_swarm(tmp_path):
    boot = start_peer(tmp_path / "boot", *FAST)
    first = start_peer(tmp_path / "p", "--join", boot.maddrs[0], *FAST)
    peer_id, swarm_id = first.peer_id, (first.data_dir / "swarm_id").read_text()
    assert first.stop() == 0  # SIGTERM: a clean exit
    again = start_peer(tmp_path / "p", *FAST)  # no --join: the data dir remembers the swarm
    assert again.peer_id == peer_id
    assert (again.data_dir / "swarm_id").read_text() == swarm_id


def test_joining_a_swarm_under_another_data_dir_swarm_is_refused(tmp_path):
    a = start_peer(tmp_path / "a", *FAST)
    b = start_peer(tmp_path / "b", *FAST)  # a second, separate swarm
    b.stop()
    with pytest.raises(AssertionError, match="belongs to swarm"):
        start_peer(tmp_path / "b", "--join", a.maddrs[0], *FAST)


def test_joining_a_peer_of_another_protocol_version_is_refused_with_both_versions(
    tmp_path, local_peer, monkeypatch
):
    boot = start_peer(tmp_path / "boot", *FAST)  # its own process: today's version
    theirs = swarm_module.PROTOCOL_VERSION
    monkeypatch.setattr(swarm_module, "PROTOCOL_VERSION", "99")  # this peer: a newer release
    with pytest.raises(
        SwarmError, match=f"speaks mergeswarm protocol {theirs}, this peer speaks 99"
    ):
        local_peer("newer", join=[boot.maddrs[0]])


def _store_raw(peer, key: str, value: bytes, expiration: float, subkey: str) -> bool:
    return bool(peer.dht.store(key, value, expiration, subkey=subkey))


def test_forged_wrong_swarm_expired_and_oversized_records_are_rejected_and_counted(local_peer):
    a = local_peer("a")
    b = local_peer("b", join=a.maddrs)
    writer = local_peer("writer", join=a.maddrs)
    mallory = Identity.generate()
    beat = Heartbeat(role="seed", version="x", peer_id=a.peer_id.to_base58())
    expires = get_dht_time() + 60
    key, good = sign_record(mallory, a.swarm_id, "heartbeat", "", beat, expires)
    envelope = json.loads(good)

    def tampered(**changes) -> bytes:
        return json.dumps(envelope | changes, sort_keys=True, separators=(",", ":")).encode()

    assert not _store_raw(writer, key, tampered(sig="0" * 128), expires, mallory.author)
    assert not _store_raw(writer, key, good, expires, a.identity.author)  # someone else's slot
    assert not _store_raw(writer, key, tampered(swarm="other-swarm"), expires, mallory.author)
    past = get_dht_time() - 5
    _, stale = sign_record(mallory, a.swarm_id, "heartbeat", "", beat, past)
    assert not _store_raw(writer, key, stale, past, mallory.author)
    assert not _store_raw(writer, key, good + b" " * 5000, expires, mallory.author)
    assert _store_raw(writer, key, good, expires, mallory.author)

    assert [r.author for r in b.read("heartbeat")] == [mallory.author]  # only the honest one
    for peer in (a, b):
        counts = peer.rejection_counts()
        for reason in ("bad_signature", "forged_author", "wrong_swarm", "oversized"):
            assert counts.get(reason, 0) >= 1, (reason, counts)
        assert counts.get("expired", 0) + counts.get("bad_expiration", 0) >= 1, counts


def test_the_libp2p_daemon_serves_its_own_metrics_when_asked(tmp_path):
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start_peer(tmp_path / "seed", "--p2p-metrics", f"127.0.0.1:{port}")
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert "libp2p_autonat_reachability_status" in text  # NAT health, straight from p2pd
    assert "libp2p_rcmgr_connections" in text


def test_sigterm_to_the_whole_process_group_stops_a_peer_cleanly(tmp_path):
    """What systemd does on stop: SIGTERM to every process of the unit, the forked DHT
    process and p2pd included. All of them must end, and the daemon exit 0."""
    import os
    import signal
    import time

    peer = start_peer(tmp_path / "seed")
    os.killpg(peer.proc.pid, signal.SIGTERM)
    assert peer.proc.wait(timeout=60) == 0, peer.log_tail()
    assert "stopped: work" in peer.log_tail() and "leaving the swarm" in peer.log_tail()

    def group_gone() -> bool:
        try:
            os.killpg(peer.proc.pid, 0)
        except ProcessLookupError:
            return True
        return False

    deadline = time.monotonic() + 30
    while not group_gone():
        assert time.monotonic() < deadline, "a process of the peer outlived SIGTERM"
        time.sleep(0.5)


async def _flood(swarm_id: str, body: Heartbeat, n: int, expires: float, _dht, node) -> int:
    """In the DHT's process (hivemind's pipe to it carries a few KiB): ``n`` throwaway keys
    each store ``body`` under the shared key; how many stores any node took."""
    entries = [Identity.generate() for _ in range(n)]
    signed = [sign_record(e, swarm_id, "heartbeat", "", body, expires) for e in entries]
    found = await node.store_many(
        [key for key, _ in signed], [data for _, data in signed], expires,
        [e.author for e in entries],
    )  # fmt: skip
    return sum(bool(ok) for ok in found.values())


def test_a_dht_node_keeps_at_most_the_cap_of_authors_under_one_key(local_peer):
    """A crowd of throwaway keys under one shared key (1,800 heads hid the head once): every
    DHT node stops at MAX_AUTHORS_PER_KEY, first come, and a reader still gets its answer."""
    a = local_peer("a")
    b = local_peer("b", join=a.maddrs)
    beat = Heartbeat(role="seed", version="x", peer_id=a.peer_id.to_base58())
    assert a.publish(HEARTBEAT, beat, ttl=600)  # the honest one comes first
    expires = get_dht_time() + 600
    stored = 0
    for _ in range(11):  # a hundred at a time: one traversal each, not one per record
        stored += b.dht.run_coroutine(partial(_flood, a.swarm_id, beat, 100, expires))
    assert stored == MAX_AUTHORS_PER_KEY - 1, stored
    reader = local_peer("reader", join=a.maddrs)
    authors = {r.author for r in reader.read(HEARTBEAT)}
    assert len(authors) == MAX_AUTHORS_PER_KEY and a.identity.author in authors
    assert a.publish(HEARTBEAT, beat, ttl=900)  # a refresh of an author already there lands
    for peer in (a, b):
        assert peer.rejection_counts().get("key_full", 0) >= 50


def test_provider_records_under_a_crowded_blobs_overflow_keys_are_read_across_the_dht(
    local_peer, monkeypatch
):
    """Over a real DHT: with the first key taken as crowded, a holder announces under the
    overflow key its peer id picks, and a reader finds it there in one look-up of them all."""
    import importlib

    from node.net.blobs import announce, providers
    from protocol.records import PROVIDER, provider_shard, provider_topic

    module = importlib.import_module("node.net.blobs.providers")
    monkeypatch.setattr(module, "FIRST_KEY_ROOM", 0)  # every first key is crowded
    holder = local_peer("holder")
    reader = local_peer("reader", join=holder.maddrs)
    blob = "cd" * 32
    assert announce(holder, blob)
    mine = holder.peer_id.to_base58()
    assert holder.publishing(PROVIDER) == [provider_topic(blob, provider_shard(mine))]
    assert reader.read(PROVIDER, topic=provider_topic(blob)) == []
    assert [p.peer_id for p in providers(reader, blob, everyone=True)] == [mine]
    found = reader.read_many(PROVIDER, [provider_topic(blob, s) for s in range(16)])
    assert [r.body.peer_id for r in found[provider_topic(blob, provider_shard(mine))]] == [mine]
    assert sum(map(len, found.values())) == 1


async def _dht_calls_guarded(_dht, node) -> bool:
    from node.net.unary_calls import PendingCalls, unary_reader_alive

    control = node.p2p._client.control
    return isinstance(control._pending_calls, PendingCalls) and unary_reader_alive(node.p2p)


def test_both_processes_of_a_peer_guard_their_unary_calls_and_calls_still_get_answers(
    local_peer,
):
    """The peer's own p2pd client and its DHT process's both drop answers to abandoned calls
    (node.net.unary_calls); answers to live ones still arrive, in both directions."""
    from node.net.unary_calls import PendingCalls, unary_reader_alive

    a = local_peer("a")
    b = local_peer("b", join=a.maddrs)
    for peer in (a, b):
        assert isinstance(peer.p2p._client.control._pending_calls, PendingCalls)
        assert peer.dht.run_coroutine(_dht_calls_guarded)
    info = b.ask_join_peer()  # a unary call out of b's process, answered by a's
    assert info.swarm_id == a.swarm_id
    assert b.publish(HEARTBEAT, Heartbeat(role="seed", version="x", peer_id="p"), ttl=60)
    assert {r.author for r in a.read(HEARTBEAT)} == {b.identity.author}  # DHT RPCs, both ways
    assert unary_reader_alive(a.p2p) and unary_reader_alive(b.p2p)


def test_a_peer_whose_reader_of_answers_ended_is_deaf_and_its_daemon_loop_stops(local_peer):
    """Should the reader end all the same, the peer says so, and run_until, which outlives
    any other failing tick, raises it so the daemon exits non-zero for a restart."""
    import threading

    from node.daemon.peer import run_until
    from node.net.member import PeerDeaf

    a = local_peer("a")
    a.check_alive()

    async def end_reader() -> None:
        a.p2p._client.control._read_task.cancel()

    a.run(end_reader())
    with pytest.raises(PeerDeaf, match="stopped reading answers from its libp2p daemon"):
        a.check_alive()

    class Daemon:
        ticks = 0

        def tick(self) -> None:
            self.ticks += 1
            if self.ticks == 1:
                raise RuntimeError("one bad round of housekeeping")  # logged, not fatal
            a.check_alive()

    daemon = Daemon()
    with pytest.raises(PeerDeaf):
        run_until(daemon, threading.Event(), interval=0.01)
    assert daemon.ticks == 2
