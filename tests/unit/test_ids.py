"""Blob ids: the tree of piece hashes that protocol/ids.py specifies, however the bytes arrive."""

from __future__ import annotations

import os
import random
import struct

import pytest
from blake3 import blake3

from protocol.ids import (
    BLOB_PIECE,
    BlobHasher,
    blob_root,
    bytes_id,
    file_hasher,
    file_id,
    piece_digest,
)


def _spec(data: bytes) -> str:
    """The docstring's formula, written out independently of the module."""
    pieces = [data[i : i + BLOB_PIECE] for i in range(0, len(data), BLOB_PIECE)] or [b""]
    h = blake3(b"mergeswarm/blob/v2\n" + struct.pack("<Q", len(data)))
    for piece in pieces:
        h.update(blake3(piece).digest())
    return h.hexdigest()


@pytest.mark.parametrize("size", [0, 1, BLOB_PIECE - 1, BLOB_PIECE, BLOB_PIECE + 1, 3 * BLOB_PIECE])
def test_a_blob_id_is_the_specified_tree_of_piece_hashes(tmp_path, size):
    data = os.urandom(size)
    (tmp_path / "f").write_bytes(data)
    assert bytes_id(data) == file_id(tmp_path / "f") == _spec(data)
    hasher = file_hasher(tmp_path / "f")
    assert hasher.size == size and blob_root(size, hasher.pieces()) == _spec(data)
    assert len(hasher.pieces()) == max(1, -(-size // BLOB_PIECE))


def test_the_blob_id_of_a_known_input_is_pinned():
    # Changing this digest changes every delta, patch and snapshot id: bump PROTOCOL_VERSION.
    assert bytes_id(b"") == "53af1e5fb7b79b5221257c8f1d64f277d57660870f7c67458bdbbdd9982a6b32"


def test_the_piece_hash_is_blake3_as_its_reference_vectors_give_it():
    # The empty input's digest from the BLAKE3 specification's test vectors.
    empty = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    assert piece_digest(b"").hex() == empty
    assert blob_root(0, [bytes.fromhex(empty)]) == bytes_id(b"")


def test_the_id_does_not_depend_on_how_the_bytes_are_chunked():
    data = os.urandom(2 * BLOB_PIECE + 12345)
    rng = random.Random(0)
    for _ in range(5):
        hasher, at = BlobHasher(), 0
        while at < len(data):
            step = rng.choice([1, 7, 4096, BLOB_PIECE - 3, BLOB_PIECE, 3 * BLOB_PIECE])
            hasher.update(memoryview(data)[at : at + step])
            at += step
        assert hasher.hexdigest() == _spec(data)


def test_the_id_commits_to_the_size():
    # A blob ending on a piece boundary and the same blob with an empty last piece differ.
    assert blob_root(0, [piece_digest(b"")]) != blob_root(1, [piece_digest(b"")])
