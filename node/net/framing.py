"""Length-prefixed protobuf frames over a libp2p byte stream, with size caps and timeouts.

hivemind's own protobuf streams read whatever length the peer announces; here
every frame's length (4 bytes, little-endian) is checked against a cap before
a byte of it is read, and every read and write has a deadline, so a hostile
or stalled peer costs at most one frame's worth of memory and a timeout.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from protocol.errors import MergeswarmError

_LEN = struct.Struct("<I")
IO_TIMEOUT = 30.0
M = TypeVar("M", bound=Message)
T = TypeVar("T")


class FrameError(MergeswarmError):
    """A peer sent an oversized, truncated or undecodable frame, or stalled."""


class StreamEnded(FrameError):
    """The stream ended before all the bytes asked for came (``done`` of them did)."""

    def __init__(self, message: str, done: int) -> None:
        super().__init__(message)
        self.done = done


async def write_frame(
    writer: asyncio.StreamWriter, message: Message, timeout: float = IO_TIMEOUT
) -> None:
    data = message.SerializeToString()
    await write_raw(writer, _LEN.pack(len(data)) + data, timeout)


async def read_frame(
    reader: asyncio.StreamReader, kind: type[M], max_bytes: int, timeout: float = IO_TIMEOUT
) -> M | None:
    """The next frame, or None at a clean end of stream."""
    try:
        head = await asyncio.wait_for(reader.readexactly(_LEN.size), timeout)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise FrameError("the stream ended inside a frame header") from None
    except TimeoutError:
        raise FrameError(f"the peer sent nothing for {timeout:.0f} s") from None
    (length,) = _LEN.unpack(head)
    if length > max_bytes:
        raise FrameError(f"a frame of {length} bytes is over the {max_bytes}-byte cap")
    try:
        data = await asyncio.wait_for(reader.readexactly(length), timeout)
    except asyncio.IncompleteReadError:
        raise FrameError("the stream ended inside a frame") from None
    except TimeoutError:
        raise FrameError(f"the peer stalled for {timeout:.0f} s inside a frame") from None
    try:
        return kind.FromString(data)
    except DecodeError as exc:
        raise FrameError(f"undecodable {kind.__name__} frame ({exc})") from None


async def read_frames(
    reader: asyncio.StreamReader, kind: type[M], max_bytes: int, timeout: float = IO_TIMEOUT
) -> AsyncIterator[M]:
    while (message := await read_frame(reader, kind, max_bytes, timeout)) is not None:
        yield message


async def write_raw(writer: asyncio.StreamWriter, data: bytes, timeout: float = IO_TIMEOUT) -> None:
    """Bytes announced by the frame before them."""
    writer.write(data)
    try:
        await asyncio.wait_for(writer.drain(), timeout)
    except TimeoutError:
        raise FrameError(f"the peer did not read for {timeout:.0f} s") from None


async def read_raw(reader: asyncio.StreamReader, size: int, timeout: float = IO_TIMEOUT) -> bytes:
    """Exactly ``size`` bytes (the caller has checked ``size`` against its cap)."""
    try:
        return await asyncio.wait_for(reader.readexactly(size), timeout)
    except asyncio.IncompleteReadError:
        raise FrameError(f"the stream ended inside {size} raw bytes") from None
    except TimeoutError:
        raise FrameError(f"the peer stalled for {timeout:.0f} s inside raw bytes") from None


_pools: dict[str, tuple[int, ThreadPoolExecutor]] = {}
_pools_lock = threading.Lock()


def thread_pool(name: str, size: int) -> ThreadPoolExecutor:
    """A named pool of worker threads, made on first use in each process (a fork gets its own)."""
    with _pools_lock:
        pid, pool = _pools.get(name, (None, None))
        if pool is None or pid != os.getpid():
            pool = ThreadPoolExecutor(size, thread_name_prefix=f"mergeswarm-{name}")
            _pools[name] = (os.getpid(), pool)
        return pool


class DetachedStream:
    """A libp2p stream whose bulk bytes move in blocking calls on a worker thread.

    hivemind hands a stream over as an asyncio reader and writer on a unix
    socket to p2pd. Moving a 1 MiB piece through them costs three copies and
    dozens of event-loop wake-ups, and on a small machine that Python work
    competes for the cores with the two p2pd daemons doing the real work
    (measured: the blob protocol at 0.35 of a raw stream). Once the control
    frames are done, this takes the socket over: the transport stops reading,
    the socket turns blocking, and the methods below, called on a worker
    thread, read a whole piece into a caller's buffer in one ``recv``
    (``MSG_WAITALL``) or ``sendfile`` it from the store in one call. The GIL
    is released for the whole piece instead of being fought over after every
    few kilobytes.

    A call gives up after ``timeout`` seconds without progress; :meth:`aclose`
    stops the calls in flight within ``_SLICE`` seconds, and hands the socket
    back to the transport (non-blocking) only once they have returned. One call
    that reads and one that writes may run at once (a request for the next run
    goes out while the current one is still arriving).
    """

    _SLICE = 0.2  # the socket's send and receive timeouts: how often a blocked call looks up

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        timeout: float = IO_TIMEOUT,
    ) -> None:
        transport = writer.transport
        transport.pause_reading()
        # Bytes the reader already took off the socket (CPython keeps them in ``_buffer``)
        # come first; none are expected, since the peer waits for a request first.
        buffered = getattr(reader, "_buffer", None)
        self._pending = bytearray(buffered or b"")
        if buffered:
            buffered.clear()
        # A second descriptor of the same socket, so the transport's own stays untouched.
        self._sock = socket.socket(fileno=os.dup(transport.get_extra_info("socket").fileno()))
        self._sock.setblocking(
            True
        )  # flags are shared: the transport's descriptor too, until aclose
        slice_ = struct.pack("ll", int(self._SLICE), int(self._SLICE % 1 * 1e6))
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, slice_)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, slice_)
        self._stop = threading.Event()
        self._jobs: set[Future] = set()
        self.timeout = timeout

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)``, which uses this stream, on a worker thread."""
        # One thread per call, so a call may wait for other pools' work, never its own.
        job = thread_pool("streams", 64).submit(fn, *args)
        self._jobs = {j for j in self._jobs if not j.done()} | {job}
        return await asyncio.wrap_future(job)

    async def aclose(self) -> None:
        """Stop the calls in flight, wait until their threads let go of the socket, close it."""
        self._stop.set()
        running = [asyncio.wrap_future(j) for j in self._jobs if not j.done()]
        if running:
            await asyncio.wait(running)
            for done in running:
                if not done.cancelled():
                    done.exception()  # the caller of ``call`` gets it; this copy is only waited on
        if self._sock.fileno() >= 0:
            self._sock.setblocking(False)  # what the transport expects of its descriptor
            self._sock.close()

    def _stalled(self, since: float, what: str, deadline: float | None = None) -> None:
        """Raise if the call should give up (stopped, no progress for ``timeout``, or past
        the absolute ``deadline``, which a trickle of bytes does not move)."""
        if self._stop.is_set():
            raise FrameError("the transfer was stopped")
        if time.monotonic() - since > self.timeout:
            raise FrameError(f"the peer {what} for {self.timeout:.0f} s")
        if deadline is not None and time.monotonic() > deadline:
            raise FrameError("the peer took too long over one frame")

    async def wait_readable(self, timeout: float) -> bool:
        """Wait, on the event loop and holding no thread, until bytes (or the end of the
        stream) can be read; False when ``timeout`` passes first. An idle stream then costs
        a descriptor, not one of the threads every transfer shares."""
        if self._pending:
            return True
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        fd = self._sock.fileno()
        loop.add_reader(fd, lambda: ready.done() or ready.set_result(True))
        try:
            await asyncio.wait_for(ready, timeout)
            return True
        except TimeoutError:
            return False
        finally:
            loop.remove_reader(fd)

    def _move(
        self,
        total: int,
        step: Callable[[int], int],
        idle: str,
        short: str,
        deadline: float | None = None,
    ) -> None:
        """Call ``step(done)``, which moves some bytes and says how many, until ``total``
        have moved; ``short`` (formatted with done and total) is the error if one moves none."""
        done = 0
        progress = time.monotonic()
        while done < total:
            if deadline is not None:
                self._stalled(progress, idle, deadline)
            try:
                moved = step(done)
            except (BlockingIOError, TimeoutError):  # a timeout slice passed
                self._stalled(progress, idle, deadline)
                continue
            if moved == 0:
                raise StreamEnded(short.format(done=done, total=total), done)
            done += moved
            progress = time.monotonic()

    def read_into(self, view: memoryview, deadline: float | None = None) -> None:
        """Fill ``view`` exactly (by ``deadline``, a ``time.monotonic()`` value, when given),
        or raise FrameError."""
        if self._pending:
            got = min(len(self._pending), len(view))
            view[:got] = self._pending[:got]
            del self._pending[:got]
            view = view[got:]
        self._move(
            len(view),
            lambda done: self._sock.recv_into(view[done:], 0, socket.MSG_WAITALL),
            "sent nothing",
            "the stream ended {done} bytes into {total}",
            deadline,
        )

    def read_frame(
        self, kind: type[M], max_bytes: int, end_ok: bool = False, within: float | None = None
    ) -> M | None:
        """The next frame; None if ``end_ok`` and the stream ends cleanly before it. With
        ``within``, the whole frame must arrive within that many seconds."""
        deadline = time.monotonic() + within if within is not None else None
        head = bytearray(_LEN.size)
        clean = not self._pending
        try:
            self.read_into(memoryview(head), deadline)
        except StreamEnded as exc:
            if end_ok and clean and exc.done == 0:
                return None
            raise
        (length,) = _LEN.unpack(head)
        if length > max_bytes:
            raise FrameError(f"a frame of {length} bytes is over the {max_bytes}-byte cap")
        data = bytearray(length)
        self.read_into(memoryview(data), deadline)
        try:
            return kind.FromString(bytes(data))
        except DecodeError as exc:
            raise FrameError(f"undecodable {kind.__name__} frame ({exc})") from None

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        self._move(
            len(view),
            lambda done: self._sock.send(view[done:]),
            "did not read",
            "the stream took {done} of {total} bytes",
        )

    def write_frame(self, message: Message) -> None:
        data = message.SerializeToString()
        self.write(_LEN.pack(len(data)) + data)

    def sendfile(self, fd: int, offset: int, count: int) -> None:
        """``count`` bytes of file ``fd`` from ``offset``, copied by the kernel."""
        self._move(
            count,
            lambda done: os.sendfile(self._sock.fileno(), fd, offset + done, count - done),
            "did not read",
            "the file ended {done} bytes into {total}",
        )
