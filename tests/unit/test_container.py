"""The .msd container: round trips, streaming, signatures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from protocol import dare
from protocol.container import DeltaReader, DeltaWriter
from protocol.errors import BaseMismatchError, NonFiniteError, SignatureError
from protocol.identity import Identity
from protocol.ids import bytes_id
from tests.forge import assemble, split

BASE = "ab" * 32


def write(path, tensors, identity, *, codec="fp32", p=0.9, seed=7, **kw):
    with DeltaWriter(
        path, base_id=BASE, identity=identity, drop_rate=p, seed=seed, codec=codec, **kw
    ) as w:
        for name, t in sorted(tensors.items()):
            w.add(name, "F32", t)
        return w.finish()


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(64, 48, generator=g) * 1e-3,
        "b.bias": torch.randn(48, generator=g) * 1e-3,
        "c.scalar": torch.tensor(0.5),
        "d.empty": torch.zeros(0, 4),
    }


def test_fp32_round_trip_is_exact_after_the_mask(tmp_path, tensors, identity):
    path = tmp_path / "d.msd"
    delta_id = write(path, tensors, identity)
    assert delta_id == bytes_id(path.read_bytes())
    with DeltaReader(path, expected_base_id=BASE, expected_author=identity.author) as r:
        assert r.id == delta_id
        assert r.names() == sorted(tensors)
        for name, t in tensors.items():
            mask = torch.from_numpy(dare.keep_mask(7, name, t.numel(), 0.9)).reshape(t.shape)
            expected = torch.where(mask, t * float(np.float32(1 / 0.1)), torch.zeros(()))
            got = r.read_tensor(name)
            assert got.shape == t.shape
            assert torch.equal(got, expected.to(torch.float32))
            assert r.entry(name).kept == int(mask.sum())


def test_header_records_what_the_writer_was_given(tmp_path, tensors, identity):
    path = tmp_path / "d.msd"
    write(
        path,
        tensors,
        identity,
        codec="int8",
        block_size=64,
        p=0.5,
        seed=2**64 - 1,
        metadata={"steps": 3},
    )
    with DeltaReader(path) as r:
        h = r.header
    assert (h.base_id, h.author, h.kind) == (BASE, identity.author, "delta")
    assert (h.sparsifier.drop_rate, h.sparsifier.seed, h.sparsifier.prf) == (
        0.5,
        2**64 - 1,
        dare.PRF_NAME,
    )
    assert (h.codec.name, h.codec.block_size) == ("int8", 64)
    assert h.metadata == {"steps": 3}
    assert [t.shape for t in h.tensors] == [[64, 48], [48], [], [0, 4]]
    assert h.params == 64 * 48 + 48 + 1


def test_writing_is_deterministic(tmp_path, tensors, identity):
    assert write(tmp_path / "1.msd", tensors, identity) == write(
        tmp_path / "2.msd", tensors, identity
    )


def test_writer_refuses_unsorted_names_and_non_finite_values(tmp_path, identity):
    with DeltaWriter(
        tmp_path / "x.msd", base_id=BASE, identity=identity, drop_rate=0.0, seed=1
    ) as w:
        w.add("b", "F32", torch.ones(3))
        with pytest.raises(ValueError, match="sorted order"):
            w.add("a", "F32", torch.ones(3))
        with pytest.raises(NonFiniteError, match="'c'"):
            w.add("c", "F32", torch.tensor([1.0, float("nan")]))
    assert not (tmp_path / "x.msd").exists()
    assert list(tmp_path.iterdir()) == []  # the aborted writer leaves no temp files


def test_expected_author_and_base_are_enforced(tmp_path, tensors, identity):
    path = tmp_path / "d.msd"
    write(path, tensors, identity)
    with pytest.raises(SignatureError, match="expected"):
        DeltaReader(path, expected_author=Identity.generate().author)
    with pytest.raises(BaseMismatchError, match="not cdcd"):
        DeltaReader(path, expected_base_id="cd" * 32)


def test_a_header_edit_breaks_the_signature(tmp_path, tensors, identity):
    path = tmp_path / "d.msd"
    write(path, tensors, identity)
    parts = split(path)
    parts.header["metadata"] = {"steps": 1_000_000}
    (tmp_path / "edited.msd").write_bytes(assemble(parts))
    with pytest.raises(SignatureError, match="bad signature"):
        DeltaReader(tmp_path / "edited.msd")


def test_claiming_another_author_breaks_the_signature(tmp_path, tensors, identity):
    path = tmp_path / "d.msd"
    write(path, tensors, identity)
    parts = split(path)
    parts.header["author"] = Identity.generate().author  # keep the original signature
    (tmp_path / "forged.msd").write_bytes(assemble(parts))
    with pytest.raises(SignatureError):
        DeltaReader(tmp_path / "forged.msd")


def test_header_is_plain_json(tmp_path, tensors, identity):
    path = tmp_path / "d.msd"
    write(path, tensors, identity)
    header = split(path).header
    assert header["format"] == "mergeswarm-delta"
    assert json.loads(json.dumps(header)) == header


def test_an_invalid_tensor_leaves_the_writer_usable(tmp_path, identity):
    from protocol.errors import EncodeError

    path = tmp_path / "d.msd"
    with DeltaWriter(
        path, base_id=BASE, identity=identity, drop_rate=0.0, seed=1, codec="fp32"
    ) as w:
        w.add("a", "F32", torch.ones(3))
        with pytest.raises(EncodeError, match="'b'.*not a float dtype"):
            w.add("b", "I64", torch.ones(3))
        w.add("c", "F32", torch.ones(3))
        w.finish()
    with DeltaReader(path) as r:
        assert r.names() == ["a", "c"] and r.read_tensor("c").tolist() == [1.0] * 3


@pytest.mark.parametrize(
    ("codec", "value", "message"),
    [("fp16", 70000.0, "exceeds 65504"), ("bf16", 3.4e38, "largest bfloat16")],
)
def test_values_out_of_codec_range_are_an_encode_error(tmp_path, identity, codec, value, message):
    from protocol.errors import EncodeError

    with (
        DeltaWriter(
            tmp_path / "d.msd", base_id=BASE, identity=identity, drop_rate=0.0, seed=1, codec=codec
        ) as w,
        pytest.raises(EncodeError, match=message),
    ):
        w.add("a", "F32", torch.tensor([value]))


def test_oversized_metadata_is_an_encode_error(tmp_path, identity):
    from protocol.errors import EncodeError

    w = DeltaWriter(
        tmp_path / "d.msd",
        base_id=BASE,
        identity=identity,
        drop_rate=0.0,
        seed=1,
        metadata={"x": "y" * 70_000},
    )
    with w, pytest.raises(EncodeError, match="metadata exceeds"):
        w.finish()
