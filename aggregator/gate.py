"""What held-out text says about a round, for an aggregator given ``--eval-data``.

Two checks, both on that data's held-out blocks:

* :meth:`EvalGate.contributions`: each delta applied alone to the parent, at
  ``SCORE_SCALE`` of its size, and how far it moved the parent's loss. A
  delta that raises it (a sign flip,
  noise, a spike) is refused before the merge, and merge weights follow what
  each delta bought (aggregator.screening.weigh_round), so that deltas which
  buy nothing (a crowd of near-empty ones) cannot dilute those that do.
* :meth:`EvalGate.judge`: the merged child against its parent; a child whose
  loss rose by more than ``max_increase`` (a fraction) is not published: the
  backstop for poisoning that passes every per-delta check.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Deltas are scored at a quarter of their size: about their share of a round's average, where
# a delta's direction decides. At full size, DARE's rescaled noise outweighs what a short
# round of honest training buys (on the tiny demo model, two of four honest deltas raised the
# loss at full size; all four lowered it at a quarter), while a sign flip, noise, a spike or a
# scaled delta still raises it (scripts/bench_robustness.py).
SCORE_SCALE = 0.25


@dataclass(frozen=True)
class Verdict:
    losses: tuple[float, float]  # (parent, child)
    passed: bool


@dataclass(frozen=True)
class Contributions:
    """The parent's loss, and each delta's loss drop when applied alone at the scale scored
    (positive: it helped; ``-inf``: the sum overflowed or the loss is not a number)."""

    parent_loss: float
    gains: list[float]


@dataclass
class EvalGate:
    data: list[str]
    max_increase: float = 0.05
    blocks: int = 64
    _loaded: dict = field(default_factory=dict, repr=False)

    def _dataset(self, model_dir: Path):
        from transformers import AutoTokenizer

        from node.training.data import load_dataset

        if "data" not in self._loaded:  # one tokenizer per swarm: read the data once
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            self._loaded["data"] = load_dataset(self.data, tokenizer)
        return self._loaded["data"]

    def judge(self, parent: Path, child: Path) -> Verdict:
        from node.training.trainer import heldout_loss

        data = self._dataset(parent)
        before = heldout_loss(parent, data, blocks=self.blocks)
        after = heldout_loss(child, data, blocks=self.blocks)
        return Verdict((before, after), after <= before * (1 + self.max_increase))

    def contributions(
        self, parent: Path, deltas: Sequence[Path], scale: float = SCORE_SCALE
    ) -> Contributions:
        """Each ``.msd`` in ``deltas`` (already inspected against ``parent``) applied alone,
        times ``scale``.

        The parent is loaded once; each delta is added to its weights in place and taken
        off again by restoring the touched tensors, so the cost is one evaluation per delta.
        """
        from node.config import TrainOptions
        from node.training.trainer import Trainer
        from protocol.container import DeltaReader

        options = TrainOptions(eval_blocks=self.blocks, batch_size=8)
        trainer = Trainer(parent, self._dataset(parent), options)
        state = trainer.model.state_dict()  # shares storage with the model's parameters
        before = trainer.evaluate()
        gains = []
        for path in deltas:
            saved: dict[str, torch.Tensor] = {}
            try:
                with DeltaReader(path) as reader:
                    for name in reader.names():
                        saved[name] = state[name].clone()
                        delta = reader.read_tensor(name).to(state[name].device, state[name].dtype)
                        state[name].add_(delta, alpha=scale)
                after = trainer.evaluate()
            finally:
                for name, original in saved.items():
                    state[name].copy_(original)
            gains.append(before - after if math.isfinite(after) else -math.inf)
        return Contributions(before, gains)
