"""Tiny causal language models built from a config, for the demo, tests and benchmarks.

Nothing is downloaded: the tokenizer is a byte-level BPE trained on a built-in
corpus and the weights are randomly initialised from a seed.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

CORPUS = [
    "the swarm trains a shared model and every volunteer adds what it learned",
    "deltas are sparse and small so they travel fast between peers",
    "an aggregator merges the deltas into the next base model",
    "volunteers download the new base and keep training on their own data",
    "signatures prove who made a delta and hashes prove what it holds",
    "a merge keeps the entries whose signs agree and averages them",
    "drop most of a delta at random and rescale the rest: the model barely notices",
    "the quick brown fox jumps over the lazy dog while the swarm keeps learning",
]


def build_tokenizer(vocab_size: int = 384, corpus: list[str] | None = None):
    """A byte-level BPE tokenizer trained on ``corpus`` (default CORPUS; any text encodes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus or CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def build_tiny_model(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate_size: int = 128,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    corpus: list[str] | None = None,
    vocab_size: int = 384,
) -> Path:
    """Save a randomly initialised Llama-architecture model and its tokenizer to ``out_dir``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(vocab_size, corpus)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    out = Path(out_dir)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    tokenizer.save_pretrained(out)
    return out
