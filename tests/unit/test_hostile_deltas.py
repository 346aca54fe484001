"""Corrupted, truncated and lying .msd files: only documented exceptions, before big allocations."""

from __future__ import annotations

import hashlib
import random
import tracemalloc

import numpy as np
import pytest
import torch
import zstandard

from protocol import frames
from protocol.codecs import get_codec
from protocol.container import DeltaReader, DeltaWriter
from protocol.errors import (
    DeltaFormatError,
    IntegrityError,
    NonFiniteError,
    SignatureError,
    UnsupportedVersionError,
)
from protocol.identity import Identity
from tests.forge import assemble, split

BASE = "ab" * 32
ATTACKER = Identity.generate()


@pytest.fixture
def good(tmp_path, identity):
    g = torch.Generator().manual_seed(1)
    path = tmp_path / "good.msd"
    with DeltaWriter(
        path, base_id=BASE, identity=identity, drop_rate=0.5, seed=9, codec="bf16"
    ) as w:
        w.add("a", "F32", torch.randn(40, 30, generator=g))
        w.add("b", "BF16", torch.randn(300, generator=g))
        w.finish()
    return path


def read_everything(path):
    with DeltaReader(path) as r:
        for name in r.names():
            r.read_tensor(name)


def forged(tmp_path, good, mutate, name="forged.msd"):
    parts = split(good)
    mutate(parts)
    out = tmp_path / name
    out.write_bytes(assemble(parts, ATTACKER))
    return out


def test_every_truncation_is_refused(tmp_path, good):
    data = good.read_bytes()
    cut = tmp_path / "cut.msd"
    for length in sorted({*range(0, 120), *random.Random(0).sample(range(len(data)), 150)}):
        cut.write_bytes(data[:length])
        with pytest.raises(DeltaFormatError):
            read_everything(cut)


def test_bit_flips_anywhere_are_refused(tmp_path, good):
    data = bytearray(good.read_bytes())
    flipped = tmp_path / "flip.msd"
    rng = random.Random(1)
    for pos in [*range(0, 16), *rng.sample(range(len(data)), 300)]:
        bad = bytearray(data)
        bad[pos] ^= 1 << rng.randrange(8)
        flipped.write_bytes(bytes(bad))
        with pytest.raises(DeltaFormatError):
            read_everything(flipped)


def test_random_garbage_is_refused(tmp_path):
    rng = random.Random(2)
    path = tmp_path / "garbage.msd"
    for size in (0, 1, 16, 80, 1000, 100_000):
        path.write_bytes(rng.randbytes(size))
        with pytest.raises(DeltaFormatError):
            read_everything(path)


def test_trailing_bytes_are_refused(tmp_path, good):
    path = tmp_path / "long.msd"
    path.write_bytes(good.read_bytes() + b"\0")
    with pytest.raises(DeltaFormatError, match="trailing bytes"):
        DeltaReader(path)


def test_unknown_version_and_flags_are_refused_as_unsupported(tmp_path, good):
    with pytest.raises(UnsupportedVersionError, match="format version 2"):
        DeltaReader(forged(tmp_path, good, lambda p: setattr(p, "version", 2)))
    with pytest.raises(UnsupportedVersionError, match="flags"):
        DeltaReader(forged(tmp_path, good, lambda p: setattr(p, "flags", 4)))


def test_unknown_codec_and_sparsifier_are_refused_as_unsupported(tmp_path, good):
    def codec(parts):
        parts.header["codec"]["name"] = "fp8"

    def prf(parts):
        parts.header["sparsifier"]["prf"] = "philox-v9"

    with pytest.raises(UnsupportedVersionError, match="codec 'fp8'"):
        DeltaReader(forged(tmp_path, good, codec))
    with pytest.raises(UnsupportedVersionError, match="philox-v9"):
        DeltaReader(forged(tmp_path, good, prf))


def test_oversized_header_length_is_refused_before_reading_it(tmp_path, good):
    data = bytearray(good.read_bytes())
    data[12:16] = (2**31).to_bytes(4, "little")
    path = tmp_path / "big.msd"
    path.write_bytes(bytes(data))
    with pytest.raises(DeltaFormatError, match="exceeds"):
        DeltaReader(path)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("kept", 10**9, "kept"),
        ("shape", [2**20, 2**20], "exceeds"),
        ("shape", [1] * 9, "at most 8"),
        ("frame_bytes", 0, "greater than or equal to 1"),
        ("dtype", "I64", "not a float dtype"),
        ("sha256", "zz", "pattern"),
        ("name", "", "at least 1"),
    ],
)
def test_header_fields_out_of_bounds_are_refused(tmp_path, good, field, value, message):
    def mutate(parts):
        parts.header["tensors"][0][field] = value

    with pytest.raises(DeltaFormatError, match=message):
        DeltaReader(forged(tmp_path, good, mutate))


def test_header_schema_violations_are_refused(tmp_path, good):
    cases = {
        "extra field": lambda h: h.update(surprise=1),
        "string drop rate": lambda h: h["sparsifier"].update(drop_rate="0.5"),
        "drop rate 1": lambda h: h["sparsifier"].update(drop_rate=1.0),
        "negative seed": lambda h: h["sparsifier"].update(seed=-1),
        "unsorted tensors": lambda h: h["tensors"].reverse(),
        "bad base id": lambda h: h.update(base_id="x"),
        "huge metadata": lambda h: h.update(metadata={"x": "y" * 70_000}),
    }
    for what, mutate in cases.items():
        path = forged(tmp_path, good, lambda p, m=mutate: m(p.header), name=f"{what}.msd")
        with pytest.raises(DeltaFormatError) as info:
            DeltaReader(path)
        assert "invalid header" in str(info.value), what


def _replace_frame(parts, index, frame):
    entry = parts.header["tensors"][index]
    parts.frames[index] = frame
    entry["frame_bytes"] = len(frame)
    entry["sha256"] = hashlib.sha256(frame).hexdigest()


def test_lying_kept_count_is_refused(tmp_path, good):
    def mutate(parts):
        # Re-encode tensor "a" with one value fewer and declare that count: the mask disagrees.
        entry = parts.header["tensors"][0]
        entry["kept"] -= 1
        _replace_frame(
            parts, 0, frames.compress(get_codec("bf16").encode(np.ones(entry["kept"], np.float32)))
        )

    with (
        DeltaReader(forged(tmp_path, good, mutate)) as r,
        pytest.raises(IntegrityError, match="mask keeps"),
    ):
        r.read_tensor("a")


def test_zstd_bomb_is_refused_before_inflating(tmp_path, good):
    # A frame small enough to pass the size bound that inflates to 16 MiB of zeros.
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (1 << 24))
    assert len(bomb) < 825

    def mutate(parts):
        _replace_frame(parts, 1, bomb)

    path = forged(tmp_path, good, mutate)
    tracemalloc.start()
    with DeltaReader(path) as r, pytest.raises(IntegrityError, match="declares 16777216 bytes"):
        r.read_values("b")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 * 2**20


def test_frame_without_content_size_is_refused(tmp_path, good):
    def mutate(parts):
        raw = get_codec("bf16").encode(np.ones(parts.header["tensors"][1]["kept"], np.float32))
        _replace_frame(parts, 1, zstandard.ZstdCompressor(write_content_size=False).compress(raw))

    with (
        DeltaReader(forged(tmp_path, good, mutate)) as r,
        pytest.raises(IntegrityError, match="declares"),
    ):
        r.read_values("b")


def test_two_frames_in_one_slot_are_refused(tmp_path, good):
    def mutate(parts):
        _replace_frame(parts, 1, parts.frames[1] + frames.compress(b"x"))

    with (
        DeltaReader(forged(tmp_path, good, mutate)) as r,
        pytest.raises(IntegrityError, match="corrupt"),
    ):
        r.read_values("b")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_are_refused(tmp_path, good, bad):
    def mutate(parts):
        kept = parts.header["tensors"][1]["kept"]
        values = np.ones(kept, np.float32)
        values[kept // 2] = bad
        _replace_frame(parts, 1, frames.compress(get_codec("fp32").encode(values)))
        parts.header["codec"]["name"] = "fp32"
        parts.frames[0] = frames.compress(
            get_codec("fp32").encode(np.ones(parts.header["tensors"][0]["kept"], np.float32))
        )
        _replace_frame(parts, 0, parts.frames[0])

    with DeltaReader(forged(tmp_path, good, mutate)) as r:
        r.read_tensor("a")
        with pytest.raises(NonFiniteError, match="'b'"):
            r.read_tensor("b")


def test_oversized_frame_declaration_is_refused(tmp_path, good):
    def mutate(parts):
        _replace_frame(parts, 1, parts.frames[1] + b"\0" * 5000)

    with pytest.raises(DeltaFormatError, match="exceeds the bound"):
        DeltaReader(forged(tmp_path, good, mutate))


def test_a_forged_file_still_verifies_for_its_real_signer_only(tmp_path, good, identity):
    path = forged(tmp_path, good, lambda p: None)
    assert DeltaReader(path).header.author == ATTACKER.author
    with pytest.raises(SignatureError):
        DeltaReader(path, expected_author=identity.author)


def test_values_that_overflow_once_rescaled_are_refused(tmp_path, identity):
    path = tmp_path / "big.msd"
    with DeltaWriter(
        path, base_id=BASE, identity=identity, drop_rate=0.9, seed=1, codec="fp32"
    ) as w:
        w.add("a", "F32", torch.full((100,), 3e38))
        w.finish()
    with DeltaReader(path) as r, pytest.raises(NonFiniteError, match="overflow once rescaled"):
        r.read_tensor("a")


def test_huge_declared_dimensions_are_refused_in_the_header(tmp_path, good):
    def mutate(parts):
        parts.header["tensors"][0]["shape"] = [0, 2**63]

    with pytest.raises(DeltaFormatError, match="invalid header"):
        DeltaReader(forged(tmp_path, good, mutate))


def test_inspect_verify_bounds_a_huge_tensor_by_the_base(tmp_path, good):
    from safetensors.torch import save_file

    from protocol.delta import check_fits
    from protocol.errors import BaseMismatchError
    from protocol.model_dir import ModelDir

    def mutate(parts):
        parts.header["tensors"][0]["shape"] = [2**34]  # a 1 KB file declaring 64 GiB

    base = tmp_path / "base"
    base.mkdir()
    save_file(
        {"a": torch.zeros(40, 30), "b": torch.zeros(300, dtype=torch.bfloat16)},
        base / "model.safetensors",
    )
    with (
        DeltaReader(forged(tmp_path, good, mutate)) as r,
        pytest.raises(BaseMismatchError, match="'a'"),
    ):
        check_fits(r, ModelDir(base), r.header.base_id)
