"""Value codecs: how the kept float32 values of one tensor become bytes and back.

Selected by name through ``CODECS``. Every codec is deterministic across
machines (IEEE round-to-nearest-even, integer byte layouts, little-endian).

Error bounds, for a value ``x`` and its decoded ``y``:

* ``fp32``: exact, ``y == x``.
* ``bf16``: ``|y - x| <= 2**-8 * |x| + 2**-134`` (8 significant bits, round to
  nearest even; the absolute term covers subnormals); same exponent range as
  float32, but values above 3.3895e38 (which would round to Inf) are refused.
* ``fp16``: ``|y - x| <= 2**-11 * |x| + 2**-25`` (11 significant bits; the
  absolute term covers the subnormal range below 6.1e-5). Values with
  ``|x| > 65504`` cannot be encoded and are refused.
* ``int8``: blocks of ``block_size`` consecutive values share a float32 scale
  ``s = absmax / 127``; ``y = s * rint(x / s)``, so ``|y - x| <= s / 2 * (1 + 2**-15)``,
  i.e. at most ``absmax_of_block / 254`` plus float32 rounding (the quotient and the
  product each round by up to ``127 * s * 2**-24``). A block whose absmax is below
  ``TINY_BLOCK`` (where the scale would be subnormal) decodes as zeros, so its error is
  at most its absmax (< 1.5e-36).
* ``int4``: the same with ``s = absmax / 7`` and codes in [-7, 7], two per byte:
  ``|y - x| <= s / 2 * (1 + 2**-19)``, i.e. at most ``absmax_of_block / 14`` plus float32
  rounding. A block whose absmax is below ``7 * 2**-126`` decodes as zeros.
* ``sign``: one bit a value, blocks of ``block_size`` values sharing a float32 scale
  ``s = mean(|x|)`` (the ``s`` that minimises the squared error of ``s * sign(x)``; summed
  in integers, so the same on every machine); ``y = -s`` for negative ``x``, else ``+s``.
  Per value ``|y - x| <= absmax_of_block``, and over a block of ``m`` values
  ``sum((y - x)**2) = sum(x**2) - m * s**2 <= sum(x**2)`` (float rounding aside). A block
  whose mean ``|x|`` is below ``2**-126`` decodes as zeros. Adam's updates have nearly
  uniform magnitudes, so their signs and a mean magnitude keep much of them, and the
  errors of several volunteers' deltas partly average out in the merge: on the tiny model
  it kept the most gain per byte in scripts/bench_compression.py's swarm setting, on
  SmolLM2-135M less than int4 (docs/benchmarks.md).

The float codecs store bytes plane by plane (all first bytes, then all second
bytes, ...): exponent bytes of fine-tuning deltas repeat a lot, and zstd only
sees that when they are adjacent.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
import torch

Buffer = bytes | bytearray | memoryview | np.ndarray  # anything exposing the buffer protocol
_F4 = np.dtype("<f4")
TINY_BLOCK = 127 * 2.0**-126  # int8's tiny: blocks below this absmax are stored as zeros
_U2 = np.dtype("<u2")


def to_planes(raw: np.ndarray, width: int, chunk: int = 1 << 16) -> np.ndarray:
    """(n * width,) little-endian bytes -> width planes of n bytes each, as one uint8 array."""
    columns = raw.view(np.uint8).reshape(-1, width)  # (n, width)
    planes = np.empty((width, columns.shape[0]), np.uint8)
    for start in range(0, columns.shape[0], chunk):  # strided copies stay in cache
        for k in range(width):
            planes[k, start : start + chunk] = columns[start : start + chunk, k]
    return planes.reshape(-1)


def from_planes(buf: Buffer, width: int) -> np.ndarray:
    """Inverse of to_planes: a (n * width,) uint8 array in element order."""
    planes = np.frombuffer(buf, dtype=np.uint8).reshape(width, -1)  # (width, n)
    columns = np.empty((planes.shape[1], width), np.uint8)
    for k in range(width):
        columns[:, k] = planes[k]
    return columns.reshape(-1)


def _bf16_bits(values: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounding to nearest even with integer ops only."""
    bits = values.view("<u4")
    out = np.empty(bits.size, _U2)
    scratch = np.empty(min(chunk, bits.size), "<u4")
    for start in range(0, bits.size, chunk):  # in cache-sized pieces, in place
        b = bits[start : start + chunk]
        r = scratch[: b.size]
        np.right_shift(b, np.uint32(16), out=r)
        np.bitwise_and(r, np.uint32(1), out=r)
        np.add(r, np.uint32(0x7FFF), out=r)
        np.add(r, b, out=r)
        np.right_shift(r, np.uint32(16), out=r)
        out[start : start + chunk] = r
    return out


class ValueCodec(ABC):
    """Encodes a flat float32 array; the encoded size depends only on the count."""

    name: ClassVar[str]

    def __init__(self, block_size: int = 0) -> None:
        self.block_size = block_size

    @abstractmethod
    def encoded_size(self, count: int) -> int:
        """Exact byte length of ``encode`` for ``count`` values."""

    @abstractmethod
    def encode(self, values: np.ndarray) -> np.ndarray:
        """Encode finite float32 values to a flat uint8 array (a buffer, not copied to bytes).

        Raises ValueError for values out of the codec's range.
        """

    @abstractmethod
    def decode(self, buf: Buffer, count: int) -> np.ndarray:
        """Decode to a new float32 array; ``len(buf)`` must equal ``encoded_size(count)``."""

    def _check_size(self, buf: Buffer, count: int) -> None:
        if len(buf) != self.encoded_size(count):
            raise ValueError(
                f"codec {self.name}: {len(buf)} bytes cannot hold {count} values "
                f"(expected {self.encoded_size(count)})"
            )


class Fp32Codec(ValueCodec):
    name = "fp32"

    def encoded_size(self, count: int) -> int:
        return 4 * count

    def encode(self, values: np.ndarray) -> np.ndarray:
        return to_planes(np.ascontiguousarray(values, dtype=_F4), 4)

    def decode(self, buf: Buffer, count: int) -> np.ndarray:
        self._check_size(buf, count)
        return from_planes(buf, 4).view(_F4)


class Fp16Codec(ValueCodec):
    name = "fp16"

    def encoded_size(self, count: int) -> int:
        return 2 * count

    def encode(self, values: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(values, dtype=np.float32)
        worst = float(np.abs(x).max()) if x.size else 0.0
        if worst > 65504.0:
            raise ValueError(f"codec fp16: |value| {worst:g} exceeds 65504; use bf16 or fp32")
        # torch's conversion is IEEE round-to-nearest-even like numpy's, and 5x faster;
        # tests pin it against numpy. float32 subnormals all round to 0 in fp16 either way.
        half = torch.from_numpy(x).to(torch.float16).numpy()
        return to_planes(half, 2)

    def decode(self, buf: Buffer, count: int) -> np.ndarray:
        self._check_size(buf, count)
        return torch.from_numpy(from_planes(buf, 2).view("<f2")).float().numpy()


class Bf16Codec(ValueCodec):
    name = "bf16"

    def encoded_size(self, count: int) -> int:
        return 2 * count

    MAX = 3.3895313892515355e38  # the largest finite bfloat16

    def encode(self, values: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(values, dtype=_F4)
        # float32 values above MAX round to Inf: refuse rather than sign an unreadable file.
        worst = float(np.abs(x).max()) if x.size else 0.0
        if worst > self.MAX:
            raise ValueError(
                f"codec bf16: |value| {worst:g} exceeds the largest bfloat16; use fp32"
            )
        return to_planes(_bf16_bits(x), 2)

    def decode(self, buf: Buffer, count: int) -> np.ndarray:
        self._check_size(buf, count)
        bits = from_planes(buf, 2).view(_U2).astype("<u4")
        np.left_shift(bits, np.uint32(16), out=bits)
        return bits.view(_F4)


class BlockScaledCodec(ValueCodec):
    """Blocks of ``block_size`` values share a float32 scale, by default ``s = absmax / LEVELS``.

    Layout: ``ceil(n / block)`` float32 scales, then the codes, by default ``rint(x / s)``
    clipped to ``[-LEVELS, LEVELS]``, laid out by ``_pack``; ``y = code * s``. A block whose
    scale would be subnormal (by default: absmax below ``tiny``) is stored with scale 0 and
    decodes as zeros.

    :param block_size: values per scale, in [8, 65536] (default ``DEFAULT_BLOCK``).
    """

    LEVELS: ClassVar[int]
    DEFAULT_BLOCK: ClassVar[int]

    def __init__(self, block_size: int | None = None) -> None:
        block_size = self.DEFAULT_BLOCK if block_size is None else block_size
        if not 8 <= block_size <= 1 << 16:
            raise ValueError(
                f"codec {self.name}: block size must be in [8, 65536], got {block_size}"
            )
        super().__init__(block_size)

    @property
    def tiny(self) -> float:
        return self.LEVELS * 2.0**-126  # the smallest absmax whose scale is a normal float32

    def _blocks(self, count: int) -> int:
        return -(-count // self.block_size)

    @abstractmethod
    def _code_bytes(self, count: int) -> int:
        """Bytes that hold ``count`` codes."""

    @abstractmethod
    def _pack(self, codes: np.ndarray, count: int) -> np.ndarray:
        """(nblocks * block,) int8 codes, zero past ``count`` -> ``_code_bytes(count)`` bytes."""

    @abstractmethod
    def _unpack(self, buf: np.ndarray, count: int) -> np.ndarray:
        """Inverse of _pack: (nblocks * block,) int8 codes; ValueError if not a valid layout."""

    def encoded_size(self, count: int) -> int:
        return 4 * self._blocks(count) + self._code_bytes(count)

    def encode(self, values: np.ndarray) -> np.ndarray:
        x = values.astype(np.float32, copy=False)
        n, b = x.size, self.block_size
        padded = np.zeros(self._blocks(n) * b, np.float32)
        padded[:n] = x
        blocks = padded.reshape(-1, b)  # (nblocks, block)
        scales = self._scales(blocks, n)
        codes = self._codes(blocks, scales)
        out = np.empty(self.encoded_size(n), np.uint8)
        out[: 4 * scales.size] = scales.astype(_F4).view(np.uint8)
        out[4 * scales.size :] = self._pack(codes.reshape(-1), n)
        return out

    def _scales(self, blocks: np.ndarray, count: int) -> np.ndarray:
        """(nblocks, block) values, zero past ``count`` -> (nblocks,) float32 scales."""
        absmax = np.abs(blocks).max(axis=1)
        scales = np.where(absmax < self.tiny, np.float32(0), absmax / np.float32(self.LEVELS))
        scales = scales.astype(np.float32)
        # Near the largest float32, LEVELS * fl(absmax / LEVELS) can round past it and decode
        # to Inf: one step down keeps the top code's value finite (its code clips to LEVELS).
        with np.errstate(over="ignore"):
            over = np.isinf(scales * np.float32(self.LEVELS))
        return np.where(over, np.nextafter(scales, np.float32(0)), scales)

    def _codes(self, blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
        """(nblocks, block) values and their (nblocks,) scales -> (nblocks, block) int8 codes."""
        safe = np.where(scales > 0, scales, np.float32(1))
        codes = np.clip(np.rint(blocks / safe[:, None]), -self.LEVELS, self.LEVELS)
        return codes.astype(np.int8)

    def decode(self, buf: Buffer, count: int) -> np.ndarray:
        self._check_size(buf, count)
        nblocks = self._blocks(count)
        scales = np.frombuffer(buf, dtype=_F4, count=nblocks)
        if not np.isfinite(scales).all() or (scales < 0).any():
            raise ValueError(f"codec {self.name}: a block scale is negative or not finite")
        codes = self._unpack(np.frombuffer(buf, dtype=np.uint8, offset=4 * nblocks), count)
        blocks = codes.reshape(nblocks, self.block_size)  # (nblocks, block)
        self._check_blocks(scales, blocks)
        values = np.multiply(blocks, scales[:, None], dtype=np.float32)
        return values.reshape(-1)[:count]

    def _check_blocks(self, scales: np.ndarray, codes: np.ndarray) -> None:
        """Refuse what the encoder never writes; (nblocks,) scales, (nblocks, block) codes."""


class Int8BlockCodec(BlockScaledCodec):
    """Codes are ``n`` int8 bytes."""

    name = "int8"
    LEVELS = 127
    DEFAULT_BLOCK = 128

    def _code_bytes(self, count: int) -> int:
        return count

    def _pack(self, codes: np.ndarray, count: int) -> np.ndarray:
        return codes[:count].view(np.uint8)

    def _unpack(self, buf: np.ndarray, count: int) -> np.ndarray:
        codes = np.zeros(self._blocks(count) * self.block_size, np.int8)
        codes[:count] = buf.view(np.int8)
        return codes


class Int4BlockCodec(BlockScaledCodec):
    """Codes in [-7, 7] are 4-bit two's complement, two per byte: value ``2i`` in the low
    nibble of byte ``i``, ``2i + 1`` in the high one (0 past an odd count).

    Decoding refuses every byte string the encoder cannot write, so each decodable string is
    the encoding of what it decodes to: nibble 0x8 (-8), a nonzero nibble past the count, a
    scale of -0.0, codes under a zero scale, a nonzero scale that is subnormal, whose block has
    no code of +-7, or that ``absmax / 7`` does not give back (``fl(fl(7 s) / 7) != s``:
    the encoder's scales always pass, checked over every float32 mantissa).
    """

    name = "int4"
    LEVELS = 7
    # 4 bytes of scale per 64 values cost 0.5 bit per value; with only 15 levels the step is
    # absmax / 7, so smaller blocks than int8's (fewer outliers per scale) bound the error tighter.
    DEFAULT_BLOCK = 64

    def __init__(self, block_size: int | None = None) -> None:
        super().__init__(block_size)
        if self.block_size % 2:
            # even blocks start on a byte; the padding of the last one fills the odd nibble
            raise ValueError(f"codec int4: block size must be even, got {self.block_size}")

    def _code_bytes(self, count: int) -> int:
        return -(-count // 2)

    def _pack(self, codes: np.ndarray, count: int) -> np.ndarray:
        nibbles = codes[: 2 * self._code_bytes(count)].view(np.uint8) & np.uint8(0x0F)
        return nibbles[0::2] | (nibbles[1::2] << np.uint8(4))

    def _unpack(self, buf: np.ndarray, count: int) -> np.ndarray:
        nibbles = np.zeros(self._blocks(count) * self.block_size, np.uint8)
        nibbles[0 : 2 * buf.size : 2] = buf & np.uint8(0x0F)
        nibbles[1 : 2 * buf.size : 2] = buf >> np.uint8(4)
        bad = np.flatnonzero(nibbles == 8)
        if bad.size:
            raise ValueError(
                f"codec int4: value {bad[0]} has nibble 0x8 (-8); codes are in [-7, 7]"
            )
        if nibbles[count:].any():
            raise ValueError(f"codec int4: the nibble past the last of {count} values is not 0")
        np.bitwise_xor(nibbles, np.uint8(8), out=nibbles)  # 0..7 -> 8..15, 8..15 -> 0..7
        codes = nibbles.view(np.int8)
        codes -= np.int8(8)  # sign-extended
        return codes

    def _check_blocks(self, scales: np.ndarray, codes: np.ndarray) -> None:
        peak = np.abs(codes).max(axis=1)  # (nblocks,); no -8 is left to overflow
        with np.errstate(over="ignore"):
            given_back = (scales * np.float32(7)) / np.float32(7)
        zero = scales == 0
        wrong = np.where(
            zero,
            np.signbit(scales) | (peak != 0),
            (peak != 7) | (scales < 2.0**-126) | (given_back != scales),
        )
        bad = np.flatnonzero(wrong)
        if bad.size:
            j = bad[0]
            raise ValueError(
                f"codec int4: block {j} (scale {float(scales[j])!r}, largest |code| {int(peak[j])}) "
                "is not one the encoder writes"
            )


class SignBlockCodec(BlockScaledCodec):
    """One bit a value, 1 for negative and 0 for zero or positive: value ``8i + j`` is bit
    ``j`` of byte ``i`` (``np.packbits(..., bitorder="little")``), 0 past the count. Codes are
    -1 and +1, the scale is the block's mean ``|x|`` (the last block's over its own values).

    Decoding refuses every byte string the encoder cannot write: a set bit past the count, a
    scale of -0.0, set bits under a zero scale, a nonzero scale that is subnormal. Every other
    scale is one the encoder writes: the mean of ``m`` copies of ``s`` is ``s``.
    """

    name = "sign"
    LEVELS = 1
    # 4 bytes of scale per 256 values cost 1/8 bit per value, so a dense delta costs 1.125
    # bits (0.14 bytes) a parameter; blocks of 64 would spend a third of it on scales.
    DEFAULT_BLOCK = 256
    UNITS = 46  # the mean adds |x| in units of 2**-46 of the block's binade: < 2**62 in all

    def __init__(self, block_size: int | None = None) -> None:
        super().__init__(block_size)
        if self.block_size % 8:
            # blocks start on a byte: a block's bits are whole bytes
            raise ValueError(
                f"codec sign: block size must be a multiple of 8, got {self.block_size}"
            )

    def _code_bytes(self, count: int) -> int:
        return -(-count // 8)

    def _scales(self, blocks: np.ndarray, count: int) -> np.ndarray:
        # An integer sum is exact, so no order of additions enters the scale: each |x| is
        # truncated to units of 2**(top - UNITS), absmax < 2**top, which moves the mean by
        # under 2**-29 of itself (it is at least absmax / 65536) before it rounds to float32.
        magnitudes = np.abs(blocks)  # (nblocks, block)
        _, top = np.frexp(magnitudes.max(axis=1))
        units = np.ldexp(magnitudes, (self.UNITS - top)[:, None])  # exact: < 2**46, float32
        total = units.astype(np.int64).sum(axis=1).astype(np.float64)
        counts = np.full(blocks.shape[0], self.block_size, np.float64)
        if counts.size:
            counts[-1] = count - (counts.size - 1) * self.block_size  # the last block's values
        mean = np.ldexp(total, top - self.UNITS) / counts
        return np.where(mean < self.tiny, 0, mean).astype(np.float32)

    def _codes(self, blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
        negative = blocks < 0  # (nblocks, block)
        negative[scales == 0] = False
        codes = negative.view(np.int8)  # 1 for negative -> -1, 0 -> +1, in place
        codes *= np.int8(-2)
        codes += np.int8(1)
        return codes

    def _pack(self, codes: np.ndarray, count: int) -> np.ndarray:
        return np.packbits(codes[:count] < 0, bitorder="little")

    def _unpack(self, buf: np.ndarray, count: int) -> np.ndarray:
        bits = np.unpackbits(buf, bitorder="little").view(np.int8)  # (8 * len(buf),) 0 or 1
        if bits[count:].any():
            raise ValueError(f"codec sign: a bit past the last of {count} values is set")
        codes = np.ones(self._blocks(count) * self.block_size, np.int8)
        codes[:count] -= 2 * bits[:count]
        return codes

    def _check_blocks(self, scales: np.ndarray, codes: np.ndarray) -> None:
        zero = scales == 0
        negatives = np.zeros(scales.size, bool)
        negatives[zero] = (codes[zero] < 0).any(axis=1)
        wrong = np.where(zero, np.signbit(scales) | negatives, scales < self.tiny)
        bad = np.flatnonzero(wrong)
        if bad.size:
            j = bad[0]
            raise ValueError(
                f"codec sign: block {j} (scale {float(scales[j])!r}, "
                f"{'a' if negatives[j] else 'no'} set bit) is not one the encoder writes"
            )


CODECS: dict[str, type[ValueCodec]] = {
    c.name: c
    for c in (Fp32Codec, Fp16Codec, Bf16Codec, Int8BlockCodec, Int4BlockCodec, SignBlockCodec)
}


def get_codec(name: str, block_size: int | None = None) -> ValueCodec:
    """The codec registered under ``name``; ``block_size`` matters for int8, int4, sign."""
    try:
        cls = CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; known: {', '.join(sorted(CODECS))}") from None
    if issubclass(cls, BlockScaledCodec):
        return cls(block_size or None)
    return cls()
