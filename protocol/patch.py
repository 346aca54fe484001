"""Base patches and snapshots (``.msp``): how a new base travels, bit-exact.

A patch turns a parent base into a child base: per tensor, the XOR of the
two tensors' raw bytes, split into byte planes and zstd-compressed (entries
the merge left alone XOR to zero and cost almost nothing). A snapshot is a
patch from nothing (the raw bytes themselves), for peers with no parent.
Both carry the child's non-weight files (config, tokenizer) that differ
from the parent's. Applying checks the child id before the output appears.

Layout::

    offset  size
    0       8   magic b"MSPATCH\\0"
    8       2   format version (1), little-endian
    10      2   flags (0)
    12      4   header length H
    16      H   header: UTF-8 JSON (PatchHeader)
    16+H        frames, in header order: tensors by name, then files by name

Integrity comes from the child id (checked on apply) and from the blob id the
signed head record names; patches are not signed themselves.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from protocol import frames
from protocol.codecs import from_planes, to_planes
from protocol.durable import fsync_dir
from protocol.errors import BaseMismatchError, DeltaFormatError, one_line
from protocol.ids import BaseHasher, base_id
from protocol.model_dir import DTYPES, ModelDir, TensorInfo, carried_files, write_model_dir

MAGIC = b"MSPATCH\0"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sHHI")
MAX_HEADER_BYTES = 16 << 20
MAX_FILE_BYTES = 256 << 20
MAX_TENSORS = 65_536

Hex64 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
FileName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._ -]{0,127}$")]


class PatchError(DeltaFormatError):
    """A patch or snapshot is malformed, or does not turn its parent into its child."""


class TensorFrame(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    name: Annotated[str, StringConstraints(min_length=1, max_length=1024)]
    dtype: Literal[tuple(DTYPES)]  # type: ignore[valid-type]
    shape: list[Annotated[int, Field(ge=0, le=1 << 34)]] = Field(max_length=8)
    frame_size: int = Field(ge=0, le=1 << 40)  # 0: unchanged from the parent

    @property
    def nbytes(self) -> int:
        return TensorInfo(self.name, self.dtype, tuple(self.shape), Path()).nbytes


class FileFrame(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    name: FileName
    size: int = Field(ge=0, le=MAX_FILE_BYTES)
    frame_size: int = Field(ge=0, le=MAX_FILE_BYTES + (1 << 20))


class PatchHeader(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    kind: Literal["patch", "snapshot"]
    parent_id: Hex64 | None  # None for a snapshot
    child_id: Hex64
    tensors: list[TensorFrame] = Field(max_length=MAX_TENSORS)
    files: list[FileFrame] = Field(default_factory=list, max_length=256)


def _bytes_of(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def _width(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


def write_patch(
    child: ModelDir, out: str | os.PathLike[str], parent: ModelDir | None = None
) -> str:
    """Write the patch from ``parent`` to ``child`` (a snapshot when ``parent`` is None).

    The parent must have the child's tensor names, dtypes and shapes. Returns the
    child id. The file appears atomically.
    """
    out = Path(out)
    if parent is not None:
        _same_layout(parent, child)
    parent_files = carried_files(parent.path) if parent is not None else {}
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    hasher = BaseHasher()
    entries: list[TensorFrame] = []
    try:
        with open(tmp, "wb") as f:
            f.write(b"\0" * _PREFIX.size)  # the header goes after the frames; see below
            for name in child.names():
                info = child.tensors[name]
                tensor = child.tensor(name)
                hasher.update(name, info.dtype, tensor)
                raw = _bytes_of(tensor)
                if parent is not None:
                    before = _bytes_of(parent.tensor(name))
                    if np.array_equal(raw, before):
                        entries.append(_entry(info, 0))
                        continue
                    raw = np.bitwise_xor(raw, before)
                frame = frames.compress(to_planes(raw, _width(info.dtype)))
                f.write(frame)
                entries.append(_entry(info, len(frame)))
            files = []
            for fname, data in sorted(carried_files(child.path).items()):
                if parent_files.get(fname) == data:
                    continue
                frame = frames.compress(data)
                f.write(frame)
                files.append(FileFrame(name=fname, size=len(data), frame_size=len(frame)))
        header = PatchHeader(
            kind="snapshot" if parent is None else "patch",
            parent_id=None if parent is None else base_id(parent),
            child_id=hasher.hexdigest(),
            tensors=entries,
            files=files,
        )
        _prepend_header(tmp, header)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return header.child_id


def _entry(info: TensorInfo, frame_size: int) -> TensorFrame:
    return TensorFrame(
        name=info.name, dtype=info.dtype, shape=list(info.shape), frame_size=frame_size
    )


def _prepend_header(path: Path, header: PatchHeader) -> None:
    """Rewrite ``path`` as prefix + header + the frames already written after a placeholder."""
    header_bytes = header.model_dump_json().encode()
    final = path.with_name(path.name + ".h")
    try:
        with open(path, "rb") as src, open(final, "wb") as dst:
            dst.write(_PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(header_bytes)) + header_bytes)
            src.seek(_PREFIX.size)
            while chunk := src.read(1 << 20):
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(final, path)
    finally:
        final.unlink(missing_ok=True)


def _same_layout(parent: ModelDir, child: ModelDir) -> None:
    if set(parent.tensors) != set(child.tensors):
        odd = sorted(set(parent.tensors) ^ set(child.tensors))[0]
        raise BaseMismatchError(f"parent and child differ in tensor {odd!r}")
    for name, info in child.tensors.items():
        other = parent.tensors[name]
        if (other.dtype, other.shape) != (info.dtype, info.shape):
            raise BaseMismatchError(
                f"tensor {name!r} is {other.dtype}{list(other.shape)} in the parent, "
                f"{info.dtype}{list(info.shape)} in the child"
            )


class PatchReader:
    """Reads a patch or snapshot; every size is checked before it is allocated."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._file = open(self.path, "rb")  # noqa: SIM115 - closed by close()
        try:
            self.header = self._read_header()
        except BaseException:
            self._file.close()
            raise

    def _fail(self, problem: str) -> PatchError:
        return PatchError(f"{self.path}: {problem}")

    def _read_header(self) -> PatchHeader:
        size = os.fstat(self._file.fileno()).st_size
        prefix = self._file.read(_PREFIX.size)
        if len(prefix) < _PREFIX.size:
            raise self._fail("too short for a patch")
        magic, version, flags, header_len = _PREFIX.unpack(prefix)
        if magic != MAGIC:
            raise self._fail("not a mergeswarm patch (bad magic)")
        if version != FORMAT_VERSION or flags:
            raise self._fail(f"patch format version {version} (flags {flags}); this build reads 1")
        if header_len > min(MAX_HEADER_BYTES, size - _PREFIX.size):
            raise self._fail(f"header of {header_len} bytes does not fit")
        try:
            header = PatchHeader.model_validate_json(self._file.read(header_len))
        except ValidationError as exc:
            raise self._fail(f"bad header: {one_line(exc)}") from None
        names = [t.name for t in header.tensors]
        if names != sorted(set(names)):
            raise self._fail("tensors must be sorted by name and unique")
        if (header.kind == "snapshot") != (header.parent_id is None):
            raise self._fail("a snapshot has no parent and a patch has one")
        if header.kind == "snapshot" and any(t.frame_size == 0 for t in header.tensors):
            raise self._fail("a snapshot cannot leave tensors unchanged")
        frames_total = sum(t.frame_size for t in header.tensors) + sum(
            f.frame_size for f in header.files
        )
        if _PREFIX.size + header_len + frames_total != size:
            raise self._fail("frame sizes do not add up to the file size")
        for t in header.tensors:
            if t.frame_size > frames.max_frame_size(t.nbytes):
                raise self._fail(f"frame of tensor {t.name!r} is larger than any honest one")
        return header

    def tensors(self, parent: ModelDir | None) -> Iterator[tuple[str, torch.Tensor]]:
        """The child's tensors in name order (``parent`` is required for a patch)."""
        if (parent is None) != (self.header.parent_id is None):
            raise self._fail("a patch needs its parent; a snapshot takes none")
        self._file.seek(_PREFIX.size + len(self.header.model_dump_json().encode()))
        for t in self.header.tensors:
            dtype = DTYPES[t.dtype]
            if parent is not None:
                info = parent.tensors.get(t.name)
                if info is None or (info.dtype, list(info.shape)) != (t.dtype, t.shape):
                    raise BaseMismatchError(
                        f"{self.path}: tensor {t.name!r} does not fit the parent"
                    )
                before = parent.tensor(t.name)
                if t.frame_size == 0:
                    yield t.name, before
                    continue
            raw = frames.decompress(
                self._file.read(t.frame_size), t.nbytes, f"{self.path} {t.name}"
            )
            data = from_planes(raw, _width(t.dtype))
            if parent is not None:
                data = np.bitwise_xor(data, _bytes_of(before))
            yield t.name, torch.from_numpy(data.copy()).view(dtype).reshape(t.shape)

    def files(self) -> dict[str, bytes]:
        """The carried files (read after the tensors)."""
        self._file.seek(
            os.fstat(self._file.fileno()).st_size - sum(f.frame_size for f in self.header.files)
        )
        return {
            f.name: frames.decompress(
                self._file.read(f.frame_size), f.size, f"{self.path} {f.name}"
            )
            for f in self.header.files
        }

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> PatchReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def apply_patch(
    patch: str | os.PathLike[str], out: str | os.PathLike[str], parent: ModelDir | None = None
) -> str:
    """Write the child model directory of ``patch`` to ``out``; returns its (checked) id.

    Nothing appears at ``out`` unless the result hashes to the header's child id.
    """
    with PatchReader(patch) as reader:
        header = reader.header
        if parent is not None and base_id(parent) != header.parent_id:
            raise BaseMismatchError(
                f"{patch}: made for parent {header.parent_id[:16]}, not this base"
            )
        layout = {
            t.name: TensorInfo(t.name, t.dtype, tuple(t.shape), Path()) for t in header.tensors
        }
        files = dict(carried_files(parent.path)) if parent is not None else {}
        files.update(reader.files())
        hasher = BaseHasher()

        def checked() -> Iterator[tuple[str, torch.Tensor]]:
            for entry, (name, tensor) in zip(header.tensors, reader.tensors(parent), strict=True):
                hasher.update(name, entry.dtype, tensor)
                yield name, tensor
            if hasher.hexdigest() != header.child_id:
                raise PatchError(f"{patch}: the result is not base {header.child_id[:16]}")

        write_model_dir(out, _Layout(layout), checked(), files=files)
    return header.child_id


class _Layout:
    """What write_model_dir needs of a template: tensor infos in name order."""

    def __init__(self, tensors: dict[str, TensorInfo]) -> None:
        self.tensors = tensors

    def names(self) -> list[str]:
        return sorted(self.tensors)
