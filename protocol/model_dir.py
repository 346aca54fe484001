"""Hugging Face model directories read and written one tensor at a time.

Reading: a single ``model.safetensors`` or shards listed by
``model.safetensors.index.json``; only headers are parsed up front and each
tensor is loaded on demand. Writing: safetensors headers are computed from the
planned names, dtypes and shapes, then tensor bytes are streamed in, so peak
memory is one tensor, never a shard or the model.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError, safe_open

from protocol.durable import fsync_dir, write_synced
from protocol.errors import ModelDirError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
# Files that hold weights in some format; never carried over to an output directory.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msd", ".h5", ".msgpack")

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is."""

    name: str
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    offset: int = 0  # absolute byte offset of the tensor's data in ``file``

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=DTYPES[self.dtype]).element_size()


class ModelDir:
    """Read-only view of the safetensors weights of a model directory.

    :param path: a directory with ``model.safetensors`` or a sharded index, or one
        safetensors file (such as an outer-momentum blob).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_dir() and not self.path.is_file():
            raise ModelDirError(f"{self.path}: not a directory")
        self.tensors: dict[str, TensorInfo] = {}
        shards, expected = self._shard_files()
        for shard in shards:
            self._read_header(shard)
        if expected is not None and expected != set(self.tensors):
            odd = sorted(expected.symmetric_difference(self.tensors))[0]
            raise ModelDirError(f"{self.path / INDEX_FILE}: index and shards disagree on {odd!r}")
        self._handles: dict[Path, io.FileIO] = {}

    def _shard_files(self) -> tuple[list[Path], set[str] | None]:
        """The weight files, and the tensor names the index promises (None without an index)."""
        if self.path.is_file():
            return [self.path], None
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
                if not all(
                    isinstance(f, str) and isinstance(n, str) for n, f in weight_map.items()
                ):
                    raise TypeError("weight_map must map tensor names to file names")
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ModelDirError(f"{index}: not a safetensors index ({exc})") from None
            missing = [f for f in files if not (self.path / f).is_file()]
            if missing:
                raise ModelDirError(f"{index}: shard {missing[0]} is missing")
            return [self.path / f for f in files], set(weight_map)
        if (self.path / SINGLE_FILE).is_file():
            return [self.path / SINGLE_FILE], None
        raise ModelDirError(
            f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE} "
            "(only safetensors weights are read; convert .bin checkpoints first)"
        )

    def _read_header(self, shard: Path) -> None:
        # safetensors validates the file (header, offsets, sizes); we then read
        # tensor bytes ourselves with plain reads, because its memory map would
        # keep every page read so far resident in this process.
        offsets = _data_offsets(shard)
        try:
            with safe_open(shard, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    sl = f.get_slice(name)
                    dtype = sl.get_dtype()
                    if dtype not in DTYPES:
                        raise ModelDirError(
                            f"{shard}: tensor {name!r} has unsupported dtype {dtype}"
                        )
                    if name in self.tensors:
                        raise ModelDirError(
                            f"{shard}: tensor {name!r} also appears in another shard"
                        )
                    self.tensors[name] = TensorInfo(
                        name, dtype, tuple(sl.get_shape()), shard, offsets[name]
                    )
        except SafetensorError as exc:
            raise ModelDirError(f"{shard}: not a valid safetensors file ({exc})") from None

    @property
    def nbytes(self) -> int:
        """Bytes of all tensors (what a pass over the model reads)."""
        return sum(info.nbytes for info in self.tensors.values())

    def names(self) -> list[str]:
        """Tensor names in the canonical order (sorted by code point)."""
        return sorted(self.tensors)

    def read_range(self, name: str, start: int, size: int) -> bytes:
        """``size`` raw bytes of tensor ``name`` from byte ``start`` of its data (clipped)."""
        info = self.tensors[name]
        size = max(0, min(size, info.nbytes - start))
        data = os.pread(self._handle(info.file).fileno(), size, info.offset + start)
        if len(data) != size:
            raise ModelDirError(f"{info.file}: truncated inside tensor {name!r}")
        return data

    def _handle(self, file: Path) -> io.FileIO:
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = open(file, "rb", buffering=0)  # noqa: SIM115
        return handle

    def tensor(self, name: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Load one tensor with plain reads (no memory map).

        :param buffer: a reusable uint8 tensor of at least the tensor's byte size;
            the result is then a view of it, valid until the buffer is reused.
        """
        info = self.tensors[name]
        nbytes = info.nbytes
        if buffer is None:
            raw = torch.empty(nbytes, dtype=torch.uint8)
        elif buffer.dtype != torch.uint8 or buffer.numel() < nbytes:
            raise ValueError(f"buffer of {buffer.numel()} {buffer.dtype} cannot hold {name!r}")
        else:
            raw = buffer[:nbytes]
        handle = self._handle(info.file)
        handle.seek(info.offset)
        view = memoryview(raw.numpy()).cast("B")
        done = 0
        while done < nbytes:
            got = handle.readinto(view[done:])
            if not got:
                raise ModelDirError(f"{info.file}: truncated inside tensor {name!r}")
            done += got
        return raw.view(DTYPES[info.dtype]).reshape(info.shape)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __enter__(self) -> ModelDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _data_offsets(shard: Path) -> dict[str, int]:
    """Absolute data offset of every tensor in a safetensors file (validated afterwards)."""
    try:
        with open(shard, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100 * 1024**2:
                raise ValueError(f"header of {length} bytes")
            header = json.loads(f.read(length))
        return {
            name: 8 + length + int(entry["data_offsets"][0])
            for name, entry in header.items()
            if name != "__metadata__"
        }
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error) as exc:
        raise ModelDirError(f"{shard}: not a valid safetensors file ({exc})") from None


def safetensors_header(shard: list[TensorInfo]) -> bytes:
    """The safetensors header of a file holding ``shard`` in order."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for info in shard:
        end = offset + info.nbytes
        header[info.name] = {
            "dtype": info.dtype,
            "shape": list(info.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8-byte alignment
    return struct.pack("<Q", len(text)) + text


def plan_shards(infos: list[TensorInfo], max_shard_bytes: int) -> list[list[TensorInfo]]:
    """Split tensors, in order, into shards of at most ``max_shard_bytes`` (one tensor may exceed it)."""
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for info in infos:
        if shards[-1] and size + info.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += info.nbytes
    return shards


def write_model_dir(
    out: str | os.PathLike[str],
    template: ModelDir,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    float_dtype: str | None = None,
    extra_files: Callable[[], dict[str, bytes]] | None = None,
    files: dict[str, bytes] | None = None,
) -> Path:
    """Write a model directory shaped like ``template`` with new tensor values.

    ``tensors`` must yield every tensor of ``template`` exactly once, in
    ``template.names()`` order, with the template's shape and dtype (or
    ``float_dtype`` for floating-point tensors, when given). Config, tokenizer
    and other non-weight files are copied from the template (or are ``files``,
    when given); ``extra_files``
    is called once the tensors are written and its files are added. The
    directory appears atomically: it is built beside ``out`` and renamed.
    """
    out = Path(out)
    if out.exists():
        raise ModelDirError(f"{out}: already exists; choose another output or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        infos = [template.tensors[n] for n in template.names()]
        if float_dtype is not None:
            infos = [
                dataclasses.replace(i, dtype=float_dtype) if i.dtype in FLOAT_DTYPES else i
                for i in infos
            ]
        shards = plan_shards(infos, max_shard_bytes)
        names = (
            [SINGLE_FILE]
            if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        stream = iter(tensors)
        for shard, fname in zip(shards, names, strict=True):
            _write_shard(work / fname, shard, stream)
        if next(stream, None) is not None:
            raise ModelDirError(f"{out}: more tensors supplied than the template has")
        if len(shards) > 1:
            weight_map = {
                info.name: fname
                for shard, fname in zip(shards, names, strict=True)
                for info in shard
            }
            index = {
                "metadata": {"total_size": sum(i.nbytes for i in infos)},
                "weight_map": weight_map,
            }
            write_synced(work / INDEX_FILE, json.dumps(index, indent=2).encode())
        for fname, data in sorted(
            (carried_files(template.path) if files is None else files).items()
        ):
            write_synced(work / fname, data)
        for fname, data in (extra_files() if extra_files else {}).items():
            write_synced(work / fname, data)
        fsync_dir(work)
        if out.exists():
            raise ModelDirError(f"{out}: appeared while writing; choose another output")
        os.rename(work, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out


def carried_files(model_dir: Path) -> dict[str, bytes]:
    """The non-weight files of a model directory (config, tokenizer, ...), by name.

    Hidden files (temporary or tool files such as ``.gitattributes``) are left out.
    """
    return {
        src.name: src.read_bytes()
        for src in sorted(model_dir.iterdir())
        if src.is_file()
        and not src.name.startswith(".")
        and src.name != INDEX_FILE
        and not src.name.endswith(_WEIGHT_SUFFIXES)
    }


def _write_shard(
    path: Path, shard: list[TensorInfo], stream: Iterator[tuple[str, torch.Tensor]]
) -> None:
    with open(path, "wb") as f:
        f.write(safetensors_header(shard))
        for info in shard:
            item = next(stream, None)
            if item is None:
                raise ModelDirError(f"{path}: tensor {info.name!r} was never supplied")
            write_tensor(f, info, *item)
            del item  # let the tensor go before the producer makes the next one
        f.flush()
        os.fsync(f.fileno())


def write_tensor(f: BinaryIO, info: TensorInfo, name: str, t: torch.Tensor) -> None:
    """Append the bytes of ``t`` to a safetensors file whose header planned ``info`` next."""
    if name != info.name or DTYPE_NAMES.get(t.dtype) != info.dtype or tuple(t.shape) != info.shape:
        raise ModelDirError(
            f"{f.name}: expected {info.name} {info.dtype}{list(info.shape)}, got "
            f"{name} {DTYPE_NAMES.get(t.dtype, t.dtype)}{list(t.shape)}"
        )
    f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())
