"""What both ends of the blob exchange agree on: the libp2p handler names, frame caps, and
the transfer counters a peer reports in its heartbeats."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

HAVE = "mergeswarm.Have"  # which pieces do you hold (and the manifest)
PIECES = "mergeswarm.Pieces"  # send me this run of pieces
UPLOAD = "mergeswarm.Upload"  # take this announced delta (push, for unreachable volunteers)
CAPPED = "run capped"  # a complete provider cut a long run short: sharers fetch the blob too
SEND = "send"  # an upload's go-ahead, after its header was accepted
BUSY = ("busy", "too many requests", "too many streams")  # refusals to retry soon, elsewhere
REQUEST_DEADLINE = 10.0  # seconds a whole request frame may take to arrive (not per byte)
IDLE_BETWEEN_REQUESTS = 10.0  # seconds a pieces stream may wait for its next request
SMALL_FRAME = 4096  # cap of a request or result frame
UPLOAD_CHUNK = 1 << 20
UPLOAD_FRAME = UPLOAD_CHUNK + 4096


@dataclass
class TransferStats:
    bytes_out: int = 0
    bytes_in: int = 0
    refused: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    bad_pieces: int = 0
