"""Pushing an announced delta to a reachable peer (a volunteer that cannot be dialed)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from hivemind.p2p import PeerID

from node.net.blobs.wire import (
    SEND,
    SMALL_FRAME,
    UPLOAD,
    UPLOAD_CHUNK,
)
from node.net.blobstore import (
    BlobStore,
)
from node.net.framing import (
    FrameError,
    read_frame,
    write_frame,
)
from node.net.swarm import Swarm
from protocol import transfer_pb2 as pb

logger = logging.getLogger(__name__)


async def _upload_data(path: Path) -> AsyncIterator[pb.Upload]:
    loop = asyncio.get_running_loop()
    with open(path, "rb") as f:
        while data := await loop.run_in_executor(None, f.read, UPLOAD_CHUNK):
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
            reply = await read_frame(reader, pb.UploadResult, SMALL_FRAME, timeout=60)
            if reply is None or reply.reason != SEND:
                return reply or pb.UploadResult(reason="the peer closed the stream")
            async for message in _upload_data(path):
                await write_frame(writer, message)
            # No write_eof: the receiver stops at the declared size and answers on the open
            # stream (a half-close through p2pd could close the stream before the answer).
            result = await read_frame(reader, pb.UploadResult, SMALL_FRAME, timeout=120)
        finally:
            writer.close()
        if result is None:
            raise FrameError("the peer closed the stream without a result")
        return result

    return swarm.run(call(), timeout=900)
