"""Session fixtures: tiny models built from a config (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from node.tiny_model import CORPUS, build_tiny_model
from node.training import quick_finetune
from protocol.identity import Identity


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "base", seed=0)


@pytest.fixture(scope="session")
def tiny_finetuned(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "finetuned"
    quick_finetune(tiny_base, out, CORPUS, steps=5)
    return out


@pytest.fixture(scope="session")
def tiny_base_bf16_sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same architecture in bf16, split into several safetensors shards."""
    return build_tiny_model(
        tmp_path_factory.mktemp("models") / "base-bf16",
        seed=3,
        dtype=torch.bfloat16,
        max_shard_size="40KB",
    )


@pytest.fixture(scope="session")
def identity() -> Identity:
    return Identity.generate()
