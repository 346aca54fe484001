"""The ``.msd`` delta container: a signed header, then one zstd frame per tensor.

Layout (integers little-endian)::

    0   8   magic  b"MSDELTA\\0"
    8   2   format version (FORMAT_VERSION)
    10  2   flags (0)
    12  4   header length H (<= MAX_HEADER_BYTES)
    16  H   header: UTF-8 JSON, schema ``DeltaHeader``
    16+H 64 Ed25519 signature by ``header.author`` over SIG_DOMAIN + bytes [0, 16+H)
    80+H    frames, in header order, each ``tensors[i].frame_bytes`` long

Frame ``i`` is a zstd frame of the codec's encoding of the kept values of
tensor ``i`` (DARE mask order, not rescaled); its SHA-256 is in the header,
so the signature covers every byte. The delta id is the file's blob id
(``protocol.ids``).

A reader checks magic, version, header size, schema and signature before
touching a frame, and every frame's size and hash before inflating it: a
hostile file is refused with a specific ``DeltaFormatError`` before any
allocation bigger than what its (bounded) header declares.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from protocol import dare, frames
from protocol.codecs import CODECS, ValueCodec, get_codec
from protocol.durable import fsync_dir
from protocol.errors import (
    BaseMismatchError,
    DeltaFormatError,
    EncodeError,
    IntegrityError,
    NonFiniteError,
    SignatureError,
    UnsupportedVersionError,
    one_line,
)
from protocol.identity import SIGNATURE_BYTES, Identity, verify
from protocol.ids import BlobHasher, file_id
from protocol.model_dir import FLOAT_DTYPES

MAGIC = b"MSDELTA\0"
FORMAT_VERSION = 1
SIG_DOMAIN = b"mergeswarm/delta-sig/v1\0"
_PREFIX = struct.Struct("<8sHHI")
MAX_HEADER_BYTES = 16 * 1024**2
MAX_METADATA_BYTES = 64 * 1024
MAX_TENSORS = 65_536
MAX_NAME_CHARS = 1024
MAX_NDIM = 8
MAX_NUMEL = 1 << 34  # per tensor
MAX_TOTAL_PARAMS = 1 << 40  # per delta
_COPY = 1 << 22

HexId = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
U64 = Annotated[int, Field(ge=0, le=(1 << 64) - 1)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class SparsifierSpec(_Strict):
    method: str = "dare"  # only "dare" exists; unknown methods are refused as unsupported
    prf: str = dare.PRF_NAME  # the keep-mask function, see protocol/dare.py
    drop_rate: Annotated[float, Field(ge=0.0, lt=1.0)]  # p; survivors are rescaled by 1/(1-p)
    seed: U64  # with the tensor name, determines every keep-mask


class CodecSpec(_Strict):
    name: str  # key of protocol.codecs.CODECS
    block_size: Annotated[int, Field(ge=0, le=1 << 16)] = 0  # int8, int4 and sign: values per scale


class TensorEntry(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]
    dtype: str  # dtype of the base tensor (safetensors name); values travel as float32 deltas
    shape: Annotated[list[Annotated[int, Field(ge=0, le=MAX_NUMEL)]], Field(max_length=MAX_NDIM)]
    kept: Annotated[int, Field(ge=0)]  # number of values the DARE mask keeps
    frame_bytes: Annotated[int, Field(ge=1)]  # length of this tensor's zstd frame
    sha256: HexId  # of the frame bytes

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @model_validator(mode="after")
    def _bounded(self) -> TensorEntry:
        if self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"tensor {self.name!r}: dtype {self.dtype!r} is not a float dtype")
        if self.numel > MAX_NUMEL:
            raise ValueError(f"tensor {self.name!r}: {self.numel} elements exceeds {MAX_NUMEL}")
        if self.kept > self.numel:
            raise ValueError(f"tensor {self.name!r}: kept {self.kept} > {self.numel} elements")
        return self


class DeltaHeader(_Strict):
    format: Literal["mergeswarm-delta"] = "mergeswarm-delta"
    kind: Literal["delta"] = "delta"
    base_id: HexId  # base id of the model the delta was trained from
    author: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]  # Ed25519 public key, hex
    sparsifier: SparsifierSpec
    codec: CodecSpec
    tensors: Annotated[list[TensorEntry], Field(max_length=MAX_TENSORS)]  # sorted by name
    metadata: dict[str, Any] = {}  # free training metadata (JSON), at most MAX_METADATA_BYTES

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            text = json.dumps(value, allow_nan=False)
        except ValueError:
            raise ValueError("metadata holds NaN or Infinity, which JSON cannot carry") from None
        if len(text) > MAX_METADATA_BYTES:
            raise ValueError(f"metadata exceeds {MAX_METADATA_BYTES} bytes")
        return value

    @field_validator("tensors")
    @classmethod
    def _sorted_unique(cls, value: list[TensorEntry]) -> list[TensorEntry]:
        names = [t.name for t in value]
        if any(a >= b for a, b in zip(names, names[1:], strict=False)):
            raise ValueError("tensor names must be unique and sorted by code point")
        return value

    @model_validator(mode="after")
    def _bounded_total(self) -> DeltaHeader:
        if self.params > MAX_TOTAL_PARAMS:
            raise ValueError(f"{self.params} parameters in all exceeds {MAX_TOTAL_PARAMS}")
        return self

    @property
    def params(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def kept(self) -> int:
        return sum(t.kept for t in self.tensors)


def _codec_of(header: DeltaHeader) -> ValueCodec:
    if header.codec.name not in CODECS:
        raise UnsupportedVersionError(
            f"unknown codec {header.codec.name!r}; this build knows {', '.join(sorted(CODECS))}"
        )
    if header.sparsifier.method != "dare" or header.sparsifier.prf != dare.PRF_NAME:
        raise UnsupportedVersionError(
            f"unknown sparsifier {header.sparsifier.method}/{header.sparsifier.prf}"
        )
    try:
        return get_codec(header.codec.name, header.codec.block_size or None)
    except ValueError as exc:
        raise DeltaFormatError(str(exc)) from None


class DeltaWriter:
    """Streams tensors into a ``.msd`` file; the file appears atomically on :meth:`finish`.

    :param path: destination file.
    :param base_id: id of the base the delta is relative to.
    :param identity: the author's key; signs the header.
    :param drop_rate: DARE p in [0, 1).
    :param seed: DARE seed in [0, 2**64).
    :param codec: value codec name (``fp32``, ``fp16``, ``bf16``, ``int8``, ``int4``, ``sign``).
    :param block_size: values per scale of int8 (default 128), int4 (64) and sign (256).
    :param zstd_level: compression level of each frame.
    :param metadata: free JSON training metadata.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        base_id: str,
        identity: Identity,
        drop_rate: float,
        seed: int,
        codec: str = "bf16",
        block_size: int | None = None,
        zstd_level: int = frames.DEFAULT_LEVEL,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.path = Path(path)
        self._identity = identity
        self._codec = get_codec(codec, block_size)
        dare.drop_threshold(drop_rate)
        self._fields = dict(
            base_id=base_id,
            author=identity.author,
            sparsifier=SparsifierSpec(drop_rate=float(drop_rate), seed=seed),
            codec=CodecSpec(name=codec, block_size=self._codec.block_size),
            metadata=metadata or {},
        )
        self._level = zstd_level
        self._entries: list[TensorEntry] = []
        # Frame sizes and hashes go into the header, which precedes the frames: stage them.
        fd, staged = tempfile.mkstemp(prefix=f".{self.path.name}.frames-", dir=self.path.parent)
        self._frames_path = Path(staged)
        self._frames: BinaryIO | None = os.fdopen(fd, "wb")

    def add(self, name: str, dtype: str, delta: torch.Tensor | np.ndarray) -> TensorEntry:
        """Sparsify, encode and append one float32 delta tensor; names must come in sorted order."""
        flat, shape = self._flat(name, delta)
        sp = self._fields["sparsifier"]
        self._append(name, dtype, shape, dare.sparsify(flat, sp.seed, name, sp.drop_rate))
        return self._entries[-1]

    def add_with_feedback(
        self, name: str, dtype: str, target: torch.Tensor | np.ndarray
    ) -> np.ndarray:
        """Append ``target`` so that a reader decodes its kept entries as they are, not scaled
        up by DARE's 1 / (1 - p), and return what the delta leaves out: ``target`` minus what
        a reader decodes, flat float32 (the dropped entries and the codec's rounding).

        Error feedback keeps that remainder and adds it to the next delta, which needs a
        contraction: a rescaled mask leaves out p / (1 - p) of the target's squared norm
        (9x at p = 0.9), so the remainder would grow round after round; an unscaled one
        leaves out p.
        """
        flat, shape = self._flat(name, target)
        sp = self._fields["sparsifier"]
        scale = dare.rescale_factor(sp.drop_rate)
        kept = dare.sparsify(flat, sp.seed, name, sp.drop_rate) / scale
        encoded = self._append(name, dtype, shape, kept)
        # what a reader computes from the frame (protocol.dare.densify), bit for bit
        decoded = self._codec.decode(encoded, kept.size)
        return flat - dare.densify(decoded, flat.size, sp.seed, name, sp.drop_rate)

    def _flat(self, name: str, delta: torch.Tensor | np.ndarray) -> tuple[np.ndarray, list[int]]:
        if self._frames is None:
            raise RuntimeError("DeltaWriter is closed")
        if self._entries and name <= self._entries[-1].name:
            raise ValueError(
                f"tensor {name!r} added after {self._entries[-1].name!r}; add in sorted order"
            )
        if isinstance(delta, torch.Tensor):
            array = delta.detach().to("cpu", torch.float32).numpy()
        else:
            array = delta
        flat = np.ascontiguousarray(array, dtype=np.float32).reshape(-1)
        return flat, list(array.shape)

    def _append(self, name: str, dtype: str, shape: list[int], values: np.ndarray) -> np.ndarray:
        """Encode, compress and stage the kept ``values`` of one tensor; the encoding."""
        if not np.isfinite(values).all():  # only kept values travel; dropped ones cannot harm
            raise NonFiniteError(f"tensor {name!r}: delta contains NaN or Inf")
        try:
            encoded = self._codec.encode(values)
            frame = frames.compress(encoded, self._level)
            entry = TensorEntry(
                name=name,
                dtype=dtype,
                shape=shape,
                kept=int(values.size),
                frame_bytes=len(frame),
                sha256=hashlib.sha256(frame).hexdigest(),
            )
        except ValueError as exc:  # codec range errors and pydantic ValidationError
            raise EncodeError(f"tensor {name!r}: {one_line(exc)}") from None
        self._frames.write(frame)  # only once the entry is valid: the staged frames stay in step
        self._entries.append(entry)
        return encoded

    def set_base_id(self, base_id: str) -> None:
        """Name the base once it is known (callers that hash the base while writing)."""
        self._fields["base_id"] = base_id

    def finish(self) -> str:
        """Write header, signature and frames to ``path``; return the delta id."""
        if self._frames is None:
            raise RuntimeError("DeltaWriter is closed")
        try:
            header = DeltaHeader(tensors=self._entries, **self._fields)
        except ValidationError as exc:
            raise EncodeError(f"{self.path}: {one_line(exc)}") from None
        header_bytes = header.model_dump_json().encode()
        if len(header_bytes) > MAX_HEADER_BYTES:
            raise DeltaFormatError(f"{self.path}: header of {len(header_bytes)} bytes is too large")
        prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(header_bytes)) + header_bytes
        signature = self._identity.sign(SIG_DOMAIN + prefix)
        self._frames.close()
        self._frames = None
        fd, staged = tempfile.mkstemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent)
        tmp = Path(staged)
        digest = BlobHasher()
        try:
            with os.fdopen(fd, "wb") as out, open(self._frames_path, "rb") as src:
                for piece in (prefix, signature):
                    out.write(piece)
                    digest.update(piece)
                while chunk := src.read(_COPY):
                    out.write(chunk)
                    digest.update(chunk)
                out.flush()
                # mkstemp creates 0600; a delta is meant to be shared.
                os.fchmod(out.fileno(), 0o644)
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
            fsync_dir(self.path.parent)
        finally:
            tmp.unlink(missing_ok=True)
            self._frames_path.unlink(missing_ok=True)
        return digest.hexdigest()

    def abort(self) -> None:
        """Drop everything written so far."""
        if self._frames is not None:
            self._frames.close()
            self._frames = None
        self._frames_path.unlink(missing_ok=True)

    def __enter__(self) -> DeltaWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None or self._frames is not None:
            self.abort()


class DeltaReader:
    """Opens and authenticates a ``.msd`` file; tensors decode on demand.

    :param path: the file.
    :param expected_base_id: refuse (BaseMismatchError) a delta against another base.
    :param expected_author: refuse (SignatureError) a delta signed by another key.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        expected_base_id: str | None = None,
        expected_author: str | None = None,
    ) -> None:
        self.path = Path(path)
        self._file: BinaryIO = open(self.path, "rb")  # noqa: SIM115
        try:
            self.header = self._read_header()
            self.codec = _codec_of(self.header)
            self._check_layout()
        except BaseException:
            self._file.close()
            raise
        if expected_author is not None and self.header.author != expected_author:
            self.close()
            raise SignatureError(
                f"{self.path}: signed by {self.header.author[:16]}…, expected {expected_author[:16]}…"
            )
        if expected_base_id is not None and self.header.base_id != expected_base_id:
            self.close()
            raise BaseMismatchError(
                f"{self.path}: delta is against base {self.header.base_id[:16]}…, not {expected_base_id[:16]}…"
            )

    def _fail(self, cls: type[DeltaFormatError], problem: str) -> DeltaFormatError:
        return cls(f"{self.path}: {problem}")

    def _read_header(self) -> DeltaHeader:
        prefix = self._file.read(_PREFIX.size)
        if len(prefix) < _PREFIX.size:
            raise self._fail(DeltaFormatError, "truncated: shorter than the fixed prefix")
        magic, version, flags, header_len = _PREFIX.unpack(prefix)
        if magic != MAGIC:
            raise self._fail(DeltaFormatError, "not a mergeswarm delta (bad magic)")
        if version != FORMAT_VERSION:
            raise self._fail(
                UnsupportedVersionError,
                f"format version {version}; this build reads {FORMAT_VERSION}",
            )
        if flags != 0:
            raise self._fail(UnsupportedVersionError, f"unknown flags {flags:#x}")
        if header_len > MAX_HEADER_BYTES:
            raise self._fail(
                DeltaFormatError, f"header of {header_len} bytes exceeds {MAX_HEADER_BYTES}"
            )
        header_bytes = self._file.read(header_len)
        signature = self._file.read(SIGNATURE_BYTES)
        if len(header_bytes) < header_len or len(signature) < SIGNATURE_BYTES:
            raise self._fail(DeltaFormatError, "truncated inside the header or signature")
        try:
            header = DeltaHeader.model_validate_json(header_bytes)
        except ValidationError as exc:
            raise self._fail(
                DeltaFormatError, f"invalid header at {one_line(exc, 'header')}"
            ) from None
        if not verify(header.author, signature, SIG_DOMAIN + prefix + header_bytes):
            raise self._fail(SignatureError, f"bad signature for author {header.author[:16]}…")
        self._payload_start = _PREFIX.size + header_len + SIGNATURE_BYTES
        return header

    def _check_layout(self) -> None:
        offsets, pos = {}, self._payload_start
        for entry in self.header.tensors:
            limit = frames.max_frame_size(self.codec.encoded_size(entry.kept))
            if entry.frame_bytes > limit:
                raise self._fail(
                    DeltaFormatError,
                    f"tensor {entry.name!r}: frame of {entry.frame_bytes} bytes exceeds the bound {limit}",
                )
            offsets[entry.name] = pos
            pos += entry.frame_bytes
        size = os.fstat(self._file.fileno()).st_size
        if size != pos:
            problem = "truncated" if size < pos else "trailing bytes after the last frame"
            raise self._fail(
                DeltaFormatError, f"{problem}: file has {size} bytes, header implies {pos}"
            )
        self._offsets = offsets
        self._entries = {e.name: e for e in self.header.tensors}

    @property
    def id(self) -> str:
        """The delta id: the blob id of the whole file."""
        return file_id(self.path)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def entry(self, name: str) -> TensorEntry:
        return self._entries[name]

    def names(self) -> list[str]:
        return [e.name for e in self.header.tensors]

    def read_values(self, name: str) -> np.ndarray:
        """The kept values of one tensor as float32, verified and decoded, not rescaled."""
        entry = self._entries[name]
        self._file.seek(self._offsets[name])
        frame = self._file.read(entry.frame_bytes)
        if len(frame) != entry.frame_bytes:
            raise self._fail(IntegrityError, f"tensor {name!r}: frame truncated")
        if hashlib.sha256(frame).hexdigest() != entry.sha256:
            raise self._fail(IntegrityError, f"tensor {name!r}: frame hash mismatch")
        try:
            raw = frames.decompress(
                frame, self.codec.encoded_size(entry.kept), f"{self.path}: tensor {name!r}"
            )
        except MemoryError:
            raise self._fail(
                IntegrityError, f"tensor {name!r}: declared size does not fit in memory"
            ) from None
        try:
            values = self.codec.decode(raw, entry.kept)
        except ValueError as exc:
            raise self._fail(IntegrityError, f"tensor {name!r}: {exc}") from None
        if not np.isfinite(values).all():
            raise self._fail(NonFiniteError, f"tensor {name!r}: values contain NaN or Inf")
        return values

    def read_tensor(self, name: str, *, rescale: bool = True) -> torch.Tensor:
        """The dense float32 delta of one tensor, in its shape (DARE survivors rescaled)."""
        entry = self._entries[name]
        values = self.read_values(name)
        sp = self.header.sparsifier
        try:
            with np.errstate(over="ignore"):  # overflow is reported below, as a format error
                flat = dare.densify(
                    values, entry.numel, sp.seed, name, sp.drop_rate, rescale=rescale
                )
        except ValueError as exc:
            raise self._fail(IntegrityError, str(exc)) from None
        except MemoryError:
            raise self._fail(
                IntegrityError, f"tensor {name!r}: {entry.numel} elements do not fit in memory"
            ) from None
        if rescale and not np.isfinite(flat).all():
            raise self._fail(
                NonFiniteError, f"tensor {name!r}: values overflow once rescaled by 1/(1-p)"
            )
        return torch.from_numpy(flat).reshape(entry.shape)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> DeltaReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
