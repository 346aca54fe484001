"""Value codecs: exact fp32, documented error bounds for the others."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from protocol.codecs import CODECS, TINY_BLOCK, get_codec
from protocol.constants import CODEC_NAMES

finite32 = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
values32 = arrays(np.float32, st.integers(0, 700), elements=finite32)


def roundtrip(name: str, x: np.ndarray, **kw) -> np.ndarray:
    codec = get_codec(name, **kw)
    buf = codec.encode(x)
    assert len(buf) == codec.encoded_size(x.size)
    y = codec.decode(buf, x.size)
    assert y.dtype == np.float32 and y.shape == x.shape
    return y


@settings(max_examples=80, deadline=None)
@given(x=values32)
def test_fp32_is_exact(x):
    assert np.array_equal(roundtrip("fp32", x).view(np.uint32), x.view(np.uint32))


@settings(max_examples=80, deadline=None)
@given(x=values32)
def test_bf16_error_is_within_the_unit_roundoff_of_8_bits(x):
    y = roundtrip("bf16", x)
    assert np.all(
        np.abs(y.astype(np.float64) - x) <= 2.0**-8 * np.abs(x.astype(np.float64)) + 2.0**-134
    )


@settings(max_examples=80, deadline=None)
@given(x=values32)
def test_fp16_error_is_within_the_documented_bound(x):
    y = roundtrip("fp16", x)
    bound = 2.0**-11 * np.abs(x.astype(np.float64)) + 2.0**-25
    assert np.all(np.abs(y.astype(np.float64) - x) <= bound)


def block_absmax(x: np.ndarray, block: int) -> np.ndarray:
    """Each value's block absmax, as float64: (n,)."""
    padded = np.zeros(-(-x.size // block) * block, np.float64)
    padded[: x.size] = np.abs(x)
    return np.repeat(padded.reshape(-1, block).max(axis=1), block)[: x.size]


@settings(max_examples=80, deadline=None)
@given(x=values32, block=st.sampled_from([8, 64, 128, 1000]))
# the quotient and the product both rounding the wrong way: 2**-15.5 over half a step
@example(x=np.array([1.1169140338897705, 1.0597491264343262], np.float32), block=8)
def test_int8_error_is_within_half_a_step_of_the_block_scale(x, block):
    y = roundtrip("int8", x, block_size=block)
    absmax = block_absmax(x, block)
    bound = np.where(absmax < TINY_BLOCK, absmax, absmax / 254 * (1 + 2.0**-14))
    assert np.all(np.abs(y.astype(np.float64) - x) <= bound)


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_a_block_holding_the_largest_float32_decodes_to_finite_values_near_it(name):
    top = np.finfo(np.float32).max
    x = np.array([top, -top / 3, 1.0, 0.0], np.float32)
    y = roundtrip(name, x, block_size=8)
    assert np.isfinite(y).all()
    step = top / get_codec(name).LEVELS
    assert np.all(np.abs(y.astype(np.float64) - x) <= step / 2 * (1 + 2.0**-14))


any32 = st.floats(allow_nan=False, allow_infinity=False, width=32)  # subnormals to 3.4e38


@settings(max_examples=150, deadline=None)
@given(
    x=arrays(np.float32, st.integers(0, 700), elements=any32 | finite32),
    block=st.sampled_from([8, 14, 64, 128, 1000]),
)
@example(x=np.array([1.3125019073486328, 1.0312514305114746], np.float32), block=8)  # 2**-19.8
@example(x=np.zeros(65, np.float32), block=64)
@example(x=np.array([7 * 2.0**-126, 3e-45, np.finfo(np.float32).max], np.float32), block=8)
def test_int4_error_is_within_half_a_step_of_the_block_scale(x, block):
    codec = get_codec("int4", block_size=block)
    buf = codec.encode(x)
    y = roundtrip("int4", x, block_size=block)
    nblocks = -(-x.size // block)
    scale = np.repeat(np.frombuffer(buf[: 4 * nblocks], "<f4").astype(np.float64), block)
    absmax = block_absmax(x, block)
    err = np.abs(y.astype(np.float64) - x)
    tiny = absmax < 7 * 2.0**-126
    assert np.all(scale[: x.size][tiny] == 0) and np.all(err[tiny] <= absmax[tiny])
    assert np.all(err[~tiny] <= scale[: x.size][~tiny] / 2 * (1 + 2.0**-19))
    assert np.all(err <= np.where(tiny, absmax, absmax / 14 * (1 + 2.0**-18)))


def test_bf16_rounds_to_nearest_even():
    # 1 + 2**-8 is exactly halfway between two bf16 values: ties go to the even mantissa (1.0).
    x = np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8)], np.float32)
    assert roundtrip("bf16", x).tolist() == [1.0, 1 + 2**-6, -1.0]


def test_fp16_refuses_values_it_cannot_hold():
    with pytest.raises(ValueError, match="65504"):
        get_codec("fp16").encode(np.array([70000.0], np.float32))


def test_int8_all_zero_block_decodes_to_zeros():
    assert roundtrip("int8", np.zeros(300, np.float32)).tolist() == [0.0] * 300


def test_int8_layout_is_scales_then_codes():
    codec = get_codec("int8", block_size=8)
    buf = codec.encode(np.array([127.0, -63.5, 0.0], np.float32))
    assert np.frombuffer(buf[:4], "<f4")[0] == 1.0
    assert np.frombuffer(buf[4:], np.int8).tolist() == [127, -64, 0]


@pytest.mark.parametrize("name", sorted(CODECS))
def test_decode_refuses_a_buffer_of_the_wrong_size(name):
    codec = get_codec(name)
    buf = codec.encode(np.ones(10, np.float32))
    with pytest.raises(ValueError, match="cannot hold"):
        codec.decode(bytes(buf) + b"\0", 10)
    with pytest.raises(ValueError, match="cannot hold"):
        codec.decode(buf, 18)  # 8 more values need a byte more even at one bit a value


def test_unknown_codec_names_the_known_ones():
    with pytest.raises(ValueError, match="bf16, fp16, fp32, int4, int8, sign"):
        get_codec("fp8")


@settings(max_examples=80, deadline=None)
@given(x=arrays(np.float32, st.integers(0, 500), elements=st.floats(-65504, 65504, width=32)))
def test_fp16_encoding_matches_numpys_ieee_conversion(x):
    # Pins the fast (torch) conversion to numpy's portable one, subnormals and ties included.
    ours = (
        np.frombuffer(get_codec("fp16").encode(x), np.uint8)
        .reshape(2, -1)
        .T.copy()
        .view("<f2")
        .reshape(-1)
    )
    assert np.array_equal(ours.view(np.uint16), x.astype("<f2").view(np.uint16))


def test_fp16_encoding_matches_numpy_on_edge_values():
    edges = np.array(
        [2.0**-24, 2.0**-25, 3 * 2.0**-26, 2.0**-14, 65504, 1 + 2.0**-11, 1e-40, -0.0], np.float32
    )
    test_fp16_encoding_matches_numpys_ieee_conversion.hypothesis.inner_test(edges)


def test_the_codec_registry_implements_exactly_the_named_codecs():
    assert sorted(CODECS) == sorted(CODEC_NAMES)


def test_int4_layout_is_scales_then_nibbles_low_first():
    codec = get_codec("int4", block_size=8)
    buf = codec.encode(np.array([7.0, -3.0, 1.0, 0.0, -7.0], np.float32))
    assert np.frombuffer(buf[:4], "<f4")[0] == 1.0
    # -3 is 0xD; the odd count leaves the last high nibble 0
    assert bytes(buf[4:]) == bytes([0xD7, 0x01, 0x09])


@pytest.mark.parametrize("count", [0, 1, 2, 63, 64, 65, 127, 128, 129, 1001])
@pytest.mark.parametrize("block", [8, 64, 1000])
def test_int4_encoded_size_is_the_scales_and_half_a_byte_per_value(count, block):
    codec = get_codec("int4", block_size=block)
    size = 4 * -(-count // block) + -(-count // 2)
    assert codec.encoded_size(count) == size == len(codec.encode(np.ones(count, np.float32)))


def test_block_sizes_default_per_codec_and_fit_its_code_layout():
    defaults = {name: get_codec(name).block_size for name in ("int8", "int4", "sign")}
    assert defaults == {"int8": 128, "int4": 64, "sign": 256}
    assert get_codec("int4", 16).block_size == 16 and get_codec("sign", 8).block_size == 8


@pytest.mark.parametrize(
    ("name", "bad", "message"),
    [
        ("int4", 9, "must be even"),
        ("int4", 6, "must be in \\[8, 65536\\]"),
        ("int4", 1 << 17, "must be in"),
        ("sign", 12, "must be a multiple of 8"),
        ("sign", 4, "must be in \\[8, 65536\\]"),
        ("sign", 1 << 17, "must be in"),
    ],
)
def test_a_block_size_out_of_range_or_off_the_code_layout_is_refused(name, bad, message):
    with pytest.raises(ValueError, match=f"codec {name}: block size {message}"):
        get_codec(name, bad)


@settings(max_examples=150, deadline=None)
@given(
    x=arrays(np.float32, st.integers(0, 300), elements=any32 | finite32),
    block=st.sampled_from([8, 64]),
)
def test_int4_reencoding_the_decoding_gives_the_same_bytes(x, block):
    codec = get_codec("int4", block_size=block)
    buf = codec.encode(x)
    assert bytes(codec.encode(codec.decode(buf, x.size))) == bytes(buf)


def test_int4_scales_of_every_absmax_mantissa_pass_the_decoders_check():
    # One binade of absmax covers every normal one: the encoder's scale s = fl(absmax / 7)
    # always satisfies fl(fl(7 s) / 7) == s, and its block's largest value gets code 7.
    start, stop = np.float32(8).view(np.uint32), np.float32(16).view(np.uint32)
    absmax = np.arange(start, stop, dtype=np.uint32).view(np.float32)
    s = absmax / np.float32(7)
    assert np.array_equal((s * np.float32(7)) / np.float32(7), s)
    assert np.all(np.rint(absmax / s) == 7)
    top = np.finfo(np.float32).max
    assert np.isfinite(np.float32(top) / np.float32(7) * np.float32(7))


def _int4_bytes(scales: list[float], nibbles: list[int]) -> bytes:
    padded = nibbles + [0] * (len(nibbles) % 2)
    packed = bytes(lo | hi << 4 for lo, hi in zip(padded[0::2], padded[1::2], strict=True))
    return np.array(scales, "<f4").tobytes() + packed


@pytest.mark.parametrize(
    ("scales", "nibbles", "message"),
    [
        ([float("nan")], [7, 0, 0], "negative or not finite"),
        ([float("inf")], [7, 0, 0], "negative or not finite"),
        ([-1.0], [7, 0, 0], "negative or not finite"),
        ([1.0], [7, 8, 0], "value 1 has nibble 0x8"),
        ([1.0], [7, 0, 0, 0, 0, 0, 0, 0, 8], "value 8 has nibble 0x8"),
        ([-0.0], [0, 0, 0], "block 0 \\(scale -0.0"),
        ([0.0], [1, 0, 0], "block 0 \\(scale 0.0, largest \\|code\\| 1\\)"),
        ([1.0], [6, 0, 0], "block 0 \\(scale 1.0, largest \\|code\\| 6\\)"),
        ([2.0**-127], [7, 0, 0], "block 0"),  # subnormal: the encoder writes 0 there
        ([1.5111365], [7, 0, 0], "block 0"),  # no absmax / 7 rounds to this scale
    ],
)
def test_int4_refuses_bytes_the_encoder_never_writes(scales, nibbles, message):
    buf = _int4_bytes(scales, nibbles)
    with pytest.raises(ValueError, match=f"codec int4: .*{message}"):
        get_codec("int4", block_size=16).decode(buf, len(nibbles))


def test_int4_refuses_a_nonzero_nibble_past_an_odd_count():
    buf = _int4_bytes([1.0], [7, 0, 3, 5])  # 3 values, and 5 where the encoder writes 0
    with pytest.raises(ValueError, match="codec int4: the nibble past the last of 3 values"):
        get_codec("int4", block_size=16).decode(buf, 3)


@settings(max_examples=200, deadline=None)
@given(
    scales=st.lists(
        st.floats(width=32) | st.sampled_from([1.0, 7 * 2.0**-126, 0.0]), min_size=2, max_size=2
    ),
    nibbles=st.lists(st.integers(0, 15) | st.sampled_from([7, 9]), min_size=10, max_size=16),
    short=st.booleans(),  # the last nibble is the padding of an odd count
)
def test_int4_decodes_only_canonical_bytes(scales, nibbles, short):
    # Any bytes: refused, or the encoding of what they decode to (one value, one byte string).
    codec = get_codec("int4", block_size=8)
    buf = _int4_bytes(scales, nibbles)
    try:
        y = codec.decode(buf, len(nibbles) - short)
    except ValueError:
        return
    assert bytes(codec.encode(y)) == buf


def _block_sums(values: np.ndarray, block: int) -> np.ndarray:
    """(n,) float64 -> (nblocks,) sums of each block, zero-padded."""
    padded = np.zeros(-(-values.size // block) * block, np.float64)
    padded[: values.size] = values
    return padded.reshape(-1, block).sum(axis=1)


@settings(max_examples=150, deadline=None)
@given(
    x=arrays(np.float32, st.integers(0, 700), elements=any32 | finite32),
    block=st.sampled_from([8, 16, 64, 256, 1024]),
)
@example(x=np.zeros(65, np.float32), block=64)
@example(x=np.array([2.0**-126, -(2.0**-126), 3e-45, 2.0**-127], np.float32), block=8)
@example(
    x=np.array([np.finfo(np.float32).max, -np.finfo(np.float32).max, 1e-45], np.float32), block=8
)
@example(x=np.array([1.0, -3.0, 0.0, -0.0, 2.0, 1e-30, 5.0, -7.0, 0.25], np.float32), block=8)
def test_sign_error_is_within_the_block_absmax_and_the_squared_error_shrinks(x, block):
    codec = get_codec("sign", block_size=block)
    buf = codec.encode(x)
    y = roundtrip("sign", x, block_size=block).astype(np.float64)
    nblocks = -(-x.size // block)
    scales = np.frombuffer(buf[: 4 * nblocks], "<f4").astype(np.float64)
    s = np.repeat(scales, block)[: x.size]
    assert np.array_equal(y, np.where((x < 0) & (s > 0), -s, s))  # -0.0 is not negative
    x64 = x.astype(np.float64)
    counts = np.minimum(block, x.size - block * np.arange(nblocks))
    mean = _block_sums(np.abs(x64), block) / counts
    tiny = scales == 0
    assert np.all(mean[tiny] < 2.0**-126 * (1 + 2.0**-20))
    assert np.all(scales[~tiny] >= 2.0**-126)
    assert np.all(np.abs(scales - mean)[~tiny] <= 2.0**-23 * mean[~tiny])
    assert np.all(np.abs(y - x64) <= block_absmax(x, block))  # exactly: s never exceeds it
    squares, errors = _block_sums(x64**2, block), _block_sums((y - x64) ** 2, block)
    assert np.all(errors <= squares * (1 + 2.0**-40))
    expected = np.where(tiny, squares, squares - counts * scales**2)
    assert np.all(np.abs(errors - expected) <= 2.0**-20 * squares)


@settings(max_examples=50, deadline=None)
@given(x=arrays(np.float32, st.integers(1, 256), elements=any32 | finite32), seed=st.integers())
def test_sign_scale_does_not_depend_on_the_order_of_the_values(x, seed):
    # The mean is an exact integer sum: a float sum in another order could round elsewhere.
    shuffled = np.random.default_rng(seed % 2**32).permutation(x)
    codec = get_codec("sign", block_size=256)
    assert bytes(codec.encode(x)[:4]) == bytes(codec.encode(shuffled)[:4])


def test_sign_layout_is_scales_then_bits_little_endian():
    codec = get_codec("sign", block_size=8)
    x = np.array([1.0, -3.0, 0.0, -0.0, 2.0, -1.0, 0.5, 0.5, -4.0], np.float32)
    buf = codec.encode(x)
    assert np.frombuffer(buf[:8], "<f4").tolist() == [1.0, 4.0]  # mean |x| of each block
    # negatives at 1 and 5 in the first byte; value 8 is bit 0 of the second, the rest 0
    assert bytes(buf[8:]) == bytes([0b0010_0010, 0b0000_0001])
    assert codec.decode(buf, 9).tolist() == [1, -1, 1, 1, 1, -1, 1, 1, -4]


def test_sign_all_zero_and_tiny_blocks_decode_to_zeros():
    x = np.full(20, 2.0**-127, np.float32)
    x[::2] *= -1
    buf = get_codec("sign", block_size=8).encode(x)
    assert bytes(buf) == bytes(4 * 3 + 3)  # scale 0 and no bit set
    assert roundtrip("sign", x, block_size=8).tolist() == [0.0] * 20


@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 255, 256, 257, 1001])
@pytest.mark.parametrize("block", [8, 256, 1000 * 8])
def test_sign_encoded_size_is_the_scales_and_a_bit_per_value(count, block):
    codec = get_codec("sign", block_size=block)
    size = 4 * -(-count // block) + -(-count // 8)
    assert codec.encoded_size(count) == size == len(codec.encode(np.ones(count, np.float32)))


@settings(max_examples=150, deadline=None)
@given(
    x=arrays(np.float32, st.integers(0, 300), elements=any32 | finite32),
    block=st.sampled_from([8, 64, 256]),
)
def test_sign_reencoding_the_decoding_gives_the_same_bytes(x, block):
    codec = get_codec("sign", block_size=block)
    buf = codec.encode(x)
    assert bytes(codec.encode(codec.decode(buf, x.size))) == bytes(buf)


def _sign_bytes(scales: list[float], bits: list[int]) -> bytes:
    return np.array(scales, "<f4").tobytes() + np.packbits(bits, bitorder="little").tobytes()


@pytest.mark.parametrize(
    ("scales", "bits", "count", "message"),
    [
        ([float("nan")], [1, 0, 0], 3, "negative or not finite"),
        ([float("inf")], [0, 0, 0], 3, "negative or not finite"),
        ([-1.0], [0, 0, 0], 3, "negative or not finite"),
        ([-0.0], [0, 0, 0], 3, "block 0 \\(scale -0.0, no set bit\\)"),
        ([0.0], [0, 1, 0], 3, "block 0 \\(scale 0.0, a set bit\\)"),
        ([1.0, 0.0], [0] * 8 + [0, 1], 10, "block 1 \\(scale 0.0, a set bit\\)"),
        ([2.0**-127], [0, 0, 0], 3, "block 0 \\(scale 5.877"),  # subnormal: the encoder writes 0
        ([1e-45], [1, 0, 0], 3, "block 0"),
        ([1.0], [0, 0, 0, 1], 3, "a bit past the last of 3 values is set"),
        ([1.0, 1.0], [0] * 9 + [0] * 6 + [1], 15, "a bit past the last of 15 values"),
    ],
)
def test_sign_refuses_bytes_the_encoder_never_writes(scales, bits, count, message):
    buf = _sign_bytes(scales, bits)
    with pytest.raises(ValueError, match=f"codec sign: .*{message}"):
        get_codec("sign", block_size=8).decode(buf, count)


@settings(max_examples=200, deadline=None)
@given(
    scales=st.lists(
        st.floats(width=32) | st.sampled_from([1.0, 2.0**-126, 0.0, -0.0]), min_size=2, max_size=2
    ),
    bits=st.lists(st.integers(0, 1), min_size=16, max_size=16),
    count=st.integers(9, 16),  # past it, the last byte's padding bits
)
def test_sign_decodes_only_canonical_bytes(scales, bits, count):
    # Any bytes: refused, or the encoding of what they decode to (one value, one byte string).
    codec = get_codec("sign", block_size=8)
    buf = _sign_bytes(scales, bits)
    try:
        y = codec.decode(buf, count)
    except ValueError:
        return
    assert bytes(codec.encode(y)) == buf
