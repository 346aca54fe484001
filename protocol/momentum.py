"""The outer optimizer's momentum as a blob: the chain state one aggregator hands the next.

A round merged with ``outer_optimizer = "nesterov"`` leaves a momentum buffer, one
float32 tensor per floating-point tensor of the base, which the next round's outer
step needs. It travels as a content-addressed blob that the head names
(``Head.momentum_id``), so a standby taking over a lease, an aggregator restarted
after a crash and one joining late all fetch it, checked by its id like any blob,
and continue the chain exactly.

Layout: a plain safetensors file. An 8-byte little-endian header length, the JSON
header (``{"__metadata__": {"format": "pt"}}`` and, per tensor, dtype ``F32``, shape
and data offsets, padded with spaces to 8 bytes), then the raw little-endian float32
values, tensors in the base's name order. The same values give the same bytes and
the same id. Size: 4 bytes per floating-point parameter of the base.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

import torch

from protocol.errors import MergeswarmError, ModelDirError
from protocol.model_dir import (
    FLOAT_DTYPES,
    ModelDir,
    TensorInfo,
    safetensors_header,
    write_tensor,
)
from protocol.numerics import all_finite

MOMENTUM_DTYPE = "F32"


class MomentumError(MergeswarmError):
    """A momentum file does not fit its base, or holds values no outer step can use."""


def momentum_layout(base: ModelDir) -> list[TensorInfo]:
    """The tensors of a momentum file for ``base``: its float tensors, as float32, in order."""
    return [
        TensorInfo(name, MOMENTUM_DTYPE, info.shape, Path())
        for name in base.names()
        if (info := base.tensors[name]).dtype in FLOAT_DTYPES
    ]


def momentum_size(base: ModelDir) -> int:
    """Bytes of a momentum file for ``base`` (checked before one is fetched)."""
    layout = momentum_layout(base)
    return len(safetensors_header(layout)) + sum(i.nbytes for i in layout)


class MomentumWriter:
    """Writes a momentum file tensor by tensor, in the base's order (peak memory: one tensor).

    The file appears only once every tensor is in and synced; an error removes it.
    """

    def __init__(self, path: Path, base: ModelDir) -> None:
        self.path = path
        self._layout = momentum_layout(base)
        self._next = 0
        self._tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed in close()/abort()
        self._file.write(safetensors_header(self._layout))

    def add(self, name: str, momentum: torch.Tensor) -> None:
        if self._next >= len(self._layout):
            raise MomentumError(f"{self.path}: tensor {name!r} is more than the base has")
        write_tensor(self._file, self._layout[self._next], name, momentum)
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._layout):
            missing = self._layout[self._next].name
            self.abort()
            raise MomentumError(f"{self.path}: tensor {missing!r} was never written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> MomentumWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


class MomentumReader:
    """A momentum file checked against its base: the base's float tensors, float32, no more."""

    def __init__(self, path: Path, base: ModelDir) -> None:
        try:
            self._md = ModelDir(path)
        except ModelDirError as exc:
            raise MomentumError(f"momentum {path.name[:16]}: {exc}") from None
        want = {i.name: i.shape for i in momentum_layout(base)}
        got = {n: i.shape for n, i in self._md.tensors.items()}
        odd = sorted(set(want).symmetric_difference(got))
        if odd:
            self._md.close()
            raise MomentumError(
                f"momentum {path.name[:16]}: tensor {odd[0]!r} is not in both it and the base"
            )
        for name, info in self._md.tensors.items():
            if info.dtype != MOMENTUM_DTYPE or info.shape != want[name]:
                self._md.close()
                raise MomentumError(
                    f"momentum {path.name[:16]}: {name} is {info.dtype}{list(info.shape)}, "
                    f"expected {MOMENTUM_DTYPE}{list(want[name])}"
                )

    def tensor(self, name: str) -> torch.Tensor:
        t = self._md.tensor(name)
        if not all_finite(t):
            raise MomentumError(f"momentum tensor {name!r} holds NaN or Inf")
        return t

    def close(self) -> None:
        self._md.close()
