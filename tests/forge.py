"""Take .msd files apart and put them back together, re-signed: how an attacker would."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from protocol.container import _PREFIX, FORMAT_VERSION, MAGIC, SIG_DOMAIN
from protocol.identity import Identity


@dataclass
class Parts:
    header: dict
    frames: list[bytes]
    version: int = FORMAT_VERSION
    flags: int = 0
    magic: bytes = MAGIC
    signature: bytes = b""
    extra: bytes = field(default=b"")


def split(path: Path) -> Parts:
    data = path.read_bytes()
    magic, version, flags, hlen = _PREFIX.unpack_from(data)
    header = json.loads(data[_PREFIX.size : _PREFIX.size + hlen])
    pos = _PREFIX.size + hlen
    signature = data[pos : pos + 64]
    pos += 64
    frames = []
    for entry in header["tensors"]:
        frames.append(data[pos : pos + entry["frame_bytes"]])
        pos += entry["frame_bytes"]
    return Parts(header, frames, version, flags, magic, signature)


def assemble(parts: Parts, signer: Identity | None = None) -> bytes:
    """Bytes of a container; with ``signer`` the header is re-signed (author set to the signer)."""
    header = dict(parts.header)
    if signer is not None:
        header["author"] = signer.author
    hbytes = json.dumps(header).encode()
    prefix = struct.pack("<8sHHI", parts.magic, parts.version, parts.flags, len(hbytes)) + hbytes
    signature = signer.sign(SIG_DOMAIN + prefix) if signer is not None else parts.signature
    return prefix + signature + b"".join(parts.frames) + parts.extra
