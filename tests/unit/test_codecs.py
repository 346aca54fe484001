"""Value codecs: exact fp32, documented error bounds for the others."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
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


@settings(max_examples=80, deadline=None)
@given(x=values32, block=st.sampled_from([8, 64, 128, 1000]))
def test_int8_error_is_within_half_a_step_of_the_block_scale(x, block):
    y = roundtrip("int8", x, block_size=block)
    n = x.size
    padded = np.zeros(-(-n // block) * block, np.float64)
    padded[:n] = np.abs(x)
    absmax = np.repeat(padded.reshape(-1, block).max(axis=1), block)[:n]
    bound = np.where(absmax < TINY_BLOCK, absmax, absmax / 254 * (1 + 2.0**-20))
    assert np.all(np.abs(y.astype(np.float64) - x) <= bound)


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
        codec.decode(buf, 11)


def test_unknown_codec_names_the_known_ones():
    with pytest.raises(ValueError, match="bf16, fp16, fp32, int8"):
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
