"""What a delta means: ``child = base + sum(decoded deltas)``, and how one is made.

Both directions stream one tensor at a time. Only floating-point tensors
travel in a delta; other tensors (integer buffers) must be unchanged by
fine-tuning and are carried over from the base.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from protocol import frames
from protocol.constants import DEFAULT_CODEC, DEFAULT_DROP_RATE
from protocol.container import DeltaHeader, DeltaReader, DeltaWriter
from protocol.errors import BaseMismatchError, EncodeError
from protocol.identity import Identity
from protocol.ids import BaseHasher, base_id
from protocol.model_dir import DTYPES, FLOAT_DTYPES, ModelDir, write_model_dir
from protocol.numerics import all_finite

Progress = Callable[[int], None]


def _tick(progress: Progress | None, nbytes: int) -> None:
    if progress is not None:
        progress(nbytes)


def new_seed() -> int:
    """A fresh DARE seed: 63 random bits (fits every signed 64-bit field on the way)."""
    return secrets.randbits(63)


class TensorMap:
    """Trained tensors held in memory, readable where a fine-tuned model directory is.

    :param tensors: name -> tensor, the base's names and shapes (any float dtype).
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], label: str = "<trained model>") -> None:
        self._tensors = tensors
        self.path = Path(label)
        self.tensors = {n: _Shape(tuple(t.shape)) for n, t in tensors.items()}

    def tensor(self, name: str) -> torch.Tensor:
        return self._tensors[name].detach().cpu()


@dataclass(frozen=True)
class _Shape:
    shape: tuple[int, ...]


def create_delta(
    base: str | os.PathLike[str],
    finetuned: str | os.PathLike[str] | TensorMap,
    out: str | os.PathLike[str],
    *,
    identity: Identity,
    drop_rate: float = DEFAULT_DROP_RATE,
    seed: int | None = None,
    codec: str = DEFAULT_CODEC,
    block_size: int | None = None,
    zstd_level: int = frames.DEFAULT_LEVEL,
    metadata: dict[str, Any] | None = None,
    progress: Progress | None = None,
    carry: Mapping[str, torch.Tensor] | None = None,
    left: dict[str, torch.Tensor] | None = None,
) -> tuple[str, DeltaHeader]:
    """Write ``finetuned - base`` as a DARE-sparsified, signed ``.msd``; return (id, header).

    The base id is hashed in the same pass. ``progress`` receives base bytes processed.

    Error feedback: with ``left`` (a dict to fill), the delta is ``finetuned - base +
    carry`` (``carry``: what earlier deltas left out, by tensor name, absent ones zero), its
    kept entries are decoded as they are rather than scaled up by DARE's 1 / (1 - p)
    (:meth:`DeltaWriter.add_with_feedback`), and ``left[name]`` receives what this delta
    leaves out of each float tensor, shaped like it, in float32: sent + left = the target.
    """
    if carry is not None and left is None:
        raise ValueError("carry is error feedback's: pass left too, to receive what is left out")
    base_md = ModelDir(base)
    ft_md = finetuned if isinstance(finetuned, TensorMap) else ModelDir(finetuned)
    _check_same_tensors(base_md, ft_md)
    hasher = BaseHasher()
    placeholder = "0" * 64  # the real id is known once every base tensor is hashed
    writer = DeltaWriter(
        out,
        base_id=placeholder,
        identity=identity,
        drop_rate=drop_rate,
        seed=new_seed() if seed is None else seed,
        codec=codec,
        block_size=block_size,
        zstd_level=zstd_level,
        metadata=metadata,
    )
    with writer:
        for name in base_md.names():
            info = base_md.tensors[name]
            b = base_md.tensor(name)
            hasher.update(name, info.dtype, b)
            f = ft_md.tensor(name)
            if info.dtype in FLOAT_DTYPES:
                wide = torch.promote_types(b.dtype, torch.float32)  # float64 stays float64
                delta = f.to(wide) - b.to(wide)
                if left is None:
                    writer.add(name, info.dtype, delta)
                else:
                    if carry is not None and name in carry:
                        delta += carry[name].to(wide)
                    rest = writer.add_with_feedback(name, info.dtype, delta)
                    left[name] = torch.from_numpy(rest).reshape(delta.shape)
            elif not torch.equal(b, f.to(b.dtype)):
                raise BaseMismatchError(
                    f"{ft_md.path}: non-float tensor {name!r} differs from the base; "
                    "only floating-point weights can be trained into a delta"
                )
            _tick(progress, info.nbytes)
        writer.set_base_id(hasher.hexdigest())
        delta_id = writer.finish()
    with DeltaReader(out) as reader:
        return delta_id, reader.header


def _check_same_tensors(base: ModelDir, finetuned: ModelDir | TensorMap) -> None:
    missing = sorted(set(base.tensors) - set(finetuned.tensors))
    extra = sorted(set(finetuned.tensors) - set(base.tensors))
    if missing or extra:
        which = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}, which the base lacks"
        raise BaseMismatchError(
            f"{finetuned.path}: {which} ({len(missing)} missing, {len(extra)} extra tensors); "
            "a fine-tune must keep the base's architecture"
        )
    for name, info in base.tensors.items():
        other = finetuned.tensors[name]
        if other.shape != info.shape:
            raise BaseMismatchError(
                f"{finetuned.path}: tensor {name!r} has shape {list(other.shape)}, "
                f"the base has {list(info.shape)}"
            )


def check_fits(reader: DeltaReader, base: ModelDir, base_hex: str) -> None:
    """Refuse a delta whose base id, tensor names, shapes or dtypes do not match ``base``."""
    h = reader.header
    if h.base_id != base_hex:
        raise BaseMismatchError(
            f"{reader.path}: made against base {h.base_id[:16]}…, but {base.path} is {base_hex[:16]}…"
        )
    for entry in h.tensors:
        info = base.tensors.get(entry.name)
        if info is None:
            raise BaseMismatchError(f"{reader.path}: tensor {entry.name!r} is not in {base.path}")
        if tuple(entry.shape) != info.shape or entry.dtype != info.dtype:
            raise BaseMismatchError(
                f"{reader.path}: tensor {entry.name!r} is {entry.dtype}{entry.shape}, "
                f"the base has {info.dtype}{list(info.shape)}"
            )


def apply_deltas(
    base: str | os.PathLike[str],
    deltas: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    progress: Progress | None = None,
) -> Path:
    """Write ``base + sum(deltas)`` as a model directory shaped like ``base``.

    Every delta is authenticated and checked against the base (id, names,
    shapes, dtypes) before anything is written. Sums accumulate in float32
    and are cast to each tensor's base dtype. ``progress`` receives base
    bytes: first while hashing the base, then while writing.
    """
    base_md = ModelDir(base)
    base_hex = base_id(base_md, progress)
    readers: list[DeltaReader] = []
    try:
        seen: dict[str, Path] = {}
        for path in deltas:
            readers.append(DeltaReader(path))
            check_fits(readers[-1], base_md, base_hex)
            delta_id = readers[-1].id
            if delta_id in seen:
                raise BaseMismatchError(
                    f"{path}: the same delta as {seen[delta_id]}; each delta counts once"
                )
            seen[delta_id] = Path(path)

        def merged() -> Iterator[tuple[str, torch.Tensor]]:
            for name in base_md.names():
                info = base_md.tensors[name]
                tensor = base_md.tensor(name)
                touching = [r for r in readers if name in r]
                if touching:
                    acc = tensor.to(torch.promote_types(tensor.dtype, torch.float32))
                    for reader in touching:
                        acc += reader.read_tensor(name)
                    tensor = acc.to(DTYPES[info.dtype])
                    if not all_finite(tensor):
                        raise EncodeError(
                            f"tensor {name!r}: base + deltas overflows {info.dtype}; "
                            "the deltas are too large for this base"
                        )
                _tick(progress, info.nbytes)
                yield name, tensor

        return write_model_dir(out, base_md, merged())
    finally:
        for reader in readers:
            reader.close()
