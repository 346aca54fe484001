"""Content ids: SHA-256, written as 64 lowercase hex digits.

* A **base id** hashes every tensor of a model in code-point order of names:
  ``sha256(b"mergeswarm/base/v1\\n" + for each tensor: u32 len(name) + name +
  u8 len(dtype) + dtype + u8 ndim + ndim * u64 dim + u64 nbytes + bytes)``,
  integers little-endian, ``dtype`` the safetensors name (``"BF16"``), bytes the
  tensor's little-endian row-major storage. File layout, sharding and
  non-tensor files do not matter.
* A **blob id** (a delta, a patch) is the SHA-256 of the file's bytes.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable
from pathlib import Path

import torch

from protocol.model_dir import ModelDir

ID_HEX_LEN = 64
_READ = 1 << 20


def is_id(value: str) -> bool:
    return len(value) == ID_HEX_LEN and all(c in "0123456789abcdef" for c in value)


class BaseHasher:
    """Builds a base id incrementally; feed tensors in code-point order of names."""

    def __init__(self) -> None:
        self._h = hashlib.sha256(b"mergeswarm/base/v1\n")
        self._last: str | None = None

    def update(self, name: str, dtype: str, tensor: torch.Tensor) -> None:
        if self._last is not None and name <= self._last:
            raise ValueError(f"tensor {name!r} hashed after {self._last!r}; feed in sorted order")
        self._last = name
        raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
        encoded = name.encode("utf-8")
        h = self._h
        h.update(struct.pack("<I", len(encoded)) + encoded)
        h.update(struct.pack("<B", len(dtype)) + dtype.encode("ascii"))
        h.update(struct.pack(f"<B{tensor.dim()}Q", tensor.dim(), *tensor.shape))
        h.update(struct.pack("<Q", raw.nbytes))
        h.update(raw)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def base_id(
    model: ModelDir | str | os.PathLike[str], progress: Callable[[int], None] | None = None
) -> str:
    """The content id of a model directory, read one tensor at a time.

    :param progress: called with the byte count of each tensor once hashed.
    """
    md = model if isinstance(model, ModelDir) else ModelDir(model)
    hasher = BaseHasher()
    for name in md.names():
        info = md.tensors[name]
        hasher.update(name, info.dtype, md.tensor(name))
        if progress is not None:
            progress(info.nbytes)
    return hasher.hexdigest()


def file_id(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(Path(path), "rb") as f:
        while chunk := f.read(_READ):
            h.update(chunk)
    return h.hexdigest()
