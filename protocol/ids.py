"""Content ids, written as 64 lowercase hex digits.

* A **base id** hashes every tensor of a model in code-point order of names:
  ``sha256(b"mergeswarm/base/v1\\n" + for each tensor: u32 len(name) + name +
  u8 len(dtype) + dtype + u8 ndim + ndim * u64 dim + u64 nbytes + bytes)``,
  integers little-endian, ``dtype`` the safetensors name (``"BF16"``), bytes the
  tensor's little-endian row-major storage. File layout, sharding and
  non-tensor files do not matter.
* A **blob id** (a delta, a patch, a snapshot) hashes the file's bytes as a
  one-level tree of BLAKE3 digests (32 bytes): ``blake3(b"mergeswarm/blob/v2\\n"
  + u64 size + blake3(piece 0) + blake3(piece 1) + ...)`` over pieces of
  ``BLOB_PIECE`` bytes (the last one shorter; an empty file is one empty piece).
  The piece hashes are what a fetcher verifies each piece against as it lands,
  and they add up to the id, so a provider's list of them is checked before a
  byte is downloaded and no pass over the whole blob is needed at the end.
  BLAKE3 rather than SHA-256 because every byte a peer receives is hashed on
  the path that competes with the transport for the cores: one core hashes
  3.6x the bytes with it (6.2 GB/s against SHA-256's 1.7 GB/s here;
  scripts/bench_transfer.py, docs/benchmarks.md).
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from blake3 import blake3

from protocol.model_dir import ModelDir

ID_HEX_LEN = 64
BLOB_PIECE = 1 << 20
_BLOB_DOMAIN = b"mergeswarm/blob/v2\n"


def is_id(value: str) -> bool:
    return len(value) == ID_HEX_LEN and all(c in "0123456789abcdef" for c in value)


class BaseHasher:
    """Builds a base id incrementally; feed tensors in code-point order of names."""

    def __init__(self) -> None:
        self._h = hashlib.sha256(b"mergeswarm/base/v1\n")
        self._last: str | None = None

    def update(self, name: str, dtype: str, tensor: torch.Tensor) -> None:
        if self._last is not None and name <= self._last:
            raise ValueError(f"tensor {name!r} hashed after {self._last!r}; feed in sorted order")
        self._last = name
        raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
        encoded = name.encode("utf-8")
        h = self._h
        h.update(struct.pack("<I", len(encoded)) + encoded)
        h.update(struct.pack("<B", len(dtype)) + dtype.encode("ascii"))
        h.update(struct.pack(f"<B{tensor.dim()}Q", tensor.dim(), *tensor.shape))
        h.update(struct.pack("<Q", raw.nbytes))
        h.update(raw)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def base_id(
    model: ModelDir | str | os.PathLike[str], progress: Callable[[int], None] | None = None
) -> str:
    """The content id of a model directory, read one tensor at a time.

    :param progress: called with the byte count of each tensor once hashed.
    """
    md = model if isinstance(model, ModelDir) else ModelDir(model)
    hasher = BaseHasher()
    for name in md.names():
        info = md.tensors[name]
        hasher.update(name, info.dtype, md.tensor(name))
        if progress is not None:
            progress(info.nbytes)
    return hasher.hexdigest()


def blob_piece_count(size: int) -> int:
    return max(1, -(-size // BLOB_PIECE))


def piece_digest(data: bytes | bytearray | memoryview) -> bytes:
    """The hash a blob piece is checked against."""
    return blake3(data).digest()


def blob_root(size: int, piece_hashes: Sequence[bytes]) -> str:
    """The blob id of ``size`` bytes whose pieces hash to ``piece_hashes``."""
    h = blake3(_BLOB_DOMAIN)
    h.update(struct.pack("<Q", size))
    for digest in piece_hashes:
        h.update(digest)
    return h.hexdigest()


class BlobHasher:
    """Builds a blob id from bytes fed in any chunking; keeps the piece hashes."""

    def __init__(self) -> None:
        self.size = 0
        self.piece_hashes: list[bytes] = []
        self._piece = blake3()
        self._filled = 0  # bytes of the current piece

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            take = min(len(view), BLOB_PIECE - self._filled)
            self._piece.update(view[:take])
            self._filled += take
            self.size += take
            view = view[take:]
            if self._filled == BLOB_PIECE:
                self.piece_hashes.append(self._piece.digest())
                self._piece = blake3()
                self._filled = 0

    def pieces(self) -> list[bytes]:
        """Every piece's hash, the last (possibly short or empty) one included."""
        if self._filled or not self.piece_hashes:
            return [*self.piece_hashes, self._piece.digest()]
        return list(self.piece_hashes)

    def hexdigest(self) -> str:
        return blob_root(self.size, self.pieces())


def bytes_id(data: bytes | bytearray | memoryview) -> str:
    """The blob id of ``data``."""
    hasher = BlobHasher()
    hasher.update(data)
    return hasher.hexdigest()


def file_hasher(path: str | os.PathLike[str]) -> BlobHasher:
    """A file's bytes hashed piece by piece (read one piece at a time)."""
    hasher = BlobHasher()
    with open(Path(path), "rb") as f:
        while chunk := f.read(BLOB_PIECE):
            hasher.update(chunk)
    return hasher


def file_id(path: str | os.PathLike[str]) -> str:
    """The blob id of a file."""
    return file_hasher(path).hexdigest()
