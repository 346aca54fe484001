"""Shared by the benchmarks (bench_*.py): synthetic Llama-shaped models, peak RSS, the swarm's
rounds in one process."""

from __future__ import annotations

import json
import math
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch


def layout(scale: float = 1.0) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a Llama-like model: ~306M params (147 tensors) at scale 1."""
    hidden = max(64, int(1024 * scale**0.5) // 64 * 64)
    inter = hidden * 11 // 4
    vocab = max(512, int(49152 * scale**0.5))
    shapes = [("model.embed_tokens.weight", (vocab, hidden)), ("lm_head.weight", (vocab, hidden))]
    shapes.append(("model.norm.weight", (hidden,)))
    for i in range(16):
        p = f"model.layers.{i}."
        shapes += [(p + f"self_attn.{x}_proj.weight", (hidden, hidden)) for x in "qkvo"]
        shapes += [
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
        ]
        shapes += [(p + "mlp.down_proj.weight", (hidden, inter))]
        shapes += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
        ]
    return sorted(shapes)


def largest_params(scale: float = 1.0) -> int:
    return max(math.prod(shape) for _, shape in layout(scale))


def delta_tensors(scale: float, seed: int, std: float = 1e-3):
    """(name, tensor) pairs of a synthetic fine-tuning delta: N(0, std^2) per entry."""
    for i, (name, shape) in enumerate(layout(scale)):
        g = torch.Generator().manual_seed(seed * 100_003 + i)
        yield name, torch.randn(shape, generator=g) * std


def write_model(
    out: Path, scale: float, *, base_seed: int = 0, delta_seed: int | None = None
) -> Path:
    """A model directory: N(0, 0.02^2) base weights, plus a delta when ``delta_seed`` is given."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: t * 20 for name, t in delta_tensors(scale, base_seed, std=1e-3)}  # std 0.02
    if delta_seed is not None:
        for name, d in delta_tensors(scale, delta_seed + 1):
            tensors[name] += d
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(llama_config(scale), indent=2))
    return out


def llama_config(scale: float = 1.0) -> dict:
    """A transformers LlamaConfig matching ``layout(scale)`` (for tools that need one)."""
    shapes = dict(layout(scale))
    vocab, hidden = shapes["model.embed_tokens.weight"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": shapes["model.layers.0.mlp.up_proj.weight"][0],
        "num_hidden_layers": 16,
        "num_attention_heads": hidden // 64,
        "num_key_value_heads": hidden // 64,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }


def peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM). ru_maxrss would not do: Linux carries it over
    from the parent across fork and exec, so a worker would report its driver's size."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def start_daemon(data_dir: Path, command: str, *args: str) -> tuple[subprocess.Popen, list[str]]:
    """Start ``mergeswarm <command>`` on loopback (own session, log in the data dir) and wait
    for its multiaddrs file; returns the process and its multiaddrs."""
    from node.daemon.launch import LOOPBACK, PeerStartError, launch_peer

    exe = str(Path(sys.executable).with_name("mergeswarm"))
    cmd = [exe, command, "--data-dir", str(data_dir), "--host-maddr", LOOPBACK, *args]
    try:
        peer = launch_peer(command, cmd, data_dir=data_dir, log=data_dir / f"{command}.log")
    except PeerStartError as exc:
        raise SystemExit(f"{command} in {data_dir} did not start: {exc}") from None
    return peer.proc, peer.maddrs


def swarm_rounds(
    genesis: Path,
    datasets: dict,
    options,
    rounds: int,
    steps: int,
    work: Path,
    *,
    make_delta: Callable[[Path, dict, Path, str, int], None],
    merge: Callable[[int, Path, list[Path], Path], None],
    after_round: Callable[[int, Path], None] | None = None,
) -> Path:
    """The swarm's rounds in one process, without the network; the last head.

    Each round every volunteer (a domain of ``datasets``) trains ``steps`` steps on the head,
    its AdamW moments and data position carried across heads as the node carries them;
    ``make_delta(head, trained_weights, out, domain, seed)`` writes its delta to ``out``,
    ``merge(round, head, deltas, child)`` writes the next head, ``after_round(round, child)``
    sees it. Everything lives under ``work``; earlier heads are removed as the rounds go.
    """
    from node.training.trainer import Trainer

    work.mkdir(parents=True, exist_ok=True)
    head = genesis
    for r in range(1, rounds + 1):
        deltas = []
        for i, (domain, dataset) in enumerate(datasets.items()):
            trainer = Trainer(head, dataset, options)
            state = work / f"state-{domain}"
            if Trainer.latest(state) is not None:
                trainer.load(Trainer.latest(state), weights=False)
            trainer.train_round(max_steps=steps, max_seconds=None)
            trainer.save(state, {})
            out = work / f"delta-{r}-{domain}.msd"
            make_delta(head, trainer.trained_weights(), out, domain, 1000 * r + i)
            deltas.append(out)
            del trainer
        child = work / f"head-{r}"
        merge(r, head, deltas, child)
        if after_round is not None:
            after_round(r, child)
        for p in deltas:
            p.unlink()
        if head != genesis:
            shutil.rmtree(head)
        head = child
    return head
