"""A volunteer's training data: JSONL or plain text files, tokenized and packed.

Accepted inputs:

* ``.jsonl`` / ``.json`` lines: ``{"text": ...}`` (loss on every token) or
  ``{"prompt": ..., "completion": ...}`` (loss on the completion only);
* any other file: plain UTF-8 text, one example per blank-line-separated
  paragraph.

Examples are tokenized, joined with the tokenizer's EOS token and cut into
blocks of ``seq_len`` tokens (packing). Every ``holdout_every``-th example is
held out for evaluation, so the split does not depend on file order within
an example. Labels are ``-100`` where no loss is taken (prompts).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from protocol.errors import MergeswarmError

IGNORE = -100
MAX_LINE_BYTES = 16 << 20


class DataError(MergeswarmError):
    """A data file is missing, empty, malformed, or has no usable text."""


@dataclass(frozen=True)
class Example:
    prompt: str  # no loss taken here ("" for plain text)
    text: str  # loss taken here


def read_examples(path: str | os.PathLike[str]) -> list[Example]:
    """The examples of one file; raises DataError naming the file (and line) on bad input."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the data file is empty")
    if path.suffix in (".jsonl", ".json"):
        examples = list(_jsonl(path))
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        examples = [Example("", p.strip()) for p in text.split("\n\n") if p.strip()]
    if not examples:
        raise DataError(f"{path}: no usable text (every example is empty)")
    return examples


def _jsonl(path: Path) -> Iterator[Example]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(f"{path}:{number}: a line over {MAX_LINE_BYTES >> 20} MiB")
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                raise DataError(f"{path}:{number}: not a JSON line ({exc})") from None
            yield _example(row, f"{path}:{number}")


def _example(row: object, where: str) -> Example:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "text" in row:
        text = row["text"]
        if not isinstance(text, str):
            raise DataError(f"{where}: 'text' must be a string")
        return Example("", text)
    if "prompt" in row and "completion" in row:
        prompt, completion = row["prompt"], row["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise DataError(f"{where}: 'prompt' and 'completion' must be strings")
        return Example(prompt, completion)
    raise DataError(f'{where}: expected {{"text": ...}} or {{"prompt": ..., "completion": ...}}')


@dataclass
class Packed:
    """Blocks of token ids and their labels, (N, seq_len) each."""

    input_ids: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def pack(tokenizer, examples: Sequence[Example], seq_len: int) -> Packed:
    """Tokenize, join with EOS and cut into full blocks of ``seq_len`` (the tail is padded)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    labels: list[int] = []
    for ex in examples:
        prompt = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"] if ex.prompt else []
        text = tokenizer(ex.text, add_special_tokens=False)["input_ids"]
        ids += prompt + text
        labels += [IGNORE] * len(prompt) + text
        if eos is not None:
            ids.append(eos)
            labels.append(eos)
    if not any(label != IGNORE for label in labels):
        raise DataError("no usable text: the examples tokenize to nothing to learn")
    pad = (-len(ids)) % seq_len
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    ids += [pad_id] * pad
    labels += [IGNORE] * pad
    shape = (-1, seq_len)
    return Packed(torch.tensor(ids).view(shape), torch.tensor(labels).view(shape))


@dataclass
class Dataset:
    train: Packed
    heldout: Packed
    examples: int


def load_dataset(
    paths: Sequence[str | os.PathLike[str]],
    tokenizer,
    *,
    seq_len: int = 256,
    holdout_every: int = 10,
) -> Dataset:
    """Read, split and pack the data files (at least one example is held out)."""
    if not paths:
        raise DataError("no data files given (--data FILE)")
    examples = [ex for p in paths for ex in read_examples(p)]
    heldout = examples[holdout_every - 1 :: holdout_every] or examples[-1:]
    train = [ex for i, ex in enumerate(examples) if (i + 1) % holdout_every] or examples
    return Dataset(
        pack(tokenizer, train, seq_len), pack(tokenizer, heldout, seq_len), len(examples)
    )


def load_mixture(
    paths: Sequence[str | os.PathLike[str]], tokenizer, *, seq_len: int = 256
) -> Dataset:
    """Several files as one dataset, each split on its own exactly as :func:`load_dataset`
    splits it alone (so no file's held-out examples leak into training), and balanced:
    each file's training blocks repeat until it has as many as the largest."""
    parts = [load_dataset([p], tokenizer, seq_len=seq_len) for p in paths]
    most = max(len(d.train) for d in parts)

    def repeat(p: Packed) -> Packed:
        index = torch.arange(most) % len(p)
        return Packed(p.input_ids[index], p.labels[index])

    def cat(packs: list[Packed]) -> Packed:
        return Packed(torch.cat([p.input_ids for p in packs]), torch.cat([p.labels for p in packs]))

    return Dataset(
        cat([repeat(d.train) for d in parts]),
        cat([d.heldout for d in parts]),
        sum(d.examples for d in parts),
    )
