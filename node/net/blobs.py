"""Blob exchange over libp2p streams: serve pieces, fetch from many providers, push uploads.

A blob travels in pieces listed by a manifest (a BLAKE3 digest per piece), which is
checked against the blob id before a byte is fetched. A fetcher asks every
provider what it holds (``Have``), downloads runs of pieces from several
providers at once (one stream per provider, the next run asked for while the
current one arrives) and verifies each piece as it lands. A provider whose
piece does not match is skipped for a while and its pieces are fetched
elsewhere; a broken stream only costs the pieces in flight. A peer serves
the pieces it already has while it is still downloading (it announces itself
as a partial provider), so a new base spreads like a torrent rather than
every peer pulling from the origin.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from pathlib import Path

from hivemind.p2p import P2PContext, PeerID

from node.net.blobstore import (
    PIECE_SIZE,
    BlobError,
    BlobStore,
    Partial,
    QuotaError,
    check_manifest,
    piece_buffer,
    piece_range,
)
from node.net.framing import (
    IO_TIMEOUT,
    DetachedStream,
    FrameError,
    read_frame,
    read_frames,
    thread_pool,
    write_frame,
)
from node.net.pieces import (
    keep_sending,
    may_ask_ahead,
    pick_run,
    superseed_offer,
)
from node.net.swarm import Swarm
from protocol import transfer_pb2 as pb
from protocol.ids import is_id
from protocol.records import ANNOUNCE, PROVIDER, Provider

logger = logging.getLogger(__name__)

HAVE = "mergeswarm.Have"
PIECES = "mergeswarm.Pieces"
UPLOAD = "mergeswarm.Upload"
PROVIDER_TTL = 300.0
CAPPED = "run capped"  # a complete provider cut a long run short: sharers fetch the blob too
_FRESH = 0.05  # seconds a source's answer to Have is used without asking again
_REFRESH = 0.5  # seconds between looks for new providers while downloading
_TICK = 0.05  # seconds between the download loop's looks at its workers and saves
_SMALL = 4096  # cap of a request or result frame
_TRACKED_BLOBS = 64  # blobs whose per-piece send counts a provider keeps
_MAX_FAILURES = 5  # a source failing this often is dropped for the rest of the fetch
_SAVE_EVERY = 32  # pieces between resume points (and fsyncs: the last one is short)
_IN_FLIGHT = 2  # pieces of one stream being checked and written while the next one is read
_UPLOAD_CHUNK = 1 << 20
SEND = "send"  # an upload's go-ahead, after its header was accepted
_UPLOAD_FRAME = _UPLOAD_CHUNK + 4096


@dataclass
class ServeLimits:
    """What a peer gives others.

    :param slots: concurrent piece streams served in all (others get "busy" and go elsewhere).
    :param per_peer: concurrent requests from one peer.
    :param peer_bytes_per_minute: bytes served to one peer per minute (0: no limit).
    :param upload_bytes_per_peer: bytes one peer may push into this store (0: refuse pushes).
    :param upload_slots: pushes received at once.
    """

    slots: int = 4
    per_peer: int = 2
    peer_bytes_per_minute: int = 0
    upload_bytes_per_peer: int = 4 << 30
    upload_slots: int = 2


@dataclass
class TransferStats:
    bytes_out: int = 0
    bytes_in: int = 0
    refused: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    bad_pieces: int = 0


class BlobService:
    """Serves this peer's blobs (complete and partial) and accepts pushed uploads."""

    def __init__(self, swarm: Swarm, store: BlobStore, limits: ServeLimits | None = None) -> None:
        self.swarm = swarm
        self.store = store
        self.limits = limits or ServeLimits()
        self.stats = TransferStats()
        self._active = 0
        self._per_peer: dict[PeerID, int] = defaultdict(int)
        self._window: dict[PeerID, tuple[float, int]] = {}
        self._uploaded: dict[PeerID, int] = defaultdict(int)
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
        one is still arriving, so the stream never runs dry between runs)."""
        stream = None
        try:
            request = await read_frame(reader, pb.PieceRequest, _SMALL)
            if request is not None:
                stream = DetachedStream(reader, writer)  # pieces go out by sendfile
            while request is not None and await self._serve_run(request, info.peer_id, stream):
                request = await stream.call(stream.read_frame, pb.PieceRequest, _SMALL, True)
        except (FrameError, OSError) as exc:
            self._refuse("broken request")
            logger.debug("pieces for %s: %s", info.peer_id, exc)
        finally:
            if stream is not None:
                await stream.aclose()
            writer.close()

    async def _upload_stream(self, info, reader, writer) -> None:
        try:
            messages = read_frames(reader, pb.Upload, _UPLOAD_FRAME)

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
        while len(self._sent_counts) > _TRACKED_BLOBS:
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
            self._charge(peer, size)
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
        if not limit:
            return True
        start, used = self._window.get(peer, (time.monotonic(), 0))
        if time.monotonic() - start >= 60:
            self._window[peer] = (time.monotonic(), 0)
            return True
        return used + nbytes <= limit

    def _charge(self, peer: PeerID, nbytes: int) -> None:
        start, used = self._window.get(peer, (time.monotonic(), 0))
        self._window[peer] = (start, used + nbytes)

    async def _upload(
        self,
        requests: AsyncIterator[pb.Upload],
        peer: PeerID,
        go_ahead: Callable[[], Awaitable[None]],
    ) -> pb.UploadResult:
        """Accept a delta pushed by a peer that others cannot dial, if the swarm announced it.

        The first message names the blob (no data); ``go_ahead`` tells the uploader to send
        the bytes once the push is accepted, so a refusal costs no transfer.
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
        if first.size > self.limits.upload_bytes_per_peer - self._uploaded[peer]:
            return pb.UploadResult(reason=self._refuse("over the upload quota"))
        if self._uploading >= self.limits.upload_slots:
            return pb.UploadResult(reason=self._refuse("busy"))
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, self._announced, first):
            return pb.UploadResult(reason=self._refuse("not announced"))
        self._uploading += 1
        self._uploaded[peer] += first.size  # charged up front: parallel pushes share the quota
        incoming = None
        try:
            incoming = await loop.run_in_executor(None, self.store.receive, first.size)
            await go_ahead()
            async for message in requests:
                await loop.run_in_executor(None, incoming.write, message.data)
            await loop.run_in_executor(None, incoming.finish, first.blob_id)
        except QuotaError:
            self._uploaded[peer] -= first.size
            return pb.UploadResult(reason=self._refuse("store full"))
        except BlobError:
            self._uploaded[peer] -= first.size
            return pb.UploadResult(reason=self._refuse("bytes do not match"))
        finally:
            self._uploading -= 1
            if incoming is not None:
                incoming.discard()
        self.stats.bytes_in += first.size
        await loop.run_in_executor(None, announce, self.swarm, first.blob_id, True)
        logger.info("accepted a pushed blob %s (%d bytes)", first.blob_id[:16], first.size)
        return pb.UploadResult(accepted=True)

    def _announced(self, first: pb.Upload) -> bool:
        """Whether a valid announcement under ``first.base_id`` names this delta and size."""
        return any(
            r.body.delta_id == first.blob_id and r.body.size == first.size
            for r in self.swarm.read(ANNOUNCE, topic=first.base_id)
        )


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


def announce(swarm: Swarm, blob_id: str, complete: bool = True) -> bool:
    """Publish that this peer provides ``blob_id`` (refreshed until withdrawn)."""
    body = Provider(
        blob_id=blob_id,
        peer_id=swarm.peer_id.to_base58(),
        maddrs=tuple(swarm.maddrs[:8]),
        complete=complete,
    )
    return swarm.publish(PROVIDER, body, topic=blob_id, ttl=PROVIDER_TTL)


def providers(swarm: Swarm, blob_id: str) -> list[Provider]:
    """Peers that announced ``blob_id`` (complete ones first), this peer excluded."""
    me = swarm.peer_id.to_base58()
    found = [r.body for r in swarm.read(PROVIDER, topic=blob_id)]
    found = [p for p in found if isinstance(p, Provider) and p.peer_id != me]
    return sorted(found, key=lambda p: not p.complete)


async def _close(writer: asyncio.StreamWriter | None, stream: DetachedStream | None) -> None:
    if stream is not None:  # its threads let go (their writes landed) before a re-ask
        await stream.aclose()
    if writer is not None:
        writer.close()


class FetchError(BlobError):
    """A blob could not be fetched; the message says from whom and why."""


@dataclass
class _Source:
    peer: PeerID
    have: bytes = b""
    bad_until: float = 0.0
    failures: int = 0
    received: int = 0  # verified bytes from this source
    served: int | None = None  # what it says it has served to everyone (None: not asked yet)
    complete: bool = False  # it holds the whole blob (its ``have`` is what it offers)
    asked_at: float = 0.0  # when its ``have`` was last asked for


class Fetcher:
    """One download of one blob into ``store`` from whoever provides it."""

    def __init__(
        self,
        swarm: Swarm,
        store: BlobStore,
        blob_id: str,
        *,
        max_sources: int = 8,
        serve_while_fetching: bool = True,
        expected_size: int | None = None,
        stats: TransferStats | None = None,
    ) -> None:
        self.swarm = swarm
        self.store = store
        self.blob_id = blob_id
        self.max_sources = max_sources
        self.serve = serve_while_fetching and not swarm.options.client_mode
        self.stats = stats or TransferStats()
        self.expected_size = expected_size  # from a signed record, when the caller knows it
        self.sources: dict[PeerID, _Source] = {}
        self.banned: set[PeerID] = set()
        self.in_flight: set[int] = set()
        self.partial: Partial | None = None
        self.errors: list[str] = []
        self._last_piece = time.monotonic()
        self._buffers: list[memoryview] = []  # piece buffers free for the next run

    async def run(self, timeout: float) -> None:
        if self.store.has(self.blob_id):
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        manifest = await self._find_manifest(deadline)
        try:
            self.partial = await loop.run_in_executor(None, self.store.start_partial, manifest)
        except (QuotaError, OSError) as exc:
            raise FetchError(self._why(f"no room for {manifest.size:,} bytes ({exc})")) from None
        try:
            await self._download(deadline)
            await loop.run_in_executor(None, self.store.finish_partial, self.partial)
        except BaseException:
            await loop.run_in_executor(None, self._pause)
            raise
        logger.info(
            "fetched %s: %s",
            self.blob_id[:16],
            ", ".join(f"{str(s.peer)[-6:]} {s.received >> 20} MiB" for s in self.sources.values()),
        )
        if self.serve:
            await loop.run_in_executor(None, announce, self.swarm, self.blob_id, True)

    def _pause(self) -> None:
        """A failed or cancelled fetch: keep the pieces for a resume, stop offering them."""
        self.partial.save_progress()
        self.store.release_partial(self.partial)
        if self.serve:
            self.swarm.withdraw(PROVIDER, topic=self.blob_id)

    def _ban(self, source: _Source, why: str) -> None:
        self.banned.add(source.peer)
        self.sources.pop(source.peer, None)
        self.errors.append(f"{source.peer}: {why}")
        logger.info("fetch %s: dropped %s: %s", self.blob_id[:16], source.peer, why)

    async def _refresh_sources(self) -> None:
        """Add providers (in random order) up to ``max_sources``, never banned ones."""
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(None, providers, self.swarm, self.blob_id)
        random.shuffle(found)
        for p in found:
            if len(self.sources) >= self.max_sources:
                break
            try:
                peer = PeerID.from_base58(p.peer_id)
            except Exception:  # noqa: BLE001 - a malformed peer id is just skipped
                continue
            if peer not in self.banned:
                self.sources.setdefault(peer, _Source(peer))

    async def _ask_have(self, source: _Source, with_manifest: bool) -> pb.HaveResponse | None:
        mine = bytes(self.partial.have) if self.partial is not None else b""
        request = pb.HaveRequest(
            swarm_id=self.swarm.swarm_id,
            blob_id=self.blob_id,
            with_manifest=with_manifest,
            mine=mine,
        )
        try:
            response = await asyncio.wait_for(
                self.swarm.p2p.call_protobuf_handler(source.peer, HAVE, request, pb.HaveResponse),
                timeout=15,
            )
        except Exception as exc:  # noqa: BLE001 - an unreachable provider is one of many
            self._fail(source, f"{source.peer}: {type(exc).__name__} {exc}", backoff=5)
            return None
        if response.error:
            self._fail(source, f"{source.peer}: {response.error}", backoff=2)
            return None
        source.have = response.have
        source.asked_at = time.monotonic()
        source.served = response.served
        source.complete = response.complete
        return response

    async def _find_manifest(self, deadline: float) -> pb.Manifest:
        """The blob's manifest from the first provider whose list of piece hashes adds up to
        the id (a provider offering another is dropped)."""
        loop = asyncio.get_running_loop()
        while loop.time() < deadline:
            await self._refresh_sources()
            for source in list(self.sources.values()):
                if source.bad_until > time.monotonic():
                    continue
                response = await self._ask_have(source, with_manifest=True)
                if response is None or not response.HasField("manifest"):
                    continue
                try:
                    check_manifest(response.manifest, self.blob_id, self.expected_size)
                except BlobError as exc:
                    self._ban(source, str(exc))
                    continue
                return response.manifest
            await asyncio.sleep(0.5)
        raise FetchError(self._why("no provider answered with a manifest"))

    async def _download(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        workers: dict[PeerID, asyncio.Task] = {}
        last_refresh = 0.0
        saved_at = 0
        announced = False
        # Know every source's load and holdings before choosing whom to ask for what.
        unasked = [s for s in self.sources.values() if s.served is None]
        await asyncio.gather(*(self._ask_have(s, False) for s in unasked))
        try:
            while not self.partial.complete:
                if loop.time() > deadline:
                    raise FetchError(
                        self._why(
                            f"timed out with {self.partial.done} of {self.partial.count} pieces"
                        )
                    )
                if loop.time() - last_refresh > _REFRESH:
                    await self._refresh_sources()
                    last_refresh = loop.time()
                for peer, source in self.sources.items():
                    task = workers.get(peer)
                    if (task is None or task.done()) and source.bad_until <= time.monotonic():
                        workers[peer] = asyncio.create_task(self._work(source))
                if self.serve and self.partial.done and not announced:
                    announced = True
                    await loop.run_in_executor(None, announce, self.swarm, self.blob_id, False)
                if self.partial.done - saved_at >= _SAVE_EVERY:
                    await loop.run_in_executor(None, self.partial.save_progress)
                    saved_at = self.partial.done
                # Woken by a worker that stops (its source gets a new one, or the blob is
                # complete), not by every piece: the pieces' threads need the CPU more.
                running = [t for t in workers.values() if not t.done()]
                if running:
                    await asyncio.wait(running, timeout=_TICK, return_when=asyncio.FIRST_COMPLETED)
                else:
                    await asyncio.sleep(_TICK)
        finally:
            for task in workers.values():
                task.cancel()
            await asyncio.gather(*workers.values(), return_exceptions=True)

    def _pick_run(self, source: _Source) -> list[int]:
        return pick_run(
            source,
            list(self.sources.values()),
            count=self.partial.count,
            blob_size=self.partial.manifest.size,
            wanted=lambda i: not self.partial.has(i) and i not in self.in_flight,
            now=time.monotonic(),
            last_piece=self._last_piece,
        )

    async def _work(self, source: _Source) -> None:
        """Fetch runs from one source until it has nothing we need, fails or lies.

        Runs follow each other on one stream, each asked for while half of the one before
        is still to come, so the provider goes straight on to it: a fresh stream, or a
        request sent after the last piece, leaves the stream dry while it ramps up again.
        """
        writer = stream = None
        ahead: list[int] = []  # the next run, already asked for on ``stream``
        try:
            while not self.partial.complete and source.bad_until <= time.monotonic():
                run = ahead or await self._choose(source)
                ahead = []
                if run is None:
                    return
                if not run:
                    await asyncio.sleep(0.2)
                    continue
                whole = False
                try:
                    if stream is None:
                        writer, stream = await self._open(source, run)
                    whole = await self._fetch_run(source, stream, run, ahead)
                except (FrameError, ConnectionError, TimeoutError, OSError) as exc:
                    why = exc or type(exc).__name__
                    self._fail(source, f"{source.peer}: stream broke ({why})", backoff=2)
                except Exception as exc:  # noqa: BLE001 - p2pd errors have no common base; the pieces go elsewhere
                    self._fail(source, f"{source.peer}: {type(exc).__name__} {exc}", backoff=2)
                finally:
                    self.in_flight.difference_update(run)
                if not (whole and ahead):  # the provider stops, or waits for a request or the end
                    self.in_flight.difference_update(ahead)
                    ahead = []
                    await _close(writer, stream)
                    writer = stream = None
        finally:
            self.in_flight.difference_update(ahead)
            await _close(writer, stream)

    async def _choose(self, source: _Source) -> list[int] | None:
        """The next run to ask ``source`` for, marked in flight (None: it did not answer)."""
        fresh = time.monotonic() - source.asked_at < _FRESH  # just asked: spare a round trip
        if not fresh and await self._ask_have(source, with_manifest=False) is None:
            return None
        run = self._pick_run(source)
        self.in_flight.update(run)
        return run

    def _request(self, run: list[int]) -> pb.PieceRequest:
        return pb.PieceRequest(
            swarm_id=self.swarm.swarm_id,
            blob_id=self.blob_id,
            first=run[0],
            count=len(run),
            shares=self.serve,
        )

    async def _open(
        self, source: _Source, run: list[int]
    ) -> tuple[asyncio.StreamWriter, DetachedStream]:
        """A stream to ``source`` that asks for ``run``."""
        _, reader, writer = await asyncio.wait_for(
            self.swarm.p2p.call_binary_stream_handler(source.peer, PIECES), IO_TIMEOUT
        )
        try:
            await write_frame(writer, self._request(run))
        except BaseException:
            writer.close()
            raise
        return writer, DetachedStream(reader, writer)

    async def _fetch_run(
        self, source: _Source, stream: DetachedStream, run: list[int], ahead: list[int]
    ) -> bool:
        """Receive a run (asked for already) with ``_receive_run``; whether it landed whole.

        Once half of it has landed, the next run is chosen, asked for on the same stream
        and put in ``ahead``.
        """
        loop = asyncio.get_running_loop()
        halfway = asyncio.Event()
        count = 0

        def landed(size: int) -> None:  # on the event loop, as each piece is written
            nonlocal count
            self.stats.bytes_in += size
            source.received += size
            self._last_piece = time.monotonic()
            count += 1
            if 2 * count >= len(run):
                halfway.set()

        receiving = asyncio.ensure_future(
            stream.call(
                self._receive_run, stream, run, lambda n: loop.call_soon_threadsafe(landed, n)
            )
        )
        half = asyncio.ensure_future(halfway.wait())
        try:
            await asyncio.wait([receiving, half], return_when=asyncio.FIRST_COMPLETED)
            if (
                not receiving.done()
                and may_ask_ahead(source, list(self.sources.values()))
                and (following := await self._choose(source))
            ):
                ahead.extend(following)
                await stream.call(stream.write_frame, self._request(following))
            problem = await receiving
        except BaseException:
            await stream.aclose()  # stops the run's thread
            await asyncio.gather(receiving, return_exceptions=True)
            raise
        finally:
            half.cancel()
        if isinstance(problem, int):
            self.stats.bad_pieces += 1
            self._fail(
                source, f"{source.peer}: piece {problem} does not match its hash", backoff=120
            )
        elif problem is not None and problem.error == CAPPED:
            # Whole so far; others have or fetch the blob too: the rest from whoever has it.
            await self._refresh_sources()
        elif problem is not None and problem.error:
            busy = problem.error in ("busy", "too many requests")
            self._fail(
                source,
                f"{source.peer}: {problem.error}",
                backoff=0.5 if busy else 5,
                count=not busy,
            )
        elif problem is not None:
            self._fail(
                source,
                f"{source.peer}: sent piece {problem.index} of {problem.size} bytes for another",
                backoff=60,
            )
        return problem is None

    def _receive_run(
        self, stream: DetachedStream, run: list[int], landed: Callable[[int], None]
    ) -> pb.Piece | int | None:
        """Read a run's pieces, each straight into one of a few buffers, while other threads
        check and write the ones before it, so the stream keeps flowing (on a worker thread).

        Returns None when the whole run landed, else what stopped it: the header of a refusal
        or of a piece other than the one asked for, or the index of a piece that does not
        match its hash. ``landed(size)`` is called as each piece is written.
        """
        manifest = self.partial.manifest
        # Reused from run to run: a fresh buffer's first touch costs a page fault per 4 KiB.
        buffers = [
            self._buffers.pop() if self._buffers else piece_buffer(manifest.piece_size)
            for _ in range(_IN_FLIGHT + 1)
        ]
        writes: deque[tuple[int, int, Future]] = deque()  # (index, size, check-and-write)

        def settle(keep: int) -> int | None:
            while len(writes) > keep:
                index, size, write = writes.popleft()
                if not write.result():
                    return index
                landed(size)
            return None

        try:
            for n, index in enumerate(run):
                piece = stream.read_frame(pb.Piece, _SMALL)
                if (
                    piece.error
                    or piece.index != index
                    or piece.size != piece_range(manifest, index)[1]
                ):
                    bad = settle(0)  # the pieces before it count, unless one of them is bad
                    return piece if bad is None else bad
                view = buffers[n % len(buffers)][: piece.size]  # free: at most _IN_FLIGHT pending
                stream.read_into(view)
                write = thread_pool("pieces", 8).submit(self.partial.write_piece, index, view)
                writes.append((index, piece.size, write))
                if (bad := settle(_IN_FLIGHT)) is not None:
                    return bad
            return settle(0)
        finally:
            wait([w for _, _, w in writes])  # writes land before the pieces can be asked again
            self._buffers.extend(buffers)

    def _fail(self, source: _Source, message: str, *, backoff: float, count: bool = True) -> None:
        if count:
            source.failures += 1
            self.errors.append(message)
            logger.info("fetch %s: %s", self.blob_id[:16], message)
            if source.failures >= _MAX_FAILURES:  # make room for other providers
                self._ban(source, f"{source.failures} failures")
                return
        source.bad_until = time.monotonic() + backoff * (
            2 ** min(source.failures, 5) if count else 1
        )

    def _why(self, what: str) -> str:
        tail = "; ".join(self.errors[-3:])
        return f"blob {self.blob_id[:16]}: {what}" + (f" (last errors: {tail})" if tail else "")


def fetch(
    swarm: Swarm, store: BlobStore, blob_id: str, *, timeout: float = 600.0, **kwargs
) -> Fetcher:
    """Download ``blob_id`` into ``store`` (blocking); raises FetchError when it cannot."""
    if not is_id(blob_id):
        raise FetchError(f"{blob_id[:80]!r} is not a blob id")
    fetcher = Fetcher(swarm, store, blob_id, **kwargs)
    swarm.run(fetcher.run(timeout), timeout=timeout + 30)
    return fetcher


async def _upload_data(path: Path) -> AsyncIterator[pb.Upload]:
    loop = asyncio.get_running_loop()
    with open(path, "rb") as f:
        while data := await loop.run_in_executor(None, f.read, _UPLOAD_CHUNK):
            yield pb.Upload(data=data)


def push(swarm: Swarm, store: BlobStore, blob_id: str, base: str, peer: PeerID) -> pb.UploadResult:
    """Send an announced delta (trained on ``base``) to a reachable peer, which verifies it and
    becomes its provider."""
    path = store.path(blob_id)

    async def call() -> pb.UploadResult:
        _, reader, writer = await swarm.p2p.call_binary_stream_handler(peer, UPLOAD)
        try:
            size = path.stat().st_size
            header = pb.Upload(swarm_id=swarm.swarm_id, blob_id=blob_id, size=size, base_id=base)
            await write_frame(writer, header)
            reply = await read_frame(reader, pb.UploadResult, _SMALL, timeout=60)
            if reply is None or reply.reason != SEND:
                return reply or pb.UploadResult(reason="the peer closed the stream")
            async for message in _upload_data(path):
                await write_frame(writer, message)
            writer.write_eof()
            result = await read_frame(reader, pb.UploadResult, _SMALL, timeout=120)
        finally:
            writer.close()
        if result is None:
            raise FrameError("the peer closed the stream without a result")
        return result

    return swarm.run(call(), timeout=900)
