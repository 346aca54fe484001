"""The evaluation gate: a merged child whose held-out loss rose too far is not published."""

from __future__ import annotations

import json

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
