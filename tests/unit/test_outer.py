"""The outer optimizer: Nesterov against a plain reference, momentum files, exact replay."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from aggregator.engine import MergeInput, merge_models
from aggregator.methods import Recipe
from aggregator.outer import OuterStep, nesterov_step, outer_lr
from protocol.ids import file_hasher
from protocol.model_dir import FLOAT_DTYPES, ModelDir
from protocol.momentum import (
    MomentumError,
    MomentumReader,
    MomentumWriter,
    momentum_layout,
    momentum_size,
)

LR, MU = 0.7, 0.9


def _weights(path) -> dict[str, torch.Tensor]:
    with ModelDir(path) as md:
        return {n: md.tensor(n).clone() for n in md.names()}


def test_nesterov_follows_a_float64_reference_over_rounds():
    gen = torch.Generator().manual_seed(0)
    deltas = [torch.randn(64, generator=gen) * 0.01 for _ in range(5)]
    m64, params64 = torch.zeros(64, dtype=torch.float64), torch.zeros(64, dtype=torch.float64)
    params, momentum = torch.zeros(64), None
    for d in deltas:
        m64 = MU * m64 + d.double()
        params64 += LR * (d.double() + MU * m64)
        update, momentum = nesterov_step(d, momentum, LR, MU)
        params += update
    torch.testing.assert_close(momentum.double(), m64, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(params.double(), params64, rtol=1e-5, atol=1e-7)


def test_with_no_momentum_the_step_is_the_delta_times_lr():
    d = torch.tensor([1.0, -2.0, 0.5])
    update, m = nesterov_step(d, None, 0.5, 0.0)
    assert torch.equal(update, d * 0.5) and torch.equal(m, d)


def test_the_outer_lr_ramps_up_over_the_warmup_rounds():
    assert [outer_lr(0.8, 4, r) for r in (1, 2, 4, 9)] == [0.2, 0.4, 0.8, 0.8]
    assert outer_lr(0.8, 0, 1) == 0.8


def _merge(base, inputs, out, previous=None, lr=LR):
    step = OuterStep(lr=lr, momentum=MU, previous=previous, out=out.with_suffix(".momentum"))
    report = merge_models(base, inputs, Recipe("linear"), out, outer=step)
    return report.child_id, step.out


def test_two_rounds_move_the_base_by_nesterov_on_the_merged_deltas(tiny_base, finetunes, tmp_path):
    base = _weights(tiny_base)
    fts = [_weights(f) for f in finetunes]
    child1, m1 = _merge(tiny_base, [MergeInput(f) for f in finetunes], tmp_path / "r1")
    got1 = _weights(tmp_path / "r1")
    # round 2: the same fine-tunes' weights, now a different delta against the new base
    child2, _ = _merge(tmp_path / "r1", [MergeInput(f) for f in finetunes], tmp_path / "r2", m1)
    got2 = _weights(tmp_path / "r2")
    moved = 0
    for name, b in base.items():
        if b.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            continue
        d1 = sum(ft[name].float() - b.float() for ft in fts) / len(fts)
        m = d1
        want1 = b.float() + LR * (d1 + MU * m)
        torch.testing.assert_close(got1[name].float(), want1, rtol=1e-5, atol=1e-6)
        d2 = sum(ft[name].float() - got1[name].float() for ft in fts) / len(fts)
        m = MU * m + d2
        want2 = got1[name].float() + LR * (d2 + MU * m)
        torch.testing.assert_close(got2[name].float(), want2, rtol=1e-5, atol=1e-6)
        moved += int(not torch.equal(got2[name], got1[name]))
    assert moved > 0 and child1 != child2


def test_replaying_a_round_gives_the_same_base_id_and_momentum_bytes(
    tiny_base, finetunes, tmp_path
):
    _, m1 = _merge(tiny_base, [MergeInput(finetunes[0])], tmp_path / "r1")
    runs = []
    for n, order in enumerate((finetunes, finetunes[::-1])):
        out = tmp_path / f"replay{n}"
        child, momentum = _merge(tmp_path / "r1", [MergeInput(f) for f in order], out, m1)
        runs.append((child, file_hasher(momentum).hexdigest()))
    assert runs[0] == runs[1]
    assert m1.stat().st_size == momentum_size(ModelDir(tiny_base))


def test_momentum_holds_the_base_float_tensors_in_float32(tiny_base, finetunes, tmp_path):
    _, m1 = _merge(tiny_base, [MergeInput(finetunes[0])], tmp_path / "r1")
    base = ModelDir(tiny_base)
    floats = [n for n in base.names() if base.tensors[n].dtype in FLOAT_DTYPES]
    with ModelDir(m1) as md:
        assert md.names() == floats
        assert {i.dtype for i in md.tensors.values()} == {"F32"}


def _momentum_file(path, tensors):
    save_file(tensors, str(path))
    return path


def test_a_momentum_of_another_shape_dtype_or_with_nan_is_refused(tiny_base, tmp_path):
    base = ModelDir(tiny_base)
    good = {i.name: torch.zeros(i.shape) for i in momentum_layout(base)}
    name = next(iter(good))
    cases = {
        "missing": {k: v for k, v in good.items() if k != name},
        "extra": good | {"stowaway": torch.zeros(2)},
        "shape": good | {name: torch.zeros(3)},
        "dtype": good | {name: good[name].half()},
    }
    for label, tensors in cases.items():
        with pytest.raises(MomentumError):
            MomentumReader(_momentum_file(tmp_path / f"{label}.st", tensors), base)
    nan = good | {name: torch.full(good[name].shape, float("nan"))}
    reader = MomentumReader(_momentum_file(tmp_path / "nan.st", nan), base)
    with pytest.raises(MomentumError, match="NaN"):
        reader.tensor(name)
    (tmp_path / "junk.st").write_bytes(b"\x10" + b"\x00" * 7 + b"not json")
    with pytest.raises(MomentumError, match="not a valid safetensors"):
        MomentumReader(tmp_path / "junk.st", base)


def test_an_unfinished_momentum_file_never_appears(tiny_base, tmp_path):
    base = ModelDir(tiny_base)
    first = momentum_layout(base)[0]
    out = tmp_path / "m.st"
    with pytest.raises(MomentumError, match="never written"), MomentumWriter(out, base) as w:
        w.add(first.name, torch.zeros(first.shape))
    assert list(tmp_path.iterdir()) == []
