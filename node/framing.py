"""Length-prefixed protobuf frames over a libp2p byte stream, with size caps and timeouts.

hivemind's own protobuf streams read whatever length the peer announces; here
every frame's length (4 bytes, little-endian) is checked against a cap before
a byte of it is read, and every read and write has a deadline, so a hostile
or stalled peer costs at most one frame's worth of memory and a timeout.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from protocol.errors import MergeswarmError

_LEN = struct.Struct("<I")
IO_TIMEOUT = 30.0
M = TypeVar("M", bound=Message)


class FrameError(MergeswarmError):
    """A peer sent an oversized, truncated or undecodable frame, or stalled."""


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
