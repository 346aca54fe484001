"""Blobs between real peers: spreading, failing and lying providers, pushes from client mode."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

from node.net.blobs import Fetcher, providers
from node.net.blobstore import BlobStore
from protocol.delta import create_delta
from protocol.ids import base_id, bytes_id
from protocol.records import DeltaAnnouncement, Head, Heartbeat
from tests.swarm import run_cli, start_peer, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]
MB = 1 << 20


def _blob(path, size: int) -> tuple[str, bytes]:
    data = os.urandom(size)
    path.write_bytes(data)
    return bytes_id(data), data


def _add(peer, path) -> str:
    out = run_cli("blob", "add", str(path), "--data-dir", str(peer.data_dir))
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _provided_by(observer, blob_id: str) -> set[str]:
    return {p.peer_id for p in providers(observer, blob_id) if p.complete}


def _heartbeat(observer, peer_id: str) -> Heartbeat | None:
    for record in observer.read("heartbeat"):
        if isinstance(record.body, Heartbeat) and record.body.peer_id == peer_id:
            return record.body
    return None


@pytest.mark.heavy  # counts the origin's copies, which a loaded machine skews
def test_a_blob_spreads_to_six_peers_and_the_origin_sends_under_two_copies(tmp_path, local_peer):
    origin = start_peer(tmp_path / "origin", "--heartbeat-every", "1")
    blob_id, data = _blob(tmp_path / "blob", 50 * MB)
    assert _add(origin, tmp_path / "blob") == blob_id
    seeds = [
        start_peer(tmp_path / f"s{i}", "--join", origin.maddrs[0], "--heartbeat-every", "1")
        for i in range(6)
    ]
    observer = local_peer("observer", join=[origin.maddrs[0]])
    wait_for(
        lambda: origin.peer_id in _provided_by(observer, blob_id), 30, "origin's provider record"
    )
    # A head naming the blob as its snapshot: every seed mirrors it, all at once.
    observer.publish("head", Head(base_id="ab" * 32, round=0, deltas=0, snapshot_id=blob_id))
    everyone = {s.peer_id for s in seeds}
    wait_for(lambda: everyone <= _provided_by(observer, blob_id), 180, "6 seeds to hold the blob")
    for s in seeds:
        assert (s.data_dir / "blobs" / blob_id).read_bytes() == data

    def origin_sent() -> int | None:
        beat = _heartbeat(observer, origin.peer_id)
        settled = beat is not None and beat.uptime_seconds > 0 and beat.bytes_out > 0
        return beat.bytes_out if settled else None

    sent = wait_for(origin_sent, 30, "the origin's heartbeat")
    print(f"origin sent {sent / len(data):.2f} copies")
    assert sent < 2 * len(data), f"origin uploaded {sent / len(data):.2f} copies"


def _fetch_in_thread(observer, store, blob_id):
    fetcher = Fetcher(observer, store, blob_id, serve_while_fetching=False)
    errors = []

    def run():
        try:
            observer.run(fetcher.run(timeout=120), timeout=150)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return fetcher, thread, errors


def test_killing_a_provider_mid_transfer_and_a_corrupting_one_do_not_stop_a_download(
    tmp_path, local_peer
):
    origin = start_peer(tmp_path / "origin", "--no-mirror")
    blob_id, data = _blob(tmp_path / "blob", 200 * MB)
    _add(origin, tmp_path / "blob")
    mirrors = [
        start_peer(tmp_path / f"m{i}", "--join", origin.maddrs[0], "--no-mirror") for i in range(2)
    ]
    for m in mirrors:
        _add(m, tmp_path / "blob")
    liar = mirrors[1]
    with open(liar.data_dir / "blobs" / blob_id, "r+b") as f:  # rot on the liar's disk
        for offset in range(0, len(data), 3 * MB):
            f.seek(offset + 12345)
            f.write(b"\0" * 64)

    observer = local_peer("observer", join=[origin.maddrs[0]])
    holders = {origin.peer_id, *(m.peer_id for m in mirrors)}
    wait_for(lambda: holders <= _provided_by(observer, blob_id), 30, "3 provider records")
    store = BlobStore(tmp_path / "observer" / "blobs")
    fetcher, thread, errors = _fetch_in_thread(observer, store, blob_id)
    victim = mirrors[0]

    def victim_serving() -> bool:
        return any(
            str(peer) == victim.peer_id and source.received > 0
            for peer, source in list(fetcher.sources.items())
        )

    wait_for(victim_serving, 60, "the victim to serve pieces")
    victim.kill9()
    thread.join(timeout=150)
    assert not errors, errors
    assert store.path(blob_id).read_bytes() == data
    assert fetcher.stats.bad_pieces >= 1  # the liar was caught ...
    assert any("does not match its hash" in e for e in fetcher.errors)
    served = {peer.to_base58(): source.received for peer, source in fetcher.sources.items()}
    assert 0 < served[victim.peer_id] < len(data)  # it was in use when it died
    assert served[origin.peer_id] > 0


def test_a_client_mode_peer_pushes_its_delta_to_a_seed_that_then_serves_it(
    tmp_path, local_peer, tiny_base, tiny_finetuned, identity
):
    seed = start_peer(tmp_path / "seed", "--heartbeat-every", "1", "--no-mirror")
    volunteer = start_peer(
        tmp_path / "volunteer",
        "--join",
        seed.maddrs[0],
        "--client-mode",
        "--heartbeat-every",
        "1",
        "--no-mirror",
    )
    observer = local_peer("observer", join=[seed.maddrs[0]])
    delta = tmp_path / "delta.msd"  # signed by the key that announces it, as volunteers do
    delta_id, header = create_delta(tiny_base, tiny_finetuned, delta, identity=observer.identity)
    unannounced = tmp_path / "junk.bin"
    unannounced.write_bytes(os.urandom(MB))
    _add(volunteer, unannounced)  # not a delta: a seed would not take it, so it is not pushed
    announcement = DeltaAnnouncement(
        base_id=header.base_id, delta_id=delta_id, size=delta.stat().st_size, round=0
    )
    observer.publish("announce", announcement, topic=header.base_id)
    _add(volunteer, delta)
    wait_for(lambda: (seed.data_dir / "blobs" / delta_id).is_file(), 60, "the push to the seed")
    pushed = f"pushed {delta_id[:16]} to seed"  # and the pusher saw the seed's result
    wait_for(lambda: pushed in volunteer.log.read_text(), 60, "the pusher to see it taken")
    assert not (seed.data_dir / "blobs" / bytes_id(unannounced.read_bytes())).exists()
    volunteer.kill9()  # the seed alone must now serve it
    out = run_cli(
        "blob",
        "get",
        delta_id,
        "--join",
        seed.maddrs[0],
        "-o",
        str(tmp_path / "got"),
        "--host-maddr",
        "/ip4/127.0.0.1/tcp/0",
        "--timeout",
        "60",
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "got").read_bytes() == delta.read_bytes()
    listing = run_cli("blob", "ls", "--data-dir", str(seed.data_dir))
    assert delta_id in listing.stdout


def test_a_push_is_taken_only_as_a_delta_signed_by_its_announcer_and_evicts_nothing_before(
    tmp_path, local_peer, tiny_base, tiny_finetuned
):
    from node.net.blobs import BlobService, push
    from protocol.identity import Identity

    server = local_peer("server")
    client = local_peer("client", join=server.maddrs)
    server_store = BlobStore(tmp_path / "server" / "blobs", quota_bytes=3 * MB)
    old = server_store.add_bytes(os.urandom(3 * MB))  # unpinned, filling the quota
    service = BlobService(server, server_store)
    service.register()
    store = BlobStore(tmp_path / "client" / "blobs")

    def offer(path_or_bytes, signer_announces: bool = True) -> tuple[str, str]:
        blob_id = (
            store.add_file(path_or_bytes)
            if not isinstance(path_or_bytes, bytes)
            else store.add_bytes(path_or_bytes)
        )
        base = base_id(tiny_base)
        body = DeltaAnnouncement(base_id=base, delta_id=blob_id, size=store.size(blob_id), round=0)
        assert client.publish("announce", body, topic=base)
        return blob_id, base

    junk, base = offer(os.urandom(MB))  # announced, but not a delta
    result = push(client, store, junk, base, server.peer_id)
    assert not result.accepted and result.reason == "not a signed delta"
    stranger = tmp_path / "stranger.msd"  # a real delta, signed by a key that did not announce it
    create_delta(tiny_base, tiny_finetuned, stranger, identity=Identity.generate(), seed=1)
    theirs, _ = offer(stranger)
    result = push(client, store, theirs, base, server.peer_id)
    assert not result.accepted and result.reason == "not a signed delta"
    assert server_store.ids() == [old]  # refused pushes evicted nothing
    unannounced = store.add_bytes(os.urandom(MB))
    result = push(client, store, unannounced, "ab" * 32, server.peer_id)
    assert not result.accepted and result.reason == "not announced"

    own = tmp_path / "own.msd"
    create_delta(tiny_base, tiny_finetuned, own, identity=client.identity, seed=2)
    mine, _ = offer(own)
    result = push(client, store, mine, base, server.peer_id)
    assert result.accepted, result.reason
    assert mine in server_store.ids()
    assert old not in server_store.ids()  # room was made once the delta had arrived


def test_blob_get_of_an_id_nobody_offers_says_so_within_seconds(tmp_path):
    seed = start_peer(tmp_path / "seed", "--no-mirror")
    get = ["blob", "get", "cd" * 32, "--join", seed.maddrs[0], "-o", str(tmp_path / "x"),
           "--host-maddr", "/ip4/127.0.0.1/tcp/0"]  # fmt: skip
    started = time.monotonic()
    out = run_cli(*get)  # the default --timeout is 60 s
    took = time.monotonic() - started
    assert out.returncode == 1
    error = out.stderr.strip().splitlines()[-1]
    assert error.startswith("mergeswarm: error: nobody offers cdcdcdcdcdcdcdcd... within 10 s")
    assert error.endswith("give --wait to wait for a provider up to --timeout")
    assert took < 40, f"{took:.0f} s"  # a peer's start, then 10 s of looking
    waited = run_cli(*get, "--wait", "--timeout", "3")
    assert waited.returncode == 1
    assert (
        waited.stderr.strip()
        .splitlines()[-1]
        .startswith("mergeswarm: error: blob cdcdcdcdcdcdcdcd: no provider")
    )
    assert not (tmp_path / "x").exists()


def test_providers_refuse_unknown_ids_other_swarms_and_greedy_peers(tmp_path, local_peer):
    from node.net.blobs import HAVE, PIECES, BlobService, ServeLimits
    from node.net.framing import read_frame, read_raw, write_frame
    from protocol import transfer_pb2 as pb

    server = local_peer("server")
    client = local_peer("client", join=server.maddrs)
    store = BlobStore(tmp_path / "server" / "blobs")
    service = BlobService(server, store, ServeLimits(peer_bytes_per_minute=3 * MB))
    service.register()
    blob_id = store.add_bytes(os.urandom(8 * MB))

    def have(swarm_id: str, wanted: str) -> pb.HaveResponse:
        request = pb.HaveRequest(swarm_id=swarm_id, blob_id=wanted, with_manifest=True)
        return client.run(
            client.p2p.call_protobuf_handler(server.peer_id, HAVE, request, pb.HaveResponse)
        )

    assert have(server.swarm_id, "cd" * 32).error == "unknown blob"
    assert have("other-swarm", blob_id).error == "wrong swarm"
    assert have(server.swarm_id, "../etc/passwd").error == "bad blob id"
    assert have(server.swarm_id, blob_id).manifest.size == 8 * MB

    async def pieces(first: int = 0) -> list[pb.Piece]:
        request = pb.PieceRequest(swarm_id=server.swarm_id, blob_id=blob_id, first=first, count=8)
        _, reader, writer = await client.p2p.call_binary_stream_handler(server.peer_id, PIECES)
        await write_frame(writer, request)
        got = []
        while (piece := await read_frame(reader, pb.Piece, 4096)) is not None:
            got.append(piece)
            if piece.size:
                assert len(await read_raw(reader, piece.size)) == MB
        writer.close()
        return got

    got = client.run(pieces())
    assert [p.index for p in got if p.size] == [0, 1, 2]  # 3 MB a minute for this peer
    assert got[-1].error == "peer byte budget"
    assert service.stats.refused["unknown blob"] == 1
    assert service.stats.bytes_out == 3 * MB
    # a run of nothing (past the blob's end) is refused, not served as an empty success
    assert [p.error for p in client.run(pieces(first=8))] == ["no such piece"]


def test_runs_follow_each_other_on_one_stream_and_long_ones_are_cut_once_others_fetch(
    tmp_path, local_peer
):
    from node.net.blobs import CAPPED, PIECES, BlobService
    from node.net.framing import read_frame, read_raw, write_frame
    from protocol import transfer_pb2 as pb

    server = local_peer("server")
    client = local_peer("client", join=server.maddrs)
    store = BlobStore(tmp_path / "server" / "blobs")
    service = BlobService(server, store)
    service.register()
    data = os.urandom(8 * MB)
    blob_id = store.add_bytes(data)

    def request(first: int, count: int) -> pb.PieceRequest:
        return pb.PieceRequest(
            swarm_id=server.swarm_id, blob_id=blob_id, first=first, count=count, shares=True
        )

    async def open_stream(first: int, count: int):
        _, reader, writer = await client.p2p.call_binary_stream_handler(server.peer_id, PIECES)
        await write_frame(writer, request(first, count))
        return reader, writer

    async def receive(reader, until_error: bool, pieces: int = 0) -> list[pb.Piece]:
        got = []
        while (until_error or len(got) < pieces) and (
            piece := await read_frame(reader, pb.Piece, 4096)
        ):
            got.append(piece)
            if piece.error:
                break
            chunk = await read_raw(reader, piece.size)
            assert chunk == data[piece.index * MB : (piece.index + 1) * MB]
        return got

    async def pipelined() -> list[int]:
        reader, writer = await open_stream(0, 3)
        await write_frame(writer, request(5, 2))  # the next run, before the first is read
        got = await receive(reader, False, 5)
        writer.write_eof()  # no more runs: the provider lets the stream go
        assert await read_frame(reader, pb.Piece, 4096) is None
        writer.close()
        return [p.index for p in got]

    assert client.run(pipelined()) == [0, 1, 2, 5, 6]
    assert service.stats.bytes_out == 5 * MB

    async def two_at_once() -> tuple[list[int], list[pb.Piece]]:
        first, first_writer = await open_stream(0, 8)  # not read: stuck a few pieces in
        await asyncio.sleep(0.5)
        second, second_writer = await open_stream(0, 8)
        cut = await receive(second, True)  # cut short while the first run is going out
        second_writer.close()
        whole = await receive(first, False, 8)  # alone again: nothing cuts it
        first_writer.close()
        return [p.index for p in whole], cut

    whole, cut = client.run(two_at_once())
    assert whole == list(range(8))
    assert [p.index for p in cut] == [0, 1, 2, 3, 4] and cut[-1].error == CAPPED
    assert service.stats.refused == {}  # cutting a run short is not a refusal

    async def alone(shares: bool) -> list[pb.Piece]:
        _, reader, writer = await client.p2p.call_binary_stream_handler(server.peer_id, PIECES)
        await write_frame(
            writer,
            pb.PieceRequest(
                swarm_id=server.swarm_id, blob_id=blob_id, first=0, count=8, shares=shares
            ),
        )
        got = await receive(reader, False, 5)
        writer.close()
        return got

    # A whole copy is out now: a fetcher that shares is sent to look among the others.
    assert client.run(alone(True))[-1].error == CAPPED
    assert not client.run(alone(False))[-1].error  # one that does not gets its run


def test_a_fetch_nobody_can_serve_gives_up_at_once_when_the_peer_is_told_to_stop(
    tmp_path, local_peer
):
    """A volunteer told to stop while it looked for providers of a head that were gone
    held its shutdown for the fetch's whole timeout (the soak's SIGTERMs, scripts/soak.py)."""
    from node.net.blobs import FetchError, fetch

    peer = local_peer("peer")
    stop = threading.Event()
    failed: list[BaseException] = []

    def download() -> None:
        try:
            fetch(peer, BlobStore(tmp_path / "blobs"), "ab" * 32, timeout=120, cancel=stop)
        except FetchError as exc:
            failed.append(exc)

    worker = threading.Thread(target=download)
    worker.start()
    time.sleep(1.0)
    assert worker.is_alive()  # still looking for a provider
    told = time.monotonic()
    stop.set()
    worker.join(timeout=10)
    assert not worker.is_alive() and time.monotonic() - told < 2.0
    assert len(failed) == 1 and "stopping" in str(failed[0])
