"""Error feedback: what is left out of a delta is delivered by the deltas after it, and the
volunteer's residual files follow the heads. (One delta's bookkeeping, sent + left out =
target: tests/unit/test_delta.py.)"""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file

from node.volunteer.feedback import Feedback
from protocol.container import DeltaReader
from protocol.delta import create_delta
from protocol.records import Head


def _model(dir_, tensors):
    dir_.mkdir()
    save_file(tensors, dir_ / "model.safetensors")
    return dir_


def test_rounds_of_feedback_deliver_the_whole_delta_that_one_round_would_mostly_drop(
    tmp_path, identity
):
    # The same update every round; with p = 0.9, one round's delta sends a tenth of it. What
    # is left out is carried: after R rounds every entry has arrived once it was drawn.
    g = torch.Generator().manual_seed(0)
    base = _model(tmp_path / "base", {"w": torch.zeros(64, 64), "b": torch.zeros(64)})
    step = {"w": torch.randn(64, 64, generator=g), "b": torch.randn(64, generator=g)}
    tuned = _model(tmp_path / "tuned", step)
    rounds, carry, delivered = 60, None, {n: torch.zeros_like(t) for n, t in step.items()}
    for r in range(rounds):
        left: dict[str, torch.Tensor] = {}
        out = tmp_path / f"d{r}.msd"
        create_delta(base, tuned, out, identity=identity, drop_rate=0.9, seed=r, codec="bf16",
                     carry=carry, left=left)  # fmt: skip
        with DeltaReader(out) as reader:
            for name in step:
                delivered[name] += reader.read_tensor(name)
        for name in step:  # bookkeeping: everything so far, sent or still held back
            total = (r + 1) * step[name]
            assert torch.allclose(delivered[name] + left[name], total, rtol=1e-5, atol=1e-5)
        carry = left
    # what is held back stays bounded: an entry waits about 1 / (1 - p) rounds to be drawn
    held_back = sum(float(t.norm() ** 2) for t in carry.values()) ** 0.5
    total = sum(float((rounds * t).norm() ** 2) for t in step.values()) ** 0.5
    print(f"held back {held_back / total:.3f} of the total")
    assert held_back < 0.4 * total


def test_carry_without_somewhere_to_put_what_is_left_out_is_refused(tmp_path, identity):
    base = _model(tmp_path / "base", {"w": torch.zeros(4)})
    with pytest.raises(ValueError, match="pass left too"):
        create_delta(base, base, tmp_path / "d.msd", identity=identity,
                     carry={"w": torch.ones(4)})  # fmt: skip


def _head(base: str, round_: int, parent: str | None = None) -> Head:
    return Head(base_id=base, round=round_, parent=parent, deltas=0)


SHAPES = {"w": (2, 3), "b": (3,)}


def _tensors(value: float) -> dict[str, torch.Tensor]:
    return {n: torch.full(s, value) for n, s in SHAPES.items()}


def test_what_the_last_delta_left_out_is_carried_to_a_head_that_descends_from_its_base(tmp_path):
    b0, b1 = "a" * 64, "b" * 64
    feedback = Feedback(tmp_path / "residual")
    assert feedback.carry_for(_head(b0, 0), SHAPES, lambda _: True) == {}  # nothing yet
    feedback.record(_head(b0, 0), _tensors(1.0))  # a first delta on b0
    assert feedback.carry_for(_head(b0, 0), SHAPES, lambda _: True) == {}  # b0 again: not twice
    feedback.record(_head(b0, 0), _tensors(2.0))  # a second delta on b0 replaces the first
    # a restart: another instance on the same files; the next head descends from b0
    again = Feedback(tmp_path / "residual")
    carried = again.carry_for(_head(b1, 1, parent=b0), SHAPES, lambda base: base == b0)
    assert all(torch.equal(carried[n], _tensors(2.0)[n]) for n in SHAPES)
    again.record(_head(b1, 1, parent=b0), _tensors(3.0))
    # a second delta on b1 gets what the deltas on b0 left out, not what the first on b1 did
    carried = again.carry_for(_head(b1, 1, parent=b0), SHAPES, lambda base: base == b0)
    assert all(torch.equal(carried[n], _tensors(2.0)[n]) for n in SHAPES)


def test_what_was_left_out_on_a_base_the_new_head_does_not_descend_from_is_dropped(
    tmp_path, caplog
):
    feedback = Feedback(tmp_path / "residual")
    feedback.record(_head("a" * 64, 0), _tensors(1.0))
    fork = _head("c" * 64, 1, parent="d" * 64)
    with caplog.at_level(logging.WARNING):
        assert feedback.carry_for(fork, SHAPES, lambda _: False) == {}
    assert "does not descend" in caplog.text


def test_an_unreadable_or_misshapen_residual_is_set_aside_with_a_reason(tmp_path, caplog):
    feedback = Feedback(tmp_path / "residual")
    b0, b1 = "a" * 64, "b" * 64
    feedback.record(_head(b0, 0), _tensors(1.0))
    with caplog.at_level(logging.WARNING):
        other = {"w": (3, 2), "b": (3,)}  # the base changed shape: not this model's
        assert feedback.carry_for(_head(b1, 1, parent=b0), other, lambda _: True) == {}
    assert "does not have in that shape" in caplog.text
    (tmp_path / "residual" / "left.safetensors").write_bytes(b"\x00garbage")
    (tmp_path / "residual" / "carried.safetensors").unlink()
    with caplog.at_level(logging.WARNING):
        assert feedback.carry_for(_head(b1, 1, parent=b0), SHAPES, lambda _: True) == {}
    assert "unreadable" in caplog.text
