"""The content-addressed blob store: ids, pins and quota, resumable downloads, pushes."""

from __future__ import annotations

import os
import time

import pytest
from blake3 import blake3

from node.net import blobstore
from node.net.blobstore import (
    PIECE_SIZE,
    BlobError,
    BlobStore,
    QuotaError,
    check_manifest,
    piece_buffer,
)
from protocol import transfer_pb2 as pb
from protocol.ids import bytes_id

P = PIECE_SIZE
_id = bytes_id


def test_a_blob_is_stored_under_its_hash_with_a_piece_manifest(tmp_path):
    store = BlobStore(tmp_path / "blobs")
    data = os.urandom(PIECE_SIZE * 2 + 5)
    (tmp_path / "f").write_bytes(data)
    blob_id = store.add_file(tmp_path / "f")
    assert blob_id == _id(data) and store.ids() == [blob_id] and store.verify(blob_id)
    manifest = store.manifest(blob_id)
    assert manifest.size == len(data) and len(manifest.piece_hashes) == 3
    assert manifest.piece_hashes[2] == blake3(data[2 * PIECE_SIZE :]).digest()
    assert store.read_piece(blob_id, manifest, 2) == data[2 * PIECE_SIZE :]
    assert store.add_bytes(data) == blob_id and store.ids() == [blob_id]


def test_garbage_collection_drops_the_oldest_unpinned_blobs_only(tmp_path):
    store = BlobStore(tmp_path / "blobs", quota_bytes=3000)
    pinned = store.add_bytes(b"p" * 1000, pin="head")
    old = store.add_bytes(b"o" * 1000)
    os.utime(store.path(old), (1, 1))  # least recently used
    new = store.add_bytes(b"n" * 1000)
    assert set(store.ids()) == {pinned, old, new}
    latest = store.add_bytes(b"l" * 1000)
    assert set(store.ids()) == {pinned, new, latest}
    store.pin(new, "delta")
    store.pin(latest, "delta")
    with pytest.raises(QuotaError, match="pinned"):
        store.add_bytes(b"x" * 1000)
    with pytest.raises(QuotaError, match="over the store's quota"):
        store.add_bytes(b"x" * 4000)
    reopened = BlobStore(tmp_path / "blobs", quota_bytes=3000)  # pins are on disk
    assert reopened.pins(pinned) == ["head"]
    reopened.unpin(new, "delta")
    reopened.add_bytes(b"y" * 1000)
    assert new not in reopened.ids() and pinned in reopened.ids()


def _manifest(data: bytes, piece_size: int = PIECE_SIZE, blob_id: str | None = None) -> pb.Manifest:
    pieces = [data[i : i + piece_size] for i in range(0, len(data), piece_size)]
    return pb.Manifest(
        blob_id=blob_id or _id(data),
        size=len(data),
        piece_size=piece_size,
        piece_hashes=[blake3(p).digest() for p in pieces],
    )


def test_a_download_resumes_from_saved_progress_after_a_restart(tmp_path):
    data = os.urandom(10 * P + 7)
    manifest = _manifest(data)
    store = BlobStore(tmp_path / "blobs")
    partial = store.start_partial(manifest)
    assert not partial.write_piece(0, b"\0" * P)  # wrong bytes are not written
    for i in (0, 3, 10):
        assert partial.write_piece(i, data[i * P : (i + 1) * P])
    partial.save_progress()
    assert partial.write_piece(5, data[5 * P : 6 * P])  # not saved: lost in the "crash"

    resumed = BlobStore(tmp_path / "blobs").start_partial(manifest)
    assert [i for i in range(resumed.count) if resumed.has(i)] == [0, 3, 10]
    for i in range(resumed.count):
        if not resumed.has(i):
            assert resumed.write_piece(i, data[i * P : (i + 1) * P])
    assert resumed.complete
    resumed.store.finish_partial(resumed)
    assert resumed.store.path(manifest.blob_id).read_bytes() == data
    assert list((tmp_path / "blobs" / "partial").iterdir()) == []


def _opened_direct(monkeypatch) -> list[bool]:
    """Whether each ``os.open`` of the blob store asked for O_DIRECT."""
    flags: list[bool] = []
    real_open = os.open

    def spy(path, flag, *args, **kwargs):
        flags.append(bool(flag & getattr(os, "O_DIRECT", 0)))
        return real_open(path, flag, *args, **kwargs)

    monkeypatch.setattr(blobstore.os, "open", spy)
    return flags


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="direct I/O is Linux only")
def test_pieces_in_piece_buffers_are_written_around_the_page_cache(tmp_path, monkeypatch):
    data = os.urandom(2 * P + 4097)  # the last piece is not block-aligned
    partial = BlobStore(tmp_path / "blobs").start_partial(_manifest(data))
    opened = _opened_direct(monkeypatch)
    for i in range(partial.count):
        chunk = data[i * P : (i + 1) * P]
        buffer = piece_buffer()[: len(chunk)]
        buffer[:] = chunk
        assert partial.write_piece(i, buffer)
    # Aligned pieces go direct; the short last one is refused there and lands buffered.
    assert opened == [True, True, True, False]
    partial.store.finish_partial(partial)
    assert partial.store.path(partial.blob_id).read_bytes() == data


def test_a_piece_lands_through_the_page_cache_where_direct_io_is_refused(tmp_path, monkeypatch):
    data = os.urandom(2 * P)
    partial = BlobStore(tmp_path / "blobs").start_partial(_manifest(data))
    real_open = os.open

    def no_direct(path, flag, *args, **kwargs):  # what tmpfs answers
        if flag & getattr(os, "O_DIRECT", 0):
            raise OSError(22, "Invalid argument")
        return real_open(path, flag, *args, **kwargs)

    monkeypatch.setattr(blobstore.os, "open", no_direct)
    aligned = piece_buffer()
    aligned[:] = data[:P]
    assert partial.write_piece(0, aligned)
    assert partial.write_piece(1, data[P:])
    partial.store.finish_partial(partial)
    assert partial.store.path(partial.blob_id).read_bytes() == data


def test_a_manifest_that_does_not_add_up_to_the_id_is_refused_before_any_download(tmp_path):
    data = os.urandom(3 * P)
    fake = os.urandom(3 * P)
    lie = _manifest(fake, blob_id=_id(data))  # self-consistent pieces, someone else's id
    store = BlobStore(tmp_path / "blobs")
    with pytest.raises(BlobError, match="do not add up to the blob id"):
        store.start_partial(lie)
    assert not list((tmp_path / "blobs" / "partial").iterdir())


def test_an_incomplete_download_is_not_installed(tmp_path):
    data = os.urandom(3 * P)
    store = BlobStore(tmp_path / "blobs")
    partial = store.start_partial(_manifest(data))
    partial.write_piece(0, data[:P])
    with pytest.raises(BlobError, match="1 of 3 pieces"):
        store.finish_partial(partial)
    assert not store.has(_id(data))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"blob_id": "cd" * 32}, "manifest is for"),
        ({"piece_size": 10}, "piece size"),
        ({"size": 10**9}, "lists 4 pieces"),
        ({"piece_hashes": [b"x"] * 4}, "32-byte BLAKE3"),
        ({"piece_hashes": [bytes(32)] * 4}, "do not add up"),
    ],
)
def test_malformed_manifests_are_refused(change, message):
    good = _manifest(os.urandom(3 * P + 5))
    bad = pb.Manifest()
    bad.CopyFrom(good)
    for field, value in change.items():
        if field == "piece_hashes":
            del bad.piece_hashes[:]
            bad.piece_hashes.extend(value)
        else:
            setattr(bad, field, value)
    with pytest.raises(BlobError, match=message):
        check_manifest(bad, good.blob_id)


def test_a_push_is_installed_only_when_whole_and_matching(tmp_path):
    store = BlobStore(tmp_path / "blobs")
    data = os.urandom(5000)
    incoming = store.receive(len(data))
    incoming.write(data[:100])
    with pytest.raises(BlobError, match="100 of 5000"):
        incoming.finish(_id(data))
    incoming = store.receive(len(data))
    incoming.write(data)
    with pytest.raises(BlobError, match="more bytes"):
        incoming.write(b"x")
    with pytest.raises(BlobError, match="do not hash"):
        incoming.finish("cd" * 32)
    incoming = store.receive(len(data))
    incoming.write(data)
    incoming.finish(_id(data))
    assert store.ids() == [_id(data)]
    assert not [p for p in (tmp_path / "blobs").iterdir() if p.name.startswith(".")]


def test_a_push_makes_room_only_once_its_bytes_arrived_and_passed_the_check(tmp_path):
    store = BlobStore(tmp_path / "blobs", quota_bytes=6000)
    old = store.add_bytes(os.urandom(6000))  # unpinned, filling the quota
    data = os.urandom(5000)
    incoming = store.receive(len(data))  # a header: nothing evicted yet
    assert store.ids() == [old]
    incoming.write(data)

    def refuse(path):
        assert path.read_bytes() == data  # the check sees the whole file before it is installed
        raise BlobError("not what was announced")

    with pytest.raises(BlobError, match="not what was announced"):
        incoming.finish(_id(data), check=refuse)
    assert store.ids() == [old]  # refused after arriving: still nothing evicted
    incoming = store.receive(len(data))
    incoming.write(data)
    incoming.finish(_id(data), check=lambda path: None)
    assert store.ids() == [_id(data)]


def test_a_push_that_cannot_fit_beside_the_pinned_blobs_is_refused_at_its_header(tmp_path):
    store = BlobStore(tmp_path / "blobs", quota_bytes=6000)
    store.pin(store.add_bytes(os.urandom(4000)), "head")
    with pytest.raises(QuotaError, match="pinned"):
        store.receive(3000)
    store.receive(2000).discard()


def test_collect_deletes_unpinned_blobs_unused_for_the_retention_period(tmp_path):
    store = BlobStore(tmp_path / "blobs")
    old, pinned, served, fresh = (store.add_bytes(os.urandom(100)) for _ in range(4))
    store.pin(pinned, "head")
    long_ago = time.time() - 7200
    for blob_id in (old, pinned, served):
        os.utime(store.path(blob_id), (long_ago, long_ago))
    store.touch(served)  # served a moment ago
    assert store.collect(3600) == [old]
    assert sorted(store.ids()) == sorted([pinned, served, fresh])
