"""Frames over byte streams, and a stream whose bulk bytes move on a worker thread."""

from __future__ import annotations

import asyncio
import os
import socket
import time

import pytest

from node.net.framing import DetachedStream, FrameError, read_frame, write_frame
from protocol import transfer_pb2 as pb


async def _pair():
    """Two connected asyncio (reader, writer) ends, as hivemind hands over a p2pd stream."""
    a, b = socket.socketpair()
    return await asyncio.open_connection(sock=a), await asyncio.open_connection(sock=b)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_a_detached_stream_reads_what_the_asyncio_reader_had_buffered_first():
    async def go():
        (reader, writer), (_, peer) = await _pair()
        data = os.urandom(3 << 20)
        await write_frame(peer, pb.Piece(index=7, size=len(data)))
        peer.write(data)
        await asyncio.sleep(0.05)  # the transport reads ahead into the StreamReader
        stream = DetachedStream(reader, writer)
        piece = await stream.call(stream.read_frame, pb.Piece, 64)
        got = memoryview(bytearray(piece.size))
        await stream.call(stream.read_into, got)
        await stream.aclose()
        writer.close()
        peer.close()
        return piece, bytes(got), data

    piece, got, data = run(go())
    assert piece.index == 7 and got == data


def test_sendfile_sends_exactly_the_asked_range_of_a_file(tmp_path):
    data = os.urandom(5 << 20)
    (tmp_path / "f").write_bytes(data)

    async def go():
        (reader, writer), (peer_reader, peer) = await _pair()
        stream = DetachedStream(reader, writer)
        fd = os.open(tmp_path / "f", os.O_RDONLY)
        try:
            sending = asyncio.ensure_future(stream.call(stream.sendfile, fd, 1 << 20, 3 << 20))
            got = await peer_reader.readexactly(3 << 20)
            await sending
        finally:
            os.close(fd)
        await stream.aclose()
        writer.close()
        peer.close()
        return got

    assert run(go()) == data[1 << 20 : 4 << 20]


def test_a_peer_that_sends_nothing_times_out_and_a_truncated_piece_is_an_error():
    async def go():
        (reader, writer), (_, peer) = await _pair()
        stream = DetachedStream(reader, writer, timeout=0.5)
        with pytest.raises(FrameError, match="sent nothing for"):
            await stream.call(stream.read_into, memoryview(bytearray(10)))
        peer.write(b"12345")
        peer.close()
        with pytest.raises(FrameError, match="ended 5 bytes into 10"):
            await stream.call(stream.read_into, memoryview(bytearray(10)))
        await stream.aclose()
        writer.close()

    run(go())


def test_an_oversized_frame_is_refused_before_its_body_is_read():
    async def go():
        (reader, writer), (_, peer) = await _pair()
        peer.write((10**6).to_bytes(4, "little"))
        stream = DetachedStream(reader, writer)
        with pytest.raises(FrameError, match="over the 4096-byte cap"):
            await stream.call(stream.read_frame, pb.Piece, 4096)
        await stream.aclose()
        writer.close()
        peer.close()

    run(go())


def test_closing_stops_a_blocked_read_and_hands_the_socket_back_non_blocking():
    async def go():
        (reader, writer), (_, peer) = await _pair()
        stream = DetachedStream(reader, writer, timeout=60)
        transport_fd = writer.get_extra_info("socket").fileno()
        assert os.get_blocking(transport_fd)  # the shared flag, while detached
        blocked = asyncio.ensure_future(stream.call(stream.read_into, memoryview(bytearray(10))))
        await asyncio.sleep(0.1)
        start = time.monotonic()
        await stream.aclose()
        waited = time.monotonic() - start
        with pytest.raises(FrameError, match="stopped"):
            await blocked
        assert not os.get_blocking(transport_fd)
        writer.close()
        peer.close()
        return waited

    assert run(go()) < 2  # within a receive-timeout slice, not the 60 s timeout


def test_asyncio_frames_are_capped_and_end_cleanly():
    async def go():
        (reader, writer), (_, peer) = await _pair()
        await write_frame(peer, pb.Piece(index=1, size=2))
        peer.write_eof()
        first = await read_frame(reader, pb.Piece, 64)
        end = await read_frame(reader, pb.Piece, 64)
        writer.close()
        peer.close()
        return first, end

    first, end = run(go())
    assert first.index == 1 and end is None


def test_a_detached_stream_tells_a_clean_end_between_frames_from_one_inside_a_frame():
    async def go():
        (reader, writer), (_, peer) = await _pair()
        stream = DetachedStream(reader, writer)
        await write_frame(peer, pb.PieceRequest(first=3, count=2))
        peer.write(b"\x10\x00")  # half of the next frame's length, then the end
        peer.close()
        first = await stream.call(stream.read_frame, pb.PieceRequest, 64, True)
        with pytest.raises(FrameError, match="ended 2 bytes into 4"):
            await stream.call(stream.read_frame, pb.PieceRequest, 64, True)
        await stream.aclose()
        writer.close()

        (reader, writer), (_, peer) = await _pair()
        stream = DetachedStream(reader, writer)
        peer.close()
        end = await stream.call(stream.read_frame, pb.PieceRequest, 64, True)
        with pytest.raises(FrameError, match="ended 0 bytes into 4"):  # not expected to end
            await stream.call(stream.read_frame, pb.PieceRequest, 64)
        await stream.aclose()
        writer.close()
        return first, end

    first, end = run(go())
    assert (first.first, first.count) == (3, 2) and end is None


def test_one_call_may_write_while_another_reads_and_closing_waits_for_both():
    async def go():
        (reader, writer), (peer_reader, peer) = await _pair()
        stream = DetachedStream(reader, writer, timeout=60)
        reading = asyncio.ensure_future(stream.call(stream.read_frame, pb.Piece, 64))
        await stream.call(stream.write_frame, pb.PieceRequest(first=9, count=1))
        request = await read_frame(peer_reader, pb.PieceRequest, 64)  # sent while reading
        await write_frame(peer, pb.Piece(index=9, size=1))
        piece = await reading
        blocked = asyncio.ensure_future(stream.call(stream.read_into, memoryview(bytearray(8))))
        writing = asyncio.ensure_future(stream.call(stream.write, b"x" * (64 << 20)))  # fills up
        await asyncio.sleep(0.1)
        await stream.aclose()
        assert blocked.done() and writing.done()  # aclose returned once both let go
        for call in (blocked, writing):
            with pytest.raises(FrameError, match="stopped"):
                await call
        writer.close()
        peer.close()
        return request, piece

    request, piece = run(go())
    assert request.first == 9 and piece.index == 9
