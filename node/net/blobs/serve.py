"""Serving blobs: a peer's answers to Have, Pieces and Upload requests, within its limits."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from hivemind.p2p import P2PContext, PeerID

from node.net.blobs.providers import announce
from node.net.blobs.wire import (
    CAPPED,
    HAVE,
    IDLE_BETWEEN_REQUESTS,
    PIECES,
    REQUEST_DEADLINE,
    SEND,
    SMALL_FRAME,
    UPLOAD,
    UPLOAD_FRAME,
    TransferStats,
)
from node.net.blobstore import (
    PIECE_SIZE,
    BlobError,
    BlobStore,
    Partial,
    QuotaError,
    piece_range,
)
from node.net.framing import (
    DetachedStream,
    FrameError,
    read_frame,
    read_frames,
    write_frame,
)
from node.net.pieces import (
    keep_sending,
    superseed_offer,
)
from node.net.swarm import Swarm
from protocol import transfer_pb2 as pb
from protocol.container import DeltaReader
from protocol.errors import MergeswarmError
from protocol.ids import is_id
from protocol.records import ANNOUNCE

logger = logging.getLogger(__name__)

TRACKED_BLOBS = 64  # blobs whose per-piece send counts a provider keeps
UPLOAD_WINDOW = 3600.0  # seconds over which a peer's pushed bytes count against its quota


@dataclass
class ServeLimits:
    """What a peer gives others.

    :param slots: concurrent runs of pieces served in all (others get "busy" and go elsewhere).
    :param per_peer: concurrent runs served to one peer.
    :param streams: pieces streams open at once in all, idle ones included.
    :param streams_per_peer: pieces streams one peer may hold open, idle ones included (a
        stream waits at most IDLE_BETWEEN_REQUESTS for its next request).
    :param peer_bytes_per_minute: bytes served to one peer per minute (0: no limit).
    :param upload_bytes_per_peer: bytes one peer may push into this store per UPLOAD_WINDOW
        (0: refuse pushes).
    :param upload_slots: pushes received at once.
    :param max_upload_bytes: the largest push taken (a swarm's ``max_delta_bytes``).
    """

    slots: int = 4
    per_peer: int = 2
    streams: int = 64
    streams_per_peer: int = 4
    peer_bytes_per_minute: int = 0
    upload_bytes_per_peer: int = 4 << 30
    upload_slots: int = 2
    max_upload_bytes: int = 4 << 30


class PeerWindow:
    """Bytes each peer used in its current window of ``seconds``, which starts with the first
    use after the last window ended."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._windows: dict[PeerID, tuple[float, int]] = {}  # peer -> (window start, bytes)

    def lapsed(self, peer: PeerID) -> bool:
        """Whether ``peer`` had a window and it ended."""
        start = self._windows.get(peer, (time.monotonic(), 0))[0]
        return time.monotonic() - start >= self.seconds

    def used(self, peer: PeerID) -> int:
        start, used = self._windows.get(peer, (-math.inf, 0))
        return used if time.monotonic() - start < self.seconds else 0

    def charge(self, peer: PeerID, nbytes: int) -> None:
        """Add ``nbytes`` (negative: give back) to the peer's current window."""
        start, used = self._windows.get(peer, (-math.inf, 0))
        if time.monotonic() - start >= self.seconds:
            start, used = time.monotonic(), 0
        self._windows[peer] = (start, max(used + nbytes, 0))


class BlobService:
    """Serves this peer's blobs (complete and partial) and accepts pushed uploads."""

    def __init__(self, swarm: Swarm, store: BlobStore, limits: ServeLimits | None = None) -> None:
        self.swarm = swarm
        self.store = store
        self.limits = limits or ServeLimits()
        self.stats = TransferStats()
        self._active = 0
        self._per_peer: dict[PeerID, int] = defaultdict(int)
        self._streams: dict[PeerID, int] = defaultdict(int)  # open pieces streams, per peer
        self._served = PeerWindow(60.0)  # bytes served to each peer this minute
        self._pushed = PeerWindow(UPLOAD_WINDOW)  # bytes each peer pushed
        self._uploading = 0
        self._sent_counts: dict[str, list[int]] = {}  # blob -> times each piece was sent
        self._sharing: dict[str, int] = defaultdict(int)  # blob -> its runs to sharing fetchers

    def register(self) -> None:
        p2p = self.swarm.p2p
        self.swarm.run(p2p.add_protobuf_handler(HAVE, self._have, pb.HaveRequest))
        self.swarm.run(p2p.add_binary_stream_handler(PIECES, self._pieces_stream))
        self.swarm.run(p2p.add_binary_stream_handler(UPLOAD, self._upload_stream))

    async def _pieces_stream(self, info, reader, writer) -> None:
        """Serve runs of pieces, one request after another, until the fetcher closes the
        stream or a run stops short (the fetcher asks for its next run while the current
        one is still arriving, so the stream never runs dry between runs).

        A stream counts against the limits for as long as it is open, idle or not: a peer
        holds at most ``streams_per_peer``, each request must arrive whole within
        REQUEST_DEADLINE, and a stream idle for IDLE_BETWEEN_REQUESTS is closed, waiting
        on the event loop meanwhile, not on a thread.
        """
        peer = info.peer_id
        stream = None
        if (
            self._streams[peer] >= self.limits.streams_per_peer
            or sum(self._streams.values()) >= self.limits.streams
        ):
            with contextlib.suppress(FrameError, ConnectionError):
                await write_frame(writer, pb.Piece(error=self._refuse("too many streams")))
            writer.close()
            return
        self._streams[peer] += 1
        try:
            request = await read_frame(reader, pb.PieceRequest, SMALL_FRAME, REQUEST_DEADLINE)
            if request is not None:
                stream = DetachedStream(reader, writer)  # pieces go out by sendfile
            while request is not None and await self._serve_run(request, peer, stream):
                if not await stream.wait_readable(IDLE_BETWEEN_REQUESTS):
                    self._refuse("idle stream")
                    break
                request = await stream.call(
                    stream.read_frame, pb.PieceRequest, SMALL_FRAME, True, REQUEST_DEADLINE
                )
        except (FrameError, OSError) as exc:
            self._refuse("broken request")
            logger.debug("pieces for %s: %s", peer, exc)
        finally:
            self._streams[peer] -= 1
            if not self._streams[peer]:
                del self._streams[peer]
            if stream is not None:
                await stream.aclose()
            writer.close()

    async def _upload_stream(self, info, reader, writer) -> None:
        try:
            messages = read_frames(reader, pb.Upload, UPLOAD_FRAME)

            async def go_ahead() -> None:  # the uploader sends its bytes only after this
                await write_frame(writer, pb.UploadResult(accepted=True, reason=SEND))

            result = await self._upload(messages, info.peer_id, go_ahead)
            await write_frame(writer, result)
        except (FrameError, ConnectionError) as exc:
            self._refuse("broken upload")
            logger.debug("upload from %s: %s", info.peer_id, exc)
        finally:
            writer.close()

    def _refuse(self, reason: str) -> str:
        self.stats.refused[reason] += 1
        return reason

    def _lookup(self, swarm_id: str, blob_id: str) -> tuple[pb.Manifest, Partial | None] | str:
        if swarm_id != self.swarm.swarm_id:
            return self._refuse("wrong swarm")
        if not is_id(blob_id):
            return self._refuse("bad blob id")
        if self.store.has(blob_id):
            return self.store.manifest(blob_id), None
        partial = self.store.partial(blob_id)
        if partial is not None:
            return partial.manifest, partial
        return self._refuse("unknown blob")

    async def _have(self, request: pb.HaveRequest, _context: P2PContext) -> pb.HaveResponse:
        found = self._lookup(request.swarm_id, request.blob_id)
        if isinstance(found, str):
            return pb.HaveResponse(error=found)
        manifest, partial = found
        if partial is not None:
            have = bytes(partial.have)
        else:
            have = superseed_offer(
                self._sent_counts.get(request.blob_id), len(manifest.piece_hashes), request.mine
            )
        return pb.HaveResponse(
            manifest=manifest if request.with_manifest else None,
            have=have,
            served=self.stats.bytes_out,
            complete=partial is None,
        )

    def _count_sent(self, blob_id: str, count: int, index: int) -> None:
        sent = self._sent_counts.pop(blob_id, None) or [0] * count
        sent[index] += 1
        self._sent_counts[blob_id] = sent  # most recent last
        while len(self._sent_counts) > TRACKED_BLOBS:
            self._sent_counts.pop(next(iter(self._sent_counts)))

    async def _serve_run(
        self, request: pb.PieceRequest, peer: PeerID, stream: DetachedStream
    ) -> bool:
        """Send the run of pieces the limits allow, then a header with an error if it stops
        short; whether the whole run went out. The run goes out in one call on a worker
        thread (``_send_run``)."""
        found = self._lookup(request.swarm_id, request.blob_id)
        if isinstance(found, str):
            await stream.call(stream.write_frame, pb.Piece(error=found))
            return False
        manifest, partial = found
        busy = (
            "busy"
            if self._active >= self.limits.slots
            else "too many requests"
            if self._per_peer[peer] >= self.limits.per_peer
            else None
        )
        if busy:
            await stream.call(stream.write_frame, pb.Piece(error=self._refuse(busy)))
            return False
        count = len(manifest.piece_hashes)
        if partial is None:  # serving is use: retention keeps what others still fetch
            self.store.touch(request.blob_id)
        if not 0 <= request.first < count:  # a run of nothing would only hold the stream
            await stream.call(stream.write_frame, pb.Piece(error=self._refuse("no such piece")))
            return False
        headers: list[pb.Piece] = []
        refusal = None
        for index in range(request.first, min(request.first + max(request.count, 1), count)):
            size = piece_range(manifest, index)[1]
            if partial is not None and not partial.has(index):
                refusal = pb.Piece(index=index, error=self._refuse("piece not held"))
                break
            if not self._within_budget(peer, size):
                refusal = pb.Piece(index=index, error=self._refuse("peer byte budget"))
                break
            self._served.charge(peer, size)
            headers.append(pb.Piece(index=index, size=size))
        path = self.store.path(request.blob_id) if partial is None else partial.path
        loop = asyncio.get_running_loop()

        def sent(piece: pb.Piece) -> None:  # on the event loop, as each piece goes out
            self.stats.bytes_out += piece.size
            if partial is None:  # what the next asker is offered depends on it at once
                self._count_sent(request.blob_id, count, piece.index)

        # A fetcher that shares what it gets can find the pieces among others once this
        # peer has sent a whole copy out: it gets a short run, and looks for them.
        copy_out = (
            partial is None
            and request.shares
            and min(self._sent_counts.get(request.blob_id, [0])) > 0
        )

        def more(n: int) -> bool:  # on the run's thread, before its n-th piece
            others = self._sharing.get(request.blob_id, 0) - request.shares
            return keep_sending(
                n, complete=partial is None, other_sharers=others, copy_out=copy_out
            )

        self._active += 1
        self._per_peer[peer] += 1
        self._sharing[request.blob_id] += request.shares
        try:
            whole = await stream.call(
                _send_run,
                stream,
                path,
                headers,
                refusal,
                lambda piece: loop.call_soon_threadsafe(sent, piece),
                more,
            )
        finally:
            self._active -= 1
            self._per_peer[peer] -= 1
            if not self._per_peer[peer]:
                del self._per_peer[peer]
            self._sharing[request.blob_id] -= request.shares
            if not self._sharing[request.blob_id]:
                del self._sharing[request.blob_id]
        return whole

    def _within_budget(self, peer: PeerID, nbytes: int) -> bool:
        limit = self.limits.peer_bytes_per_minute
        if not limit or self._served.lapsed(peer):  # a new minute: its first piece goes out
            return True
        return self._served.used(peer) + nbytes <= limit

    async def _upload(
        self,
        requests: AsyncIterator[pb.Upload],
        peer: PeerID,
        go_ahead: Callable[[], Awaitable[None]],
    ) -> pb.UploadResult:
        """Accept a delta pushed by a peer that others cannot dial, if the swarm announced it.

        The first message names the blob (no data); ``go_ahead`` tells the uploader to send
        the bytes once the push is accepted, so a refusal costs no transfer. What arrives is
        installed only if it hashes to its id and opens as a ``.msd`` signed by an author
        who announced it against the base it names; only then does the store make room.
        """
        first = await anext(requests, None)
        if first is None:
            return pb.UploadResult(reason=self._refuse("empty upload"))
        if first.swarm_id != self.swarm.swarm_id:
            return pb.UploadResult(reason=self._refuse("wrong swarm"))
        if not is_id(first.blob_id) or not is_id(first.base_id):
            return pb.UploadResult(reason=self._refuse("bad blob id"))
        if self.store.has(first.blob_id):
            return pb.UploadResult(accepted=True, reason="already held")
        if first.size > self.limits.max_upload_bytes:
            return pb.UploadResult(reason=self._refuse("too large"))
        if first.size > self.limits.upload_bytes_per_peer - self._pushed.used(peer):
            return pb.UploadResult(reason=self._refuse("over the upload quota"))
        if self._uploading >= self.limits.upload_slots:
            return pb.UploadResult(reason=self._refuse("busy"))
        loop = asyncio.get_running_loop()
        authors = await loop.run_in_executor(None, self._announcers, first)
        if not authors:
            return pb.UploadResult(reason=self._refuse("not announced"))
        self._uploading += 1
        self._pushed.charge(peer, first.size)  # up front: parallel pushes share the quota
        incoming = None
        try:
            incoming = await loop.run_in_executor(None, self.store.receive, first.size)
            await go_ahead()
            async for message in requests:
                await loop.run_in_executor(None, incoming.write, message.data)
                if incoming.received >= first.size:  # the declared size ends it, not EOF:
                    break  # a half-closed stream can take the answer down with it

            def signed_by_an_announcer(path: Path) -> None:
                _check_pushed_delta(path, first.base_id, authors)

            await loop.run_in_executor(
                None, lambda: incoming.finish(first.blob_id, check=signed_by_an_announcer)
            )
        except QuotaError:
            self._pushed.charge(peer, -first.size)
            return pb.UploadResult(reason=self._refuse("store full"))
        except NotADelta:
            return pb.UploadResult(reason=self._refuse("not a signed delta"))
        except BlobError:
            return pb.UploadResult(reason=self._refuse("bytes do not match"))
        finally:
            self._uploading -= 1
            if incoming is not None:
                incoming.discard()
        self.stats.bytes_in += first.size
        await loop.run_in_executor(None, announce, self.swarm, first.blob_id, True)
        logger.info("accepted a pushed blob %s (%d bytes)", first.blob_id[:16], first.size)
        return pb.UploadResult(accepted=True)

    def _announcers(self, first: pb.Upload) -> set[str]:
        """Authors of valid announcements under ``first.base_id`` naming this delta and size."""
        return {
            r.author
            for r in self.swarm.read(ANNOUNCE, topic=first.base_id)
            if r.body.delta_id == first.blob_id
            and r.body.size == first.size
            and r.body.base_id == first.base_id
        }


class NotADelta(BlobError):
    """A pushed blob is not a delta signed by one of its announcers."""


def _check_pushed_delta(path: Path, base_id: str, authors: set[str]) -> None:
    try:
        with DeltaReader(path, expected_base_id=base_id) as reader:
            author = reader.header.author
    except MergeswarmError as exc:
        raise NotADelta(str(exc)) from None
    if author not in authors:
        raise NotADelta(f"signed by {author[:16]}, who did not announce it")


def _send_run(
    stream: DetachedStream,
    path: Path,
    headers: list[pb.Piece],
    refusal: pb.Piece | None,
    sent: Callable[[pb.Piece], None],
    more: Callable[[int], bool],
) -> bool:
    """Each piece's header, then its bytes straight from the file, ``sent(header)`` after
    each, while ``more(n)`` before the n-th says so (on a worker thread); whether the run
    went out whole. Every manifest cuts pieces at multiples of PIECE_SIZE."""
    if headers:
        fd = os.open(path, os.O_RDONLY)
        try:
            for n, piece in enumerate(headers):
                if not more(n):
                    refusal = pb.Piece(index=piece.index, error=CAPPED)  # not a refusal
                    break
                stream.write_frame(piece)
                stream.sendfile(fd, piece.index * PIECE_SIZE, piece.size)
                sent(piece)
        finally:
            os.close(fd)
    if refusal is not None:
        stream.write_frame(refusal)
    return refusal is None
