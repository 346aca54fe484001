"""Training data: formats, prompt masking, packing, the held-out split, bad files."""

from __future__ import annotations

import json

import pytest
import torch

from node.training.data import (
    IGNORE,
    DataError,
    Example,
    load_dataset,
    load_mixture,
    pack,
    read_examples,
)
from node.training.tiny_model import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_jsonl_text_and_prompt_completion_and_plain_text(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "hello"}\n\n{"prompt": "Q?", "completion": " A."}\n')
    assert read_examples(jsonl) == [Example("", "hello"), Example("Q?", " A.")]
    text = tmp_path / "d.txt"
    text.write_text("first paragraph\nstill first\n\n\nsecond\n")
    assert read_examples(text) == [
        Example("", "first paragraph\nstill first"),
        Example("", "second"),
    ]


def test_loss_is_taken_on_completions_only(tokenizer):
    packed = pack(tokenizer, [Example("the prompt", " the answer")], seq_len=64)
    n_prompt = len(tokenizer("the prompt", add_special_tokens=False)["input_ids"])
    n_total = n_prompt + len(tokenizer(" the answer", add_special_tokens=False)["input_ids"]) + 1
    ids, labels = packed.input_ids[0], packed.labels[0]
    assert (labels[:n_prompt] == IGNORE).all()  # the prompt
    assert (labels[n_prompt:n_total] == ids[n_prompt:n_total]).all()  # completion and EOS
    assert (labels[n_total:] == IGNORE).all()  # padding


def test_packing_fills_blocks_and_every_tenth_example_is_held_out(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(f'{{"text": "example number {i}"}}\n' for i in range(30)))
    data = load_dataset([path], tokenizer, seq_len=16)
    assert data.examples == 30
    assert data.train.input_ids.shape[1] == 16 and data.heldout.input_ids.shape[1] == 16
    held = tokenizer.decode(data.heldout.input_ids.flatten().tolist())
    assert "example number 9" in held and "example number 19" in held and "number 8" not in held


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        (None, ".jsonl", "no such data file"),
        (b"", ".jsonl", "empty"),
        (b'{"text": 1}\n', ".jsonl", ":1: 'text' must be a string"),
        (b'["a"]\n', ".jsonl", ":1: expected a JSON object"),
        (b'{"text": "ok"}\n{oops\n', ".jsonl", ":2: not a JSON line"),
        (b"\n\n  \n", ".txt", "no usable text"),
        (b"\xff\xfe\x00bad", ".txt", "not UTF-8"),
    ],
)
def test_bad_data_files_are_named_with_the_problem(tmp_path, content, suffix, message):
    path = tmp_path / f"d{suffix}"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_examples(path)


def test_a_mixture_splits_each_file_alone_and_balances_them(tmp_path, tokenizer):
    big, small = tmp_path / "big.jsonl", tmp_path / "small.jsonl"
    big.write_text("".join(json.dumps({"text": f"big {i} " * 8}) + "\n" for i in range(40)))
    small.write_text("".join(json.dumps({"text": f"small {i} " * 8}) + "\n" for i in range(10)))
    mixed = load_mixture([big, small], tokenizer, seq_len=16)
    alone = [load_dataset([p], tokenizer, seq_len=16) for p in (big, small)]
    assert len(mixed.train) == 2 * len(alone[0].train)  # the small file repeated to match
    torch.testing.assert_close(
        mixed.heldout.input_ids,
        torch.cat([alone[0].heldout.input_ids, alone[1].heldout.input_ids]),
    )
    held_rows = {tuple(r) for r in mixed.heldout.input_ids.tolist()}
    assert not held_rows & {tuple(r) for r in mixed.train.input_ids.tolist()}
