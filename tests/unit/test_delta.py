"""Delta semantics: child = base + decoded delta; what cannot become a delta is refused."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from protocol import dare
from protocol.container import DeltaReader, DeltaWriter
from protocol.delta import apply_deltas, check_fits, create_delta
from protocol.errors import BaseMismatchError, EncodeError
from protocol.identity import Identity
from protocol.ids import base_id
from protocol.model_dir import ModelDir
from tests.forge import assemble, split

BOUNDS = {  # (relative, absolute) error of each codec, from protocol/codecs.py
    "fp32": (0.0, 0.0),
    "bf16": (2.0**-8, 2.0**-134),
    "fp16": (2.0**-11, 2.0**-25),
}


ROUND_TRIPS = dict(
    shape=st.lists(st.integers(0, 40), min_size=0, max_size=3),
    p=st.sampled_from([0.0, 0.3, 0.9, 0.99]),
    codec=st.sampled_from(["fp32", "bf16", "fp16", "int8", "int4", "sign"]),
    seed=st.integers(0, 2**64 - 1),
)
EXAMPLES = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _one_tensor(tmp_path_factory, identity, shape, p, codec, seed, *, feedback=False):
    """Tensor ``t`` (small random values) written alone and read back: (it, what a reader
    decodes, what the writer says it left out or None, the DARE keep-mask)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed % 1000)) * 0.01
    path = tmp_path_factory.mktemp("rt") / "d.msd"
    left = None
    with DeltaWriter(
        path, base_id="00" * 32, identity=identity, drop_rate=p, seed=seed, codec=codec
    ) as w:
        if feedback:
            left = torch.from_numpy(w.add_with_feedback("t", "F32", x)).reshape(x.shape)
        else:
            w.add("t", "F32", x)
        w.finish()
    with DeltaReader(path) as r:
        got = r.read_tensor("t")
    mask = torch.from_numpy(dare.keep_mask(seed, "t", x.numel(), p)).reshape(x.shape)
    return x, got, left, mask


@EXAMPLES
@given(**ROUND_TRIPS)
def test_container_round_trip_is_within_the_codec_bound(
    tmp_path_factory, identity, shape, p, codec, seed
):
    x, got, _, mask = _one_tensor(tmp_path_factory, identity, shape, p, codec, seed)
    want = torch.where(mask, x, torch.zeros(())) * float(dare.rescale_factor(p))
    scale = float(dare.rescale_factor(p))
    if codec in ("int8", "int4", "sign"):
        # int8, int4: half a step, absmax / (2 * the largest code); sign: the block's absmax
        steps = {"int8": 254, "int4": 14, "sign": 1}[codec]
        bound = x.abs().max().item() * scale / steps * 1.0001 if x.numel() else 0.0
        assert (got - want).abs().max().item() <= bound if x.numel() else got.numel() == 0
    else:
        rel, absolute = BOUNDS[codec]
        assert torch.all((got - want).abs() <= rel * want.abs() * 1.0001 + absolute * scale)
    assert torch.all(got[~mask] == 0)


@EXAMPLES
@given(**ROUND_TRIPS)
def test_what_a_delta_sends_plus_what_it_leaves_out_is_its_target(
    tmp_path_factory, identity, shape, p, codec, seed
):
    x, sent, left, mask = _one_tensor(
        tmp_path_factory, identity, shape, p, codec, seed, feedback=True
    )
    # to float32 rounding of the largest of the three (a sign code's scale can exceed |x|)
    largest = torch.maximum(x.abs(), torch.maximum(sent.abs(), left.abs()))
    assert torch.all((sent + left - x).abs() <= 2.0**-23 * largest + 1e-30)
    assert torch.equal(left[~mask], x[~mask])  # a dropped entry waits whole
    assert torch.all(sent[~mask] == 0)
    if codec == "fp32":  # a kept entry arrives as it is, not scaled up by 1 / (1 - p)
        assert torch.allclose(sent[mask], x[mask], rtol=1e-6, atol=0)


def _save(dir_, tensors):
    dir_.mkdir()
    save_file(tensors, dir_ / "model.safetensors")
    return dir_


def test_non_float_tensors_must_be_unchanged(tmp_path, identity):
    base = _save(tmp_path / "b", {"w": torch.zeros(4), "steps": torch.tensor([1, 2])})
    same = _save(tmp_path / "s", {"w": torch.ones(4), "steps": torch.tensor([1, 2])})
    changed = _save(tmp_path / "c", {"w": torch.ones(4), "steps": torch.tensor([1, 3])})
    _, header = create_delta(
        base, same, tmp_path / "ok.msd", identity=identity, drop_rate=0.0, codec="fp32"
    )
    assert [t.name for t in header.tensors] == ["w"]
    child = apply_deltas(base, [tmp_path / "ok.msd"], tmp_path / "child")
    assert load_file(child / "model.safetensors")["steps"].tolist() == [1, 2]
    assert load_file(child / "model.safetensors")["w"].tolist() == [1.0] * 4
    with pytest.raises(BaseMismatchError, match="non-float tensor 'steps'"):
        create_delta(base, changed, tmp_path / "bad.msd", identity=identity)
    assert not (tmp_path / "bad.msd").exists()


def test_a_finetune_with_another_architecture_is_refused(tmp_path, identity):
    base = _save(tmp_path / "b", {"a": torch.zeros(4), "b": torch.zeros(2)})
    fewer = _save(tmp_path / "f", {"a": torch.zeros(4)})
    other_shape = _save(tmp_path / "o", {"a": torch.zeros(2, 2), "b": torch.zeros(2)})
    with pytest.raises(BaseMismatchError, match="lacks 'b'"):
        create_delta(base, fewer, tmp_path / "x.msd", identity=identity)
    with pytest.raises(BaseMismatchError, match="shape \\[2, 2\\]"):
        create_delta(base, other_shape, tmp_path / "x.msd", identity=identity)


def test_header_is_hashed_in_the_same_pass_as_the_base(
    tmp_path, identity, tiny_base, tiny_finetuned
):
    _, header = create_delta(tiny_base, tiny_finetuned, tmp_path / "d.msd", identity=identity)
    assert header.base_id == base_id(tiny_base)


def test_a_resigned_delta_with_lying_shapes_is_refused_before_writing(tmp_path, identity):
    base = _save(tmp_path / "b", {"w": torch.zeros(6)})
    ft = _save(tmp_path / "f", {"w": torch.ones(6)})
    create_delta(base, ft, tmp_path / "d.msd", identity=identity, drop_rate=0.0, codec="fp32")
    parts = split(tmp_path / "d.msd")
    parts.header["tensors"][0]["shape"] = [
        2,
        3,
    ]  # same count, different shape: only the base can tell
    (tmp_path / "lie.msd").write_bytes(assemble(parts, Identity.generate()))
    with pytest.raises(BaseMismatchError, match="F32\\[2, 3\\]"):
        apply_deltas(base, [tmp_path / "lie.msd"], tmp_path / "child")
    assert not (tmp_path / "child").exists()
    with DeltaReader(tmp_path / "d.msd") as r:
        check_fits(r, ModelDir(base), base_id(base))


def test_several_deltas_add_up(tmp_path, identity):
    base = _save(tmp_path / "b", {"w": torch.zeros(5, dtype=torch.bfloat16)})
    one = _save(tmp_path / "one", {"w": torch.full((5,), 1.0, dtype=torch.bfloat16)})
    two = _save(tmp_path / "two", {"w": torch.full((5,), 2.0, dtype=torch.bfloat16)})
    for name, ft in (("1", one), ("2", two)):
        create_delta(
            base, ft, tmp_path / f"{name}.msd", identity=identity, drop_rate=0.0, codec="fp32"
        )
    child = apply_deltas(base, [tmp_path / "1.msd", tmp_path / "2.msd"], tmp_path / "child")
    w = load_file(child / "model.safetensors")["w"]
    assert w.dtype == torch.bfloat16 and w.tolist() == [3.0] * 5


def test_an_overflowing_sum_is_refused_naming_the_tensor(tmp_path, identity):
    base = _save(tmp_path / "b", {"w": torch.zeros(8, dtype=torch.float16)})
    ft = _save(tmp_path / "f", {"w": torch.full((8,), 60000.0, dtype=torch.float16)})
    create_delta(
        base, ft, tmp_path / "d.msd", identity=identity, drop_rate=0.5, seed=3, codec="fp32"
    )
    with pytest.raises(EncodeError, match="'w': base \\+ deltas overflows F16"):
        apply_deltas(base, [tmp_path / "d.msd"], tmp_path / "child")
    assert not (tmp_path / "child").exists()


def test_the_same_delta_twice_is_refused(tmp_path, identity):
    base = _save(tmp_path / "b", {"w": torch.zeros(4)})
    ft = _save(tmp_path / "f", {"w": torch.ones(4)})
    create_delta(base, ft, tmp_path / "d.msd", identity=identity)
    with pytest.raises(BaseMismatchError, match="the same delta as"):
        apply_deltas(base, [tmp_path / "d.msd", tmp_path / "d.msd"], tmp_path / "child")


def test_an_int4_delta_applies_within_its_bound(tmp_path, identity):
    g = torch.Generator().manual_seed(4)
    base_w = {"w": torch.randn(33, 7, generator=g), "b": torch.randn(5, generator=g)}
    step = {name: torch.randn(t.shape, generator=g) * 1e-4 for name, t in base_w.items()}
    base = _save(tmp_path / "b", base_w)
    ft = _save(tmp_path / "f", {name: t + step[name] for name, t in base_w.items()})
    _, header = create_delta(
        base, ft, tmp_path / "d.msd", identity=identity, drop_rate=0.5, seed=11, codec="int4"
    )
    assert (header.codec.name, header.codec.block_size) == ("int4", 64)
    child = load_file(
        apply_deltas(base, [tmp_path / "d.msd"], tmp_path / "child") / "model.safetensors"
    )
    for name, b in base_w.items():
        mask = torch.from_numpy(dare.keep_mask(11, name, b.numel(), 0.5)).reshape(b.shape)
        # what reached the delta: the finetune's float32 difference, kept and doubled
        sent = torch.where(mask, (b + step[name]) - b, torch.zeros(())) * 2
        bound = sent.abs().max().item() / 14 * 1.0001 + 2.0**-23 * child[name].abs()
        assert torch.all((child[name] - (b + sent)).abs() <= bound), name
        assert torch.equal(child[name][~mask], b[~mask])
