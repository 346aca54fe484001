"""Fetching a blob from whoever provides it: many sources at once, each piece verified as it
lands, resumable."""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, wait
from dataclasses import dataclass, field

from hivemind.p2p import PeerID

from node.net.blobs.providers import announce, read_providers, withdraw
from node.net.blobs.wire import (
    BUSY,
    CAPPED,
    HAVE,
    PIECES,
    SMALL_FRAME,
    TransferStats,
)
from node.net.blobstore import (
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
    thread_pool,
    write_frame,
)
from node.net.pieces import (
    idle_wait,
    making_way,
    may_ask_ahead,
    pick_run,
    retry_after,
    spare_complete,
    wanted,
)
from node.net.swarm import Cancelled, Swarm
from protocol import transfer_pb2 as pb
from protocol.ids import is_id
from protocol.records import Provider

logger = logging.getLogger(__name__)

HAVE_REUSE_SECONDS = 0.05  # a source's answer to Have is used this long without asking again
PROVIDER_LOOK_SECONDS = 0.5  # between looks for new providers while downloading
RECORDS_REREAD_SECONDS = 5.0  # provider records are read again after this long, not sooner
LOOP_TICK_SECONDS = 0.05  # between the download loop's looks at its workers and saves
MAX_FAILURES = 5  # a source failing this often is dropped for the rest of the fetch
SAVE_EVERY = 32  # pieces between resume points (and fsyncs: the last one is short)
PIECES_IN_FLIGHT = 2  # pieces of one stream being checked and written while the next is read
PROBE_PARALLEL = 64  # providers asked for the manifest at once (records are free to forge)
HAVE_TIMEOUT = 15.0  # seconds a provider has to answer Have
WAVE_SECONDS = 2.0  # a batch of manifest probes has this long before the next one starts
# Sources a fetch draws pieces from at once. The origin is asked for what none of them holds:
# with 8, among 1,000 peers it sent 3.1 copies; with 16, 2.4 (scripts/simulate_swarm.py).
MAX_SOURCES = 16
ROTATE_SECONDS = 5.0  # between looks for idle sources to swap for untried providers


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
    useful_at: float = field(default_factory=time.monotonic)  # its last piece, or taken on


class Fetcher:
    """One download of one blob into ``store`` from whoever provides it."""

    def __init__(
        self,
        swarm: Swarm,
        store: BlobStore,
        blob_id: str,
        *,
        max_sources: int = MAX_SOURCES,
        serve_while_fetching: bool = True,
        expected_size: int | None = None,
        manifest_timeout: float | None = None,
        stats: TransferStats | None = None,
    ) -> None:
        self.swarm = swarm
        self.manifest_timeout = manifest_timeout  # seconds to find a provider; None: the whole
        self.store = store
        self.blob_id = blob_id
        self.max_sources = max_sources
        self.serve = serve_while_fetching and not swarm.options.client_mode
        self.stats = stats or TransferStats()
        self.expected_size = expected_size  # from a signed record, when the caller knows it
        self.sources: dict[PeerID, _Source] = {}
        self.banned: set[PeerID] = set()
        self.answered: set[PeerID] = set()  # providers that answered Have with this blob
        self._probes: set[asyncio.Task] = set()  # manifest probes still under way
        self._records: list[Provider] = []  # provider records as last read, and when
        self._records_at = -RECORDS_REREAD_SECONDS
        self._first_key: int | None = None  # records under the blob's first key, as last read
        self._rotated_at = time.monotonic()
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
        looking = min(timeout, self.manifest_timeout or timeout)
        try:
            await self._fetch(loop.time() + looking, deadline)
        finally:
            for probe in self._probes:
                probe.cancel()
            await asyncio.gather(*self._probes, return_exceptions=True)

    async def _fetch(self, looking_until: float, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        manifest = await self._find_manifest(looking_until)
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
            await loop.run_in_executor(None, self._announce, True)

    def _announce(self, complete: bool) -> None:
        announce(self.swarm, self.blob_id, complete, first_key=self._first_key)

    def _pause(self) -> None:
        """A failed or cancelled fetch: keep the pieces for a resume, stop offering them."""
        self.partial.save_progress()
        self.store.release_partial(self.partial)
        if self.serve:
            withdraw(self.swarm, self.blob_id)

    def _ban(self, source: _Source, why: str) -> None:
        self.banned.add(source.peer)
        self.sources.pop(source.peer, None)
        self.errors.append(f"{source.peer}: {why}")
        logger.info("fetch %s: dropped %s: %s", self.blob_id[:16], source.peer, why)

    async def _candidates(self) -> list[list[PeerID]]:
        """Providers not banned, in waves to try one after the other: those that answered
        already or that this peer is connected to, then the rest, each wave shuffled.

        Provider records cost a free key each, and a peer that does not exist is only found
        out by a failed dial; peers that answered, or that the swarm already put in touch
        with this one, are asked first and on their own, so a flood of made-up records
        neither crowds them out nor slows their answers down.
        """
        loop = asyncio.get_running_loop()
        # Reading and checking a flood of records takes a while and holds the GIL that the
        # pieces' threads need: read them again every few seconds, or when none was left.
        stale = loop.time() - self._records_at >= RECORDS_REREAD_SECONDS
        if stale or not self._unbanned(self._records):
            self._records, self._first_key = await loop.run_in_executor(
                None, read_providers, self.swarm, self.blob_id
            )
            self._records_at = loop.time()
        found = self._records
        try:
            connected = {info.peer_id for info in await self.swarm.p2p.list_peers()}
        except Exception:  # noqa: BLE001 - p2pd errors have no common base; order without it
            connected = set()
        known: set[PeerID] = set()
        others: set[PeerID] = set()
        for p in found:
            try:
                peer = PeerID.from_base58(p.peer_id)
            except Exception:  # noqa: BLE001 - a malformed peer id is just skipped
                continue
            if peer not in self.banned:
                (known if peer in self.answered or peer in connected else others).add(peer)
        waves = [list(known), list(others - known)]
        for wave in waves:
            random.shuffle(wave)
        return waves

    def _unbanned(self, records: list[Provider]) -> bool:
        """Whether some record names a provider that this fetch has not dropped."""
        banned = {peer.to_base58() for peer in self.banned}
        return any(p.peer_id not in banned for p in records)

    async def _refresh_sources(self) -> None:
        """Add providers (see :meth:`_candidates` for the order) up to ``max_sources``; when
        full, every ROTATE_SECONDS, swap the sources that give way (``gives_way``) for
        providers not among them."""
        now = time.monotonic()
        full = len(self.sources) >= self.max_sources
        if full and now - self._rotated_at < ROTATE_SECONDS:  # no look at the records
            return
        fresh = [p for wave in await self._candidates() for p in wave if p not in self.sources]
        if full:
            self._rotated_at = now
            for source in making_way(self.sources.values(), len(fresh), now):
                del self.sources[source.peer]  # its worker stops at its next look
        for peer in fresh[: self.max_sources - len(self.sources)]:
            self.sources[peer] = _Source(peer)

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
                timeout=HAVE_TIMEOUT,
            )
        except Exception as exc:  # noqa: BLE001 - an unreachable provider is one of many
            why = f"{source.peer}: {type(exc).__name__} {exc}"
            if source.peer in self.answered:  # it was there: maybe busy, try it again later
                self._fail(source, why, backoff=5)
            else:  # never reached: a record naming nobody costs one dial, not five
                self._ban(source, why)
            return None
        if response.error:
            self._fail(source, f"{source.peer}: {response.error}", backoff=2)
            return None
        self.answered.add(source.peer)
        source.have = response.have
        source.asked_at = time.monotonic()
        source.served = response.served
        source.complete = response.complete
        return response

    async def _probe(self, source: _Source) -> pb.Manifest | None:
        """Ask one provider for the manifest; a valid one makes it a source (room permitting)."""
        response = await self._ask_have(source, with_manifest=True)
        if response is None or not response.HasField("manifest"):
            return None
        try:
            check_manifest(response.manifest, self.blob_id, self.expected_size)
        except BlobError as exc:
            self._ban(source, str(exc))
            return None
        if len(self.sources) < self.max_sources:
            self.sources.setdefault(source.peer, source)
        return response.manifest

    async def _find_manifest(self, deadline: float) -> pb.Manifest:
        """The blob's manifest from the first provider whose list of piece hashes adds up to
        the id (a provider offering another is dropped).

        Providers are asked side by side, PROBE_PARALLEL at a time, wave after wave
        (:meth:`_candidates`); the next batch starts when this one has answered or after
        WAVE_SECONDS, with its stragglers still heard. The first valid answer wins; the
        probes still under way go on, and the providers that answer join the sources.
        """
        loop = asyncio.get_running_loop()
        while loop.time() < deadline:
            batches = [
                wave[start : start + PROBE_PARALLEL]
                for wave in await self._candidates()
                for start in range(0, len(wave), PROBE_PARALLEL)
            ]
            waiting: set[asyncio.Task] = set()
            for peers in [*batches, []]:  # the last round only waits for the stragglers
                for peer in peers:
                    source = self.sources.get(peer) or _Source(peer)
                    if source.bad_until <= time.monotonic():
                        waiting.add(asyncio.create_task(self._probe(source)))
                self._probes.update(waiting)
                until = deadline if not peers else min(deadline, loop.time() + WAVE_SECONDS)
                while waiting and loop.time() < until:
                    done, waiting = await asyncio.wait(
                        waiting, timeout=until - loop.time(), return_when=asyncio.FIRST_COMPLETED
                    )
                    for task in done:
                        if not task.cancelled() and task.exception() is None and task.result():
                            return task.result()
                if loop.time() >= deadline:
                    break
            await asyncio.sleep(0.5)
        raise FetchError(self._why("no provider answered with a manifest"))

    async def _download(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        workers: dict[PeerID, asyncio.Task] = {}
        last_refresh = 0.0
        saved_at = 0
        announced = False
        # Know every source's load and holdings before choosing whom to ask for what (the
        # probes that are still under way add their providers as they answer).
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
                if loop.time() - last_refresh > PROVIDER_LOOK_SECONDS:
                    await self._refresh_sources()
                    last_refresh = loop.time()
                for peer, source in self.sources.items():
                    task = workers.get(peer)
                    if (task is None or task.done()) and source.bad_until <= time.monotonic():
                        workers[peer] = asyncio.create_task(self._work(source))
                if self.serve and self.partial.done and not announced:
                    announced = True
                    await loop.run_in_executor(None, self._announce, False)
                if self.partial.done - saved_at >= SAVE_EVERY:
                    await loop.run_in_executor(None, self.partial.save_progress)
                    saved_at = self.partial.done
                # Woken by a worker that stops (its source gets a new one, or the blob is
                # complete), not by every piece: the pieces' threads need the CPU more.
                running = [t for t in workers.values() if not t.done()]
                if running:
                    await asyncio.wait(
                        running, timeout=LOOP_TICK_SECONDS, return_when=asyncio.FIRST_COMPLETED
                    )
                else:
                    await asyncio.sleep(LOOP_TICK_SECONDS)
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
            wanted=wanted(self.partial.have, self.in_flight),
            waiting=spare_complete(bool(self.in_flight), len(self._records), self.max_sources),
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
        idle = 0  # answers in a row that offered nothing wanted
        try:
            while (
                not self.partial.complete
                and source.bad_until <= time.monotonic()
                and self.sources.get(source.peer) is source  # not swapped for another
            ):
                run = ahead or await self._choose(source)
                ahead = []
                if run is None:
                    return
                if not run:
                    idle += 1
                    await asyncio.sleep(idle_wait(idle))
                    continue
                idle = 0
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
        fresh = (
            time.monotonic() - source.asked_at < HAVE_REUSE_SECONDS
        )  # just asked: spare a round trip
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
            source.useful_at = time.monotonic()
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
            busy = problem.error in BUSY
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
            for _ in range(PIECES_IN_FLIGHT + 1)
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
                piece = stream.read_frame(pb.Piece, SMALL_FRAME)
                if (
                    piece.error
                    or piece.index != index
                    or piece.size != piece_range(manifest, index)[1]
                ):
                    bad = settle(0)  # the pieces before it count, unless one of them is bad
                    return piece if bad is None else bad
                view = buffers[n % len(buffers)][
                    : piece.size
                ]  # free: at most PIECES_IN_FLIGHT pending
                stream.read_into(view)
                write = thread_pool("pieces", 8).submit(self.partial.write_piece, index, view)
                writes.append((index, piece.size, write))
                if (bad := settle(PIECES_IN_FLIGHT)) is not None:
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
            if source.failures >= MAX_FAILURES:  # make room for other providers
                self._ban(source, f"{source.failures} failures")
                return
        source.bad_until = time.monotonic() + retry_after(backoff, source.failures, count)

    def _why(self, what: str) -> str:
        tail = "; ".join(self.errors[-3:])
        return f"blob {self.blob_id[:16]}: {what}" + (f" (last errors: {tail})" if tail else "")


def fetch(
    swarm: Swarm,
    store: BlobStore,
    blob_id: str,
    *,
    timeout: float = 600.0,
    cancel: threading.Event | None = None,
    **kwargs,
) -> Fetcher:
    """Download ``blob_id`` into ``store`` (blocking); raises FetchError when it cannot, or
    as soon as ``cancel`` is set (what it got so far is kept for a resume)."""
    if not is_id(blob_id):
        raise FetchError(f"{blob_id[:80]!r} is not a blob id")
    fetcher = Fetcher(swarm, store, blob_id, **kwargs)
    try:
        swarm.run(fetcher.run(timeout), timeout=timeout + 30, cancel=cancel)
    except Cancelled:
        raise FetchError(f"blob {blob_id[:16]}: given up, the peer is stopping") from None
    return fetcher
