"""An optional last check of a round: does the merged child still model held-out text?

An aggregator given ``--eval-data`` measures the parent's and the child's loss
on that data's held-out blocks and refuses to publish a child whose loss rose
by more than ``max_increase`` (a fraction): the backstop for poisoning that
passes every per-delta check.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Verdict:
    losses: tuple[float, float]  # (parent, child)
    passed: bool


@dataclass(frozen=True)
class EvalGate:
    data: list[str]
    max_increase: float = 0.05
    blocks: int = 64

    def judge(self, parent: Path, child: Path) -> Verdict:
        from transformers import AutoTokenizer

        from node.training.data import load_dataset
        from node.training.trainer import heldout_loss

        data = load_dataset(self.data, AutoTokenizer.from_pretrained(parent))
        before = heldout_loss(parent, data, blocks=self.blocks)
        after = heldout_loss(child, data, blocks=self.blocks)
        return Verdict((before, after), after <= before * (1 + self.max_increase))
