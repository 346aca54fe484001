"""Blobs between real peers: spreading, failing and lying providers, pushes from client mode."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest

from node.blobs import Fetcher, providers
from node.blobstore import BlobStore
from protocol.records import Head, Heartbeat
from tests.swarm import run_cli, start_peer, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]
MB = 1 << 20


def _blob(path, size: int) -> tuple[str, bytes]:
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest(), data


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
    observer.publish("head", Head(base_id="ab" * 32, round=1, deltas=0, snapshot_id=blob_id))
    everyone = {s.peer_id for s in seeds}
    wait_for(lambda: everyone <= _provided_by(observer, blob_id), 180, "6 seeds to hold the blob")
    for s in seeds:
        assert (s.data_dir / "blobs" / blob_id).read_bytes() == data

    def origin_sent() -> int | None:
        beat = _heartbeat(observer, origin.peer_id)
        settled = beat is not None and beat.uptime_seconds > 0 and beat.bytes_out > 0
        return beat.bytes_out if settled else None

    sent = wait_for(origin_sent, 30, "the origin's heartbeat")
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
    wait_for(lambda: fetcher.partial is not None and fetcher.partial.done >= 4, 60, "first pieces")
    victim.kill9()
    thread.join(timeout=150)
    assert not errors, errors
    assert store.path(blob_id).read_bytes() == data
    assert fetcher.stats.bad_pieces >= 1  # the liar was caught ...
    assert any("does not match its hash" in e for e in fetcher.errors)
    served = {peer.to_base58(): source.received for peer, source in fetcher.sources.items()}
    assert 0 < served[victim.peer_id] < len(data)  # it was in use when it died
    assert served[origin.peer_id] > 0


def test_a_client_mode_peer_pushes_its_blob_to_a_seed_that_then_serves_it(tmp_path):
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
    blob_id, data = _blob(tmp_path / "delta.msd", 3 * MB)
    _add(volunteer, tmp_path / "delta.msd")
    wait_for(lambda: (seed.data_dir / "blobs" / blob_id).is_file(), 60, "the push to the seed")
    volunteer.kill9()  # the seed alone must now serve it
    out = run_cli(
        "blob",
        "get",
        blob_id,
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
    assert (tmp_path / "got").read_bytes() == data
    listing = run_cli("blob", "ls", "--data-dir", str(seed.data_dir))
    assert blob_id in listing.stdout


def test_blob_get_of_an_unknown_id_fails_in_one_line(tmp_path):
    seed = start_peer(tmp_path / "seed", "--no-mirror")
    out = run_cli(
        "blob",
        "get",
        "cd" * 32,
        "--join",
        seed.maddrs[0],
        "-o",
        str(tmp_path / "x"),
        "--host-maddr",
        "/ip4/127.0.0.1/tcp/0",
        "--timeout",
        "3",
    )
    assert out.returncode == 1
    assert out.stderr.startswith("mergeswarm: error: blob cdcdcdcdcdcdcdcd: no provider")
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
