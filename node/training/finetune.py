"""Local training of a causal LM from a base directory.

For now a short full fine-tune used by the demo, tests and benchmarks; the
volunteer's real trainer (data files, LoRA, budgets, checkpoints) grows here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class FinetuneResult:
    out_dir: Path
    loss_before: float  # mean loss over the texts before the first step
    loss_after: float  # the same, after the last step
    steps: int


def lm_batch(tokenizer, texts: Sequence[str]) -> tuple[dict, torch.Tensor]:
    """A padded batch and its causal-LM labels (padding excluded from the loss)."""
    batch = tokenizer(list(texts), return_tensors="pt", padding=True)
    batch.pop("token_type_ids", None)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch, labels


def mean_loss(model, batch: dict, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(**batch, labels=labels).loss)


def quick_finetune(
    base_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    texts: Sequence[str],
    *,
    steps: int = 20,
    lr: float = 1e-3,
    seed: int = 0,
) -> FinetuneResult:
    """Full fine-tune of ``base_dir`` on ``texts`` for ``steps`` AdamW steps on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    base_dtype = model.dtype  # trained in float32, saved back as the base was
    model.float().train()
    batch, labels = lm_batch(tokenizer, texts)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    before = mean_loss(model, batch, labels)
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    after = mean_loss(model, batch, labels)
    model.to(base_dtype).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return FinetuneResult(Path(out_dir), before, after, steps)
