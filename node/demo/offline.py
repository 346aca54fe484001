"""The embedded main job: one volunteer's round trip on a tiny model, offline.

genesis model -> short fine-tune -> delta (DARE + codec + zstd + signature)
-> inspect -> apply to the genesis -> load with transformers -> compare losses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from node.training.finetune import lm_batch, mean_loss, quick_finetune
from node.training.tiny_model import CORPUS, build_tiny_model
from protocol.constants import DEFAULT_CODEC
from protocol.container import DeltaReader
from protocol.delta import apply_deltas, create_delta
from protocol.identity import Identity
from protocol.ids import base_id


@dataclass(frozen=True)
class DemoReport:
    workdir: Path
    genesis_id: str
    delta_id: str
    child_id: str
    delta_bytes: int
    dense_fp32_bytes: int
    params: int
    kept: int
    losses: dict[str, float]  # model -> mean LM loss over the demo corpus


def corpus_loss(model_dir: str | os.PathLike[str], texts: list[str]) -> float:
    """Mean causal-LM loss of a model directory over ``texts`` (what `transformers` loads)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return mean_loss(model, *lm_batch(tokenizer, texts))


def run_demo(
    workdir: Path,
    *,
    steps: int = 30,
    drop_rate: float = 0.5,
    codec: str = DEFAULT_CODEC,
    seed: int = 1,
    log: Any = print,
) -> DemoReport:
    """Run the round trip in ``workdir`` (created; must not hold an earlier run)."""
    workdir.mkdir(parents=True, exist_ok=True)
    genesis, finetuned, child = workdir / "genesis", workdir / "finetuned", workdir / "child"
    delta_path = workdir / "round1.msd"
    log(f"[1/5] building a tiny genesis model in {genesis}")
    build_tiny_model(genesis, hidden_size=128, layers=4, intermediate_size=256)
    log(f"[2/5] fine-tuning it for {steps} steps on the demo corpus (CPU)")
    quick_finetune(genesis, finetuned, CORPUS, steps=steps)
    identity = Identity.load_or_create(workdir / "identity.pem")
    log(
        f"[3/5] creating the delta: DARE p={drop_rate}, codec {codec}, signed by {identity.author[:16]}…"
    )
    delta_id, header = create_delta(
        genesis,
        finetuned,
        delta_path,
        identity=identity,
        drop_rate=drop_rate,
        seed=seed,
        codec=codec,
    )
    with DeltaReader(delta_path) as reader:  # re-open: what a peer receiving the file would do
        for name in reader.names():
            reader.read_tensor(name)
    log(f"[4/5] applying {delta_path.name} to the genesis model")
    apply_deltas(genesis, [delta_path], child)
    log("[5/5] loading every model with transformers and measuring loss on the corpus")
    losses = {
        name: corpus_loss(workdir / name, CORPUS) for name in ("genesis", "finetuned", "child")
    }
    return DemoReport(
        workdir=workdir,
        genesis_id=base_id(genesis),
        delta_id=delta_id,
        child_id=base_id(child),
        delta_bytes=delta_path.stat().st_size,
        dense_fp32_bytes=4 * header.params,
        params=header.params,
        kept=header.kept,
        losses=losses,
    )
