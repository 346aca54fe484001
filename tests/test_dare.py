"""The DARE keep-mask: a documented, portable function of (seed, name, index)."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import dare

_M64 = (1 << 64) - 1


def reference_draws(seed: int, name: str, start: int, count: int) -> list[int]:
    """The mask PRF written from its specification, one element at a time in plain ints."""
    key_bytes = hashlib.sha256(
        b"mergeswarm/dare/v1\0" + seed.to_bytes(8, "little") + name.encode()
    ).digest()
    key = int.from_bytes(key_bytes[:8], "little")
    out = []
    for i in range(start, start + count):
        z = (key + (i // 2 + 1) * 0x9E3779B97F4A7C15) & _M64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
        z ^= z >> 31
        out.append(z & 0xFFFFFFFF if i % 2 == 0 else z >> 32)
    return out


def reference_mask(seed: int, name: str, numel: int, p: float) -> np.ndarray:
    threshold = int(p * 2**32)
    return np.array([u >= threshold for u in reference_draws(seed, name, 0, numel)], dtype=bool)


def test_golden_draws_are_pinned():
    assert reference_draws(0, "w", 0, 8) == [
        3719194655, 3343373666, 2460229455, 3396033248, 3309986153, 562809096, 4143235871, 742105030,
    ]  # fmt: skip
    assert reference_draws(2**64 - 1, "model.layers.0.mlp.up_proj.weight", 131071, 5) == [
        2623809480, 907601038, 311344125, 1640904369, 15523683,
    ]  # fmt: skip


def test_golden_mask_is_pinned():
    assert np.flatnonzero(dare.keep_mask(0, "w", 64, 0.9)).tolist() == [
        6,
        12,
        14,
        21,
        22,
        31,
        32,
        41,
        49,
        54,
        56,
    ]
    mask = dare.keep_mask(7, "model.layers.0.mlp.up_proj.weight", 1_000_003, 0.9)
    packed = np.packbits(mask, bitorder="little").tobytes()
    assert int(mask.sum()) == 99924
    assert (
        hashlib.sha256(packed).hexdigest()
        == "8f7d4951fe9e7e457d570a112aae6688a036bcc34a8d642e1432357f30db5b77"
    )


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, _M64),
    name=st.text(min_size=0, max_size=40),
    numel=st.integers(0, 300),
    p=st.floats(0.0, 0.999),
)
def test_mask_matches_the_specification(seed, name, numel, p):
    assert np.array_equal(
        dare.keep_mask(seed, name, numel, p), reference_mask(seed, name, numel, p)
    )


def test_mask_matches_the_specification_across_chunk_boundaries():
    numel = dare.CHUNK * 2 + 3
    got = dare.keep_mask(11, "emb", numel, 0.7)
    # Spot-check windows around both chunk boundaries and the odd tail against the reference.
    for start in (0, dare.CHUNK - 5, 2 * dare.CHUNK - 5):
        ref = [u >= int(0.7 * 2**32) for u in reference_draws(11, "emb", start, 8)]
        assert got[start : start + 8].tolist() == ref[: len(got[start : start + 8])]


def test_mask_is_identical_in_a_fresh_process():
    code = (
        "import hashlib, numpy as np; from protocol.dare import keep_mask;"
        "m = keep_mask(123, 'lm_head.weight', 200_001, 0.99);"
        "print(hashlib.sha256(np.packbits(m).tobytes()).hexdigest())"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    here = hashlib.sha256(
        np.packbits(dare.keep_mask(123, "lm_head.weight", 200_001, 0.99)).tobytes()
    ).hexdigest()
    assert other.stdout.strip() == here


def test_drop_rate_zero_keeps_everything_and_rescale_is_one():
    assert dare.keep_mask(5, "x", 1000, 0.0).all()
    assert dare.rescale_factor(0.0) == np.float32(1.0)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan")])
def test_invalid_drop_rate_is_refused(p):
    with pytest.raises(ValueError, match="drop rate"):
        dare.drop_threshold(p)


def test_kept_fraction_is_close_to_one_minus_p():
    numel = 2_000_000
    for p in (0.5, 0.9, 0.99):
        kept = dare.count_kept(99, "t", numel, p)
        sigma = (numel * p * (1 - p)) ** 0.5
        assert abs(kept - numel * (1 - p)) < 5 * sigma


def test_different_names_and_seeds_give_different_masks():
    a = dare.keep_mask(1, "a", 10_000, 0.5)
    assert not np.array_equal(a, dare.keep_mask(1, "b", 10_000, 0.5))
    assert not np.array_equal(a, dare.keep_mask(2, "a", 10_000, 0.5))


@settings(max_examples=40, deadline=None)
@given(
    numel=st.integers(0, 5000), p=st.sampled_from([0.0, 0.5, 0.9, 0.99]), seed=st.integers(0, 2**63)
)
def test_densify_inverts_sparsify_with_exact_rescale(numel, p, seed):
    x = np.random.default_rng(seed % 2**32).standard_normal(numel).astype(np.float32)
    values = dare.sparsify(x, seed, "t", p)
    dense = dare.densify(values, numel, seed, "t", p)
    mask = dare.keep_mask(seed, "t", numel, p)
    expected = np.where(mask, x * np.float32(1.0 / (1.0 - p)), np.float32(0))
    assert np.array_equal(dense, expected)
    assert values.size == int(mask.sum())


def test_densify_refuses_a_wrong_value_count():
    values = dare.sparsify(np.ones(1000, np.float32), 3, "t", 0.5)
    with pytest.raises(ValueError, match="keeps"):
        dare.densify(values[:-1], 1000, 3, "t", 0.5)
    with pytest.raises(ValueError, match="keeps"):
        dare.densify(np.append(values, 1.0), 1000, 3, "t", 0.5)
