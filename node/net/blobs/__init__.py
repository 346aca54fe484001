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

from node.net.blobs.fetch import Fetcher, FetchError, fetch
from node.net.blobs.providers import PROVIDER_TTL, announce, providers, withdraw
from node.net.blobs.push import push
from node.net.blobs.serve import BlobService, ServeLimits
from node.net.blobs.wire import CAPPED, HAVE, PIECES, UPLOAD, TransferStats

__all__ = [
    "CAPPED",
    "HAVE",
    "PIECES",
    "PROVIDER_TTL",
    "UPLOAD",
    "BlobService",
    "FetchError",
    "Fetcher",
    "ServeLimits",
    "TransferStats",
    "announce",
    "fetch",
    "providers",
    "push",
    "withdraw",
]
