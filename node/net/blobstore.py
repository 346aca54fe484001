"""A content-addressed blob store in the data directory.

Layout under ``<data dir>/blobs``::

    <id>             a complete blob; its id hashes its bytes (protocol.ids.blob_root)
    <id>.manifest    its piece hashes (protocol.transfer_pb2.Manifest)
    partial/<id>     a download in progress, pieces written in place
    partial/<id>.manifest, partial/<id>.have   what it should hold and what it holds
    pins.json        why blobs must stay: {id: [reason, ...]}

Every write goes through a temp file, fsync and rename, so a crash leaves
either the old or the new state. Garbage collection drops the least recently
used unpinned blobs when a new one needs room under the quota; a pinned blob
(this peer's unmerged delta, the head, its patch) is never dropped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from protocol import transfer_pb2 as pb
from protocol.durable import fsync_dir, write_atomic
from protocol.errors import MergeswarmError
from protocol.ids import (
    BLOB_PIECE,
    BlobHasher,
    blob_piece_count,
    blob_root,
    file_hasher,
    is_id,
    piece_digest,
)

logger = logging.getLogger(__name__)

PIECE_SIZE = BLOB_PIECE  # pieces are the id's own: each is verified against it on arrival
MAX_PIECES = 1 << 16  # 64 GiB blobs: bounds a manifest from a peer (~2 MiB)
_COPY = 1 << 20

# Why a blob is kept (pin reasons; a blob stays while it has any)
HEAD_PIN = "head"  # a head's snapshot or patch
DELTA_PIN = "unmerged-delta"  # a seed's mirror of a delta not yet merged
OWN_DELTA_PIN = "own-delta"  # a volunteer's own delta until a head has moved past it
MOMENTUM_PIN = "momentum"  # the outer momentum of the heads whose bases are kept


class BlobError(MergeswarmError):
    """A blob is missing, does not match its id, or does not fit."""


class QuotaError(BlobError):
    """The store cannot make room without dropping pinned blobs."""


def check_manifest(manifest: pb.Manifest, blob_id: str, size: int | None = None) -> None:
    """Raise BlobError unless ``manifest`` is the one of ``blob_id`` (and ``size``).

    The piece hashes must add up to the id, so a manifest from a peer is checked
    before a byte of the blob is fetched; the piece count (hence the manifest) is
    bounded by MAX_PIECES.
    """
    if manifest.blob_id != blob_id:
        raise BlobError(f"manifest is for {manifest.blob_id[:16]!r}, not {blob_id[:16]}")
    if manifest.piece_size != PIECE_SIZE:
        raise BlobError(f"manifest piece size {manifest.piece_size}; pieces are {PIECE_SIZE}")
    if size is not None and manifest.size != size:
        raise BlobError(f"manifest says {manifest.size:,} bytes; the blob has {size:,}")
    n = blob_piece_count(manifest.size)
    if n > MAX_PIECES or len(manifest.piece_hashes) != n:
        raise BlobError(f"manifest lists {len(manifest.piece_hashes)} pieces for {n}")
    if any(len(h) != 32 for h in manifest.piece_hashes):
        raise BlobError("manifest piece hashes must be 32-byte BLAKE3 digests")
    if blob_root(manifest.size, manifest.piece_hashes) != blob_id:
        raise BlobError("manifest piece hashes do not add up to the blob id")


def piece_range(manifest: pb.Manifest, index: int) -> tuple[int, int]:
    """(offset, length) of piece ``index``."""
    start = index * manifest.piece_size
    return start, min(manifest.piece_size, manifest.size - start)


class Partial:
    """A download in progress: which pieces are in, written in place in the partial file."""

    def __init__(self, store: BlobStore, manifest: pb.Manifest) -> None:
        self.store = store
        self.manifest = manifest
        self.blob_id = manifest.blob_id
        self.path = store.partial_dir / self.blob_id
        self.count = len(manifest.piece_hashes)
        self.have = bytearray((self.count + 7) // 8)
        self._lock = threading.Lock()

    def has(self, index: int) -> bool:
        return bool(self.have[index // 8] >> (index % 8) & 1)

    @property
    def done(self) -> int:
        return sum(bin(b).count("1") for b in self.have)

    @property
    def complete(self) -> bool:
        return self.done == self.count

    def write_piece(self, index: int, data: bytes) -> bool:
        """Store piece ``index`` if it matches its hash; False (nothing written) if not."""
        offset, length = piece_range(self.manifest, index)
        if len(data) != length or piece_digest(data) != self.manifest.piece_hashes[index]:
            return False
        _write_at(self.path, data, offset)
        with self._lock:
            self.have[index // 8] |= 1 << (index % 8)
        return True

    def save_progress(self) -> None:
        """Persist which pieces are in (after fsyncing them), so a restart resumes."""
        with self._lock:
            have = bytes(self.have)  # pieces marked before the fsync reach the disk with it
        with open(self.path, "rb+") as f:
            os.fsync(f.fileno())
        write_atomic(self.path.with_name(self.blob_id + ".have"), have)


_DIRECT = getattr(os, "O_DIRECT", 0)  # Linux only


def _write_at(path: Path, data: bytes, offset: int) -> None:
    """Write ``data`` at ``offset`` of ``path``, around the page cache where the system allows.

    A piece is hashed already and written once: copying it into the page cache only
    for the kernel to write it back later costs CPU that the transfer needs (measured
    on the 2-core VM, 200 MB written and fsynced: 0.02 s of system time direct, 0.04 s
    through the page cache, 0.6 s when its pages had been freed just before). Direct
    I/O wants block-aligned buffers, offsets and lengths: a piece in a ``piece_buffer``
    is, except the last piece of a blob. What it refuses goes through the page cache.
    """
    view = memoryview(data).cast("B")
    done = _write_direct(path, view, offset) if _DIRECT else 0
    if done < len(view):
        fd = os.open(path, os.O_WRONLY)
        try:
            _pwrite_all(fd, view[done:], offset + done)
        finally:
            os.close(fd)


def _write_direct(path: Path, view: memoryview, offset: int) -> int:
    """Bytes of ``view`` written with O_DIRECT (0 where the file system or alignment refuses)."""
    try:
        fd = os.open(path, os.O_WRONLY | _DIRECT)
    except OSError:  # e.g. tmpfs has no direct I/O
        return 0
    done = 0
    try:
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)
    except OSError:  # EINVAL: misaligned; a real error shows again on the buffered write
        pass
    finally:
        os.close(fd)
    return done


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def piece_buffer(size: int = PIECE_SIZE) -> memoryview:
    """A page-aligned buffer for one piece (so ``Partial.write_piece`` can write it direct)."""
    return memoryview(mmap.mmap(-1, size))


class BlobStore:
    """Blobs of one peer, under ``root``, at most ``quota_bytes`` of them (0: no quota)."""

    def __init__(self, root: str | os.PathLike[str], quota_bytes: int = 0) -> None:
        self.root = Path(root)
        self.partial_dir = self.root / "partial"
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        self.quota_bytes = quota_bytes
        self._lock = threading.RLock()
        self._pins: dict[str, list[str]] = self._load_pins()
        self._partials: dict[str, Partial] = {}
        stale = time.time() - 3600  # older than any write in progress (another process may write)
        for leftover in self.root.glob(".*.tmp-*"):  # a crash mid-write
            if leftover.stat().st_mtime < stale:
                leftover.unlink(missing_ok=True)

    # -- complete blobs ----------------------------------------------------------

    def path(self, blob_id: str) -> Path:
        if not is_id(blob_id):
            raise BlobError(f"{blob_id[:80]!r} is not a blob id")
        return self.root / blob_id

    def has(self, blob_id: str) -> bool:
        return is_id(blob_id) and (self.root / blob_id).is_file()

    def ids(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if is_id(p.name) and p.is_file())

    def size(self, blob_id: str) -> int:
        return self.path(blob_id).stat().st_size

    def used_bytes(self) -> int:
        return sum(self.size(i) for i in self.ids())

    def manifest(self, blob_id: str) -> pb.Manifest:
        path = self.path(blob_id).with_name(blob_id + ".manifest")
        if path.is_file():
            return pb.Manifest.FromString(path.read_bytes())
        return self._write_manifest(blob_id)

    def _write_manifest(self, blob_id: str, hasher: BlobHasher | None = None) -> pb.Manifest:
        """Record the piece hashes of a stored blob (from ``hasher`` if it just hashed it)."""
        hasher = hasher or file_hasher(self.path(blob_id))
        manifest = pb.Manifest(
            blob_id=blob_id, size=hasher.size, piece_size=PIECE_SIZE, piece_hashes=hasher.pieces()
        )
        write_atomic(self.root / (blob_id + ".manifest"), manifest.SerializeToString())
        return manifest

    def read_piece(self, blob_id: str, manifest: pb.Manifest, index: int) -> bytes:
        offset, length = piece_range(manifest, index)
        with open(self.path(blob_id), "rb") as f:
            f.seek(offset)
            return f.read(length)

    def add_file(self, source: str | os.PathLike[str], *, pin: str | None = None) -> str:
        """Copy a file in (verifying nothing: its id is what it hashes to); returns its id."""
        source = Path(source)
        size = source.stat().st_size
        tmp = self.root / f".add.tmp-{os.getpid()}-{threading.get_ident()}"
        hasher = BlobHasher()
        try:
            with self._lock:
                self.make_room(size)
            with open(source, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(_COPY):
                    hasher.update(chunk)
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
            blob_id = hasher.hexdigest()
            self._install(tmp, blob_id, pin, hasher)
        finally:
            tmp.unlink(missing_ok=True)
        return blob_id

    def add_bytes(self, data: bytes, *, pin: str | None = None) -> str:
        hasher = BlobHasher()
        hasher.update(data)
        blob_id = hasher.hexdigest()
        if not self.has(blob_id):
            tmp = self.root / f".add.tmp-{os.getpid()}-{threading.get_ident()}"
            try:
                with self._lock:
                    self.make_room(len(data))
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                self._install(tmp, blob_id, pin, hasher)
            finally:
                tmp.unlink(missing_ok=True)
        elif pin:
            self.pin(blob_id, pin)
        return blob_id

    def receive(self, size: int) -> Incoming:
        """A blob of ``size`` bytes arriving in pieces (see :class:`Incoming`). Nothing is
        evicted yet: room is made once the bytes have arrived and passed their checks, so a
        header alone (a push that never sends its data) costs the store nothing."""
        self.check_room(size)
        return Incoming(self, size)

    def check_room(self, nbytes: int) -> None:
        """Raise QuotaError unless ``nbytes`` more could fit once unpinned blobs were dropped."""
        if not self.quota_bytes:
            return
        with self._lock:
            kept = sum(self.size(i) for i in self.ids() if i in self._pins)
            if kept + self._partial_bytes() + nbytes > self.quota_bytes:
                raise QuotaError(
                    f"no room for {nbytes:,} bytes: {kept:,} of {self.quota_bytes:,} held by "
                    "pinned blobs and downloads"
                )

    def _install(
        self, tmp: Path, blob_id: str, pin: str | None, hasher: BlobHasher | None = None
    ) -> None:
        with self._lock:
            if pin:
                self.pin(blob_id, pin)
            if not self.has(blob_id):
                os.replace(tmp, self.root / blob_id)
                fsync_dir(self.root)
                self._write_manifest(blob_id, hasher)
        self.manifest(blob_id)

    def verify(self, blob_id: str) -> bool:
        """Whether the stored bytes still hash to the id."""
        return file_hasher(self.path(blob_id)).hexdigest() == blob_id

    # -- pins and garbage collection ----------------------------------------------

    def _load_pins(self) -> dict[str, list[str]]:
        path = self.root / "pins.json"
        if not path.is_file():
            return {}
        try:
            pins = json.loads(path.read_text())
            return {k: list(v) for k, v in pins.items() if is_id(k)}
        except (ValueError, AttributeError, TypeError) as exc:
            raise BlobError(f"{path}: unreadable ({exc}); fix or delete it") from None

    def _save_pins(self) -> None:
        write_atomic(self.root / "pins.json", json.dumps(self._pins, sort_keys=True).encode())

    def pin(self, blob_id: str, reason: str) -> None:
        """Keep ``blob_id`` through garbage collection until every reason is unpinned."""
        with self._lock:
            reasons = self._pins.setdefault(blob_id, [])
            if reason not in reasons:
                reasons.append(reason)
                self._save_pins()

    def unpin(self, blob_id: str, reason: str) -> None:
        with self._lock:
            reasons = self._pins.get(blob_id, [])
            if reason in reasons:
                reasons.remove(reason)
                if not reasons:
                    del self._pins[blob_id]
                self._save_pins()

    def pins(self, blob_id: str) -> list[str]:
        return list(self._pins.get(blob_id, []))

    def make_room(self, nbytes: int) -> list[str]:
        """Drop least recently used unpinned blobs until ``nbytes`` more fit; returns the ids."""
        if not self.quota_bytes:
            return []
        if nbytes > self.quota_bytes:
            raise QuotaError(f"a blob of {nbytes:,} bytes is over the store's quota")
        with self._lock:
            used = self.used_bytes() + self._partial_bytes()
            dropped = []
            candidates = sorted(
                (i for i in self.ids() if i not in self._pins),
                key=lambda i: self.path(i).stat().st_atime,
            )
            for blob_id in candidates:
                if used + nbytes <= self.quota_bytes:
                    break
                used -= self.size(blob_id)
                self.delete(blob_id)
                dropped.append(blob_id)
            if used + nbytes > self.quota_bytes:
                raise QuotaError(
                    f"no room for {nbytes:,} bytes: {used:,} of {self.quota_bytes:,} held by "
                    "pinned blobs and downloads; raise the quota or unpin blobs"
                )
            return dropped

    def touch(self, blob_id: str) -> None:
        """Mark ``blob_id`` used now (serving it counts as use; see :meth:`collect`)."""
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.path(blob_id))

    def collect(self, unused_for: float) -> list[str]:
        """Delete the unpinned blobs unused for ``unused_for`` seconds (last written, read or
        served); returns their ids. Downloads in progress are not blobs yet."""
        limit = time.time() - unused_for
        dropped = []
        with self._lock:
            for blob_id in self.ids():
                if blob_id in self._pins:
                    continue
                try:
                    st = self.path(blob_id).stat()
                except FileNotFoundError:
                    continue
                if max(st.st_atime, st.st_mtime) < limit:
                    self.delete(blob_id)
                    dropped.append(blob_id)
        return dropped

    def delete(self, blob_id: str) -> None:
        with self._lock:
            self.path(blob_id).unlink(missing_ok=True)
            (self.root / (blob_id + ".manifest")).unlink(missing_ok=True)
            if self._pins.pop(blob_id, None) is not None:
                self._save_pins()

    # -- downloads in progress ------------------------------------------------------

    def _partial_bytes(self) -> int:
        return sum(p.manifest.size for p in self._partials.values())

    def partial(self, blob_id: str) -> Partial | None:
        return self._partials.get(blob_id)

    def start_partial(self, manifest: pb.Manifest) -> Partial:
        """Begin (or resume, from what a previous run saved) a download of ``manifest``."""
        check_manifest(manifest, manifest.blob_id)
        with self._lock:
            existing = self._partials.get(manifest.blob_id)
            if existing is not None:
                return existing
            self.make_room(manifest.size)
            partial = Partial(self, manifest)
            base = self.partial_dir / manifest.blob_id
            saved = base.with_name(manifest.blob_id + ".manifest")
            have = base.with_name(manifest.blob_id + ".have")
            if saved.is_file() and saved.read_bytes() == manifest.SerializeToString():
                if have.is_file() and len(have.read_bytes()) == len(partial.have):
                    partial.have[:] = have.read_bytes()
            else:
                write_atomic(saved, manifest.SerializeToString())
                have.unlink(missing_ok=True)
            if not base.is_file() or base.stat().st_size != manifest.size:
                with open(base, "wb") as f:
                    f.truncate(manifest.size)
                partial.have[:] = bytes(len(partial.have))
            self._partials[manifest.blob_id] = partial
            return partial

    def finish_partial(self, partial: Partial, *, pin: str | None = None) -> None:
        """Move a complete download in.

        No pass over the whole file: every piece was checked against the manifest as
        it landed, and the manifest against the id when the download started.
        """
        if not partial.complete:
            raise BlobError(f"{partial.done} of {partial.count} pieces of {partial.blob_id[:16]}")
        with open(partial.path, "rb+") as f:
            os.fsync(f.fileno())
        with self._lock:
            if pin:
                self.pin(partial.blob_id, pin)
            os.replace(partial.path, self.root / partial.blob_id)
            fsync_dir(self.root)
            write_atomic(
                self.root / (partial.blob_id + ".manifest"), partial.manifest.SerializeToString()
            )
        self.abandon_partial(partial)

    def release_partial(self, partial: Partial) -> None:
        """Stop serving and counting a paused download; its files stay for a later resume."""
        with self._lock:
            self._partials.pop(partial.blob_id, None)

    def abandon_partial(self, partial: Partial) -> None:
        with self._lock:
            self._partials.pop(partial.blob_id, None)
            for suffix in ("", ".manifest", ".have"):
                (self.partial_dir / (partial.blob_id + suffix)).unlink(missing_ok=True)


class Incoming:
    """A blob arriving in order (a push): written to a temp file and hashed as it comes."""

    def __init__(self, store: BlobStore, size: int) -> None:
        self.store = store
        self.size = size
        self.received = 0
        self._hash = BlobHasher()
        self._tmp = store.root / f".in.tmp-{os.getpid()}-{id(self)}"
        self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed in finish/discard

    def write(self, data: bytes) -> None:
        if self.received + len(data) > self.size:
            raise BlobError("more bytes than declared")
        self._hash.update(data)
        self._file.write(data)
        self.received += len(data)

    def finish(
        self,
        blob_id: str,
        *,
        pin: str | None = None,
        check: Callable[[Path], None] | None = None,
    ) -> None:
        """Install the blob if it is whole, hashes to ``blob_id`` and passes ``check`` (which
        raises BlobError on what it refuses), making room for it only then; else discard it
        and raise."""
        try:
            if self.received != self.size:
                raise BlobError(f"{self.received} of {self.size} declared bytes arrived")
            if self._hash.hexdigest() != blob_id:
                raise BlobError("the bytes do not hash to the blob id")
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            if check is not None:
                check(self._tmp)
            with self.store._lock:
                self.store.make_room(self.size)
                self.store._install(self._tmp, blob_id, pin, self._hash)
        finally:
            self.discard()

    def discard(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)
