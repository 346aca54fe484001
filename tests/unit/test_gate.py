"""The evaluation gate: a merged child whose held-out loss rose too far is not published."""

from __future__ import annotations

import json

import pytest

from aggregator.gate import EvalGate
from node.training.tiny_model import CORPUS
from protocol.model_dir import ModelDir, write_model_dir


def _gate(tmp_path, max_increase: float) -> EvalGate:
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS * 4))
    return EvalGate([str(path)], max_increase=max_increase, blocks=8)


def test_a_child_that_models_the_data_better_passes(tmp_path, tiny_base, tiny_finetuned):
    verdict = _gate(tmp_path, 0.0).judge(tiny_base, tiny_finetuned)
    before, after = verdict.losses
    assert verdict.passed and after < before


def test_a_poisoned_child_is_refused(tmp_path, tiny_base, tiny_finetuned):
    # the output layer blown up: confident, wrong predictions
    with ModelDir(tiny_base) as md:
        poisoned = write_model_dir(
            tmp_path / "poisoned",
            md,
            ((n, md.tensor(n) * (1000 if n == "lm_head.weight" else 1)) for n in md.names()),
        )
    verdict = _gate(tmp_path, 0.05).judge(tiny_base, poisoned)
    before, after = verdict.losses
    assert not verdict.passed and after > before * 1.05


def test_the_allowed_increase_is_the_threshold(tmp_path, tiny_base, tiny_finetuned):
    # The fine-tune made the loss fall; judged the other way round, it rises by r.
    rise = _gate(tmp_path, 0.0).judge(tiny_finetuned, tiny_base)
    before, after = rise.losses
    r = after / before - 1
    assert r > 0 and not rise.passed
    assert _gate(tmp_path, r * 1.01).judge(tiny_finetuned, tiny_base).passed
    assert not _gate(tmp_path, r * 0.99).judge(tiny_finetuned, tiny_base).passed


def _deltas(tmp_path, base, finetuned):
    """The fine-tune as a delta, and the same delta negated (a sign flip)."""
    from protocol.delta import TensorMap, create_delta
    from protocol.identity import Identity

    identity = Identity.generate()
    honest, flipped = tmp_path / "honest.msd", tmp_path / "flipped.msd"
    create_delta(base, finetuned, honest, identity=identity, drop_rate=0.0, codec="fp32")
    with ModelDir(base) as b, ModelDir(finetuned) as f:
        flip = {n: 2 * b.tensor(n) - f.tensor(n) for n in b.names()}
    create_delta(base, TensorMap(flip), flipped, identity=identity, drop_rate=0.0, codec="fp32")
    return honest, flipped


def test_contributions_score_each_delta_alone_on_the_parent(tmp_path, tiny_base, tiny_finetuned):
    honest, flipped = _deltas(tmp_path, tiny_base, tiny_finetuned)
    gate = _gate(tmp_path, 0.05)
    scored = gate.contributions(tiny_base, [honest, flipped, honest], scale=1.0)
    gain, flip_gain, again = scored.gains
    assert gain > 0 > flip_gain
    assert again == gain  # the parent was restored after each delta
    judged = gate.judge(tiny_base, tiny_finetuned)
    assert scored.parent_loss == judged.losses[0]
    assert gain == pytest.approx(judged.losses[0] - judged.losses[1], abs=1e-5)  # the fine-tune


def test_contributions_apply_each_delta_at_the_scale_scored(tmp_path, tiny_base, tiny_finetuned):
    honest, _ = _deltas(tmp_path, tiny_base, tiny_finetuned)
    gate = _gate(tmp_path, 0.05)
    full = gate.contributions(tiny_base, [honest], scale=1.0).gains[0]
    quarter = gate.contributions(tiny_base, [honest], scale=0.25).gains[0]
    assert 0 < quarter < full
