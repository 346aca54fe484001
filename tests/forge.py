"""Take .msd files apart and put them back together, re-signed: how an attacker would."""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from protocol import frames
from protocol.codecs import get_codec
from protocol.container import _PREFIX, FORMAT_VERSION, MAGIC, SIG_DOMAIN, DeltaWriter
from protocol.identity import Identity
from protocol.ids import base_id
from protocol.model_dir import ModelDir


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


def single_tensor_delta(path: Path, base: Path, identity: Identity, values: torch.Tensor) -> str:
    """A fp32 delta of one tensor of ``base`` (the first 2-D one), filled with ``values``."""
    md = ModelDir(base)
    name = next(n for n in md.names() if len(md.tensors[n].shape) == 2)
    with DeltaWriter(
        path, base_id=base_id(md), identity=identity, drop_rate=0.9, seed=3, codec="fp32"
    ) as w:
        w.add(name, md.tensors[name].dtype, values.expand(md.tensors[name].shape))
        w.finish()
    return name


def nan_delta(path: Path, base: Path, identity: Identity) -> None:
    """A delta whose values hold a NaN, validly framed and signed: only the values lie
    (no honest writer makes one: the codecs refuse non-finite input)."""
    single_tensor_delta(path, base, identity, torch.tensor(1e-3))
    parts = split(path)
    entry = parts.header["tensors"][0]
    values = np.full(entry["kept"], 1e-3, np.float32)
    values[entry["kept"] // 2] = np.nan
    frame = frames.compress(get_codec("fp32").encode(values).tobytes())
    parts.frames[0] = frame
    entry["frame_bytes"] = len(frame)
    entry["sha256"] = hashlib.sha256(frame).hexdigest()
    path.write_bytes(assemble(parts, identity))


def scaled_finetune(base: Path, finetuned: Path, out: Path, factor: float) -> Path:
    """A model ``base + factor * (finetuned - base)``: a fine-tune blown up ``factor`` times."""
    from protocol.model_dir import FLOAT_DTYPES, write_model_dir

    b_md, f_md = ModelDir(base), ModelDir(finetuned)

    def tensors():
        for name in b_md.names():
            b = b_md.tensor(name)
            if b_md.tensors[name].dtype in FLOAT_DTYPES:
                yield name, ((f_md.tensor(name) - b) * factor + b).to(b.dtype)
            else:
                yield name, b

    return write_model_dir(out, b_md, tensors())
