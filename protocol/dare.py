"""DARE sparsification with keep-masks that any reader regenerates bit for bit.

The mask is a pure function of (seed, tensor name, element index), so a delta
carries only the kept values; positions are recomputed on read.

Definition (version ``splitmix64-pairs-v1``; pinned by golden-vector tests):

* ``key = u64_le(sha256(b"mergeswarm/dare/v1\\0" + u64_le(seed) + utf8(name))[:8])``
* elements are numbered in row-major (C) order; element ``i`` belongs to the
  pair ``j = i // 2``. For each pair, ``z = key + (j + 1) * 0x9E3779B97F4A7C15``
  (mod 2**64) goes through the SplitMix64 finalizer
  ``z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB; z ^= z >> 31``.
  Element ``2j`` draws ``u = z & 0xFFFFFFFF``, element ``2j + 1`` draws ``u = z >> 32``.
* with drop rate ``p`` in [0, 1), ``threshold = floor(p * 2**32)``; element ``i``
  is kept iff ``u >= threshold``, so it survives with probability
  ``1 - threshold / 2**32`` (= 1 - p up to 2**-32).
* survivors are rescaled by ``float32(1 / (1 - p))`` when densified.

Only integer arithmetic decides the mask, so it is identical on every OS, CPU
and numpy version. Work proceeds in chunks of ``CHUNK`` elements to stay in cache.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator

import numpy as np

PRF_NAME = "splitmix64-pairs-v1"
CHUNK = 1 << 16  # elements per mask chunk; even, so chunks start on a pair boundary

_U8 = np.dtype("<u8")
_U4 = np.dtype("<u4")
_GAMMA = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def tensor_key(seed: int, name: str) -> int:
    """The 64-bit PRF key of one tensor of a delta."""
    if not 0 <= seed <= _MASK64:
        raise ValueError(f"DARE seed must be in [0, 2**64), got {seed}")
    digest = hashlib.sha256(
        b"mergeswarm/dare/v1\0" + seed.to_bytes(8, "little") + name.encode("utf-8")
    ).digest()
    return int.from_bytes(digest[:8], "little")


def drop_threshold(drop_rate: float) -> int:
    """The integer threshold below which a 32-bit draw is dropped."""
    if not (isinstance(drop_rate, float | int) and 0.0 <= drop_rate < 1.0):
        raise ValueError(f"DARE drop rate must be in [0, 1), got {drop_rate!r}")
    return math.floor(float(drop_rate) * 2**32)


def rescale_factor(drop_rate: float) -> np.float32:
    """What survivors are multiplied by: float32(1 / (1 - p))."""
    drop_threshold(drop_rate)  # validates
    return np.float32(1.0 / (1.0 - float(drop_rate)))


class _MaskStream:
    """Reusable buffers for generating consecutive mask chunks of one tensor."""

    def __init__(self) -> None:
        self._steps = np.arange(1, CHUNK // 2 + 1, dtype=_U8) * np.uint64(_GAMMA)
        self._z = np.empty(CHUNK // 2, _U8)
        self._tmp = np.empty(CHUNK // 2, _U8)

    def draws(self, key: int, start: int, count: int) -> np.ndarray:
        """32-bit draws for elements [start, start + count); start must be even, count <= CHUNK."""
        pairs = (count + 1) // 2
        z, tmp = self._z[:pairs], self._tmp[:pairs]
        offset = (key + (start // 2) * _GAMMA) & _MASK64
        np.add(self._steps[:pairs], np.uint64(offset), out=z)
        for shift, mult in ((30, _M1), (27, _M2)):
            np.right_shift(z, np.uint64(shift), out=tmp)
            np.bitwise_xor(z, tmp, out=z)
            np.multiply(z, mult, out=z)
        np.right_shift(z, np.uint64(31), out=tmp)
        np.bitwise_xor(z, tmp, out=z)
        return z.view(_U4)[:count]


def iter_keep_masks(
    seed: int, name: str, numel: int, drop_rate: float
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, keep)`` for consecutive chunks covering ``numel`` elements.

    ``keep`` is a bool array valid only until the next iteration.
    """
    key = tensor_key(seed, name)
    threshold = np.uint32(drop_threshold(drop_rate))
    stream = _MaskStream()
    keep = np.empty(CHUNK, dtype=bool)
    for start in range(0, numel, CHUNK):
        count = min(CHUNK, numel - start)
        out = keep[:count]
        np.greater_equal(stream.draws(key, start, count), threshold, out=out)
        yield start, out


def keep_mask(seed: int, name: str, numel: int, drop_rate: float) -> np.ndarray:
    """The whole keep-mask of a tensor as a flat bool array (tests and small tensors)."""
    mask = np.empty(numel, dtype=bool)
    for start, keep in iter_keep_masks(seed, name, numel, drop_rate):
        mask[start : start + keep.size] = keep
    return mask


def sparsify(flat: np.ndarray, seed: int, name: str, drop_rate: float) -> np.ndarray:
    """The kept values of a flat float32 delta, in element order, not rescaled."""
    if flat.ndim != 1:
        raise ValueError(f"sparsify takes a flat array, got shape {flat.shape}")
    # Sized for the worst case but only the pages written become resident, so
    # one pass suffices without holding more memory than the kept values.
    out = np.empty(flat.size, dtype=flat.dtype)
    pos = 0
    for start, keep in iter_keep_masks(seed, name, flat.size, drop_rate):
        count = int(np.count_nonzero(keep))
        np.compress(keep, flat[start : start + keep.size], out=out[pos : pos + count])
        pos += count
    return out[:pos]


def count_kept(seed: int, name: str, numel: int, drop_rate: float) -> int:
    """How many elements the mask keeps, without materialising it."""
    return sum(
        int(np.count_nonzero(keep)) for _, keep in iter_keep_masks(seed, name, numel, drop_rate)
    )


def densify(
    values: np.ndarray,
    numel: int,
    seed: int,
    name: str,
    drop_rate: float,
    *,
    rescale: bool = True,
) -> np.ndarray:
    """Scatter kept values back to a dense flat float32 array of ``numel`` elements.

    Raises ValueError when the mask keeps a different number of elements than
    ``values`` holds (a lying or mismatched delta).
    """
    out = np.zeros(numel, dtype=np.float32)
    source = values.astype(np.float32, copy=False)
    scale = rescale_factor(drop_rate) if rescale else None
    pos = 0
    for start, keep in iter_keep_masks(seed, name, numel, drop_rate):
        idx = np.flatnonzero(keep)
        if pos + idx.size > source.size:
            raise ValueError(
                f"tensor {name!r}: the mask keeps more than the {source.size} values supplied"
            )
        piece = source[pos : pos + idx.size]
        np.put(out[start : start + keep.size], idx, piece if scale is None else piece * scale)
        pos += idx.size
    if pos != source.size:
        raise ValueError(
            f"tensor {name!r}: the mask keeps {pos} values but {source.size} were supplied"
        )
    return out
