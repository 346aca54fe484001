#!/usr/bin/env python
"""Benchmark the volunteer daemon against a plain PyTorch loop, in the same run.

For a tiny model and a ~113M-parameter Llama built from a config (CPU): the
training throughput (tokens/s) of ``mergeswarm node`` over one round against
a plain loop (same model, data, batch, optimizer) in a fresh process; and the
time from the end of training to the delta being announced, as a share of
the default round (50 steps at the measured step time).

    .venv/bin/python scripts/bench_node.py                 # both models, ~15 minutes
    .venv/bin/python scripts/bench_node.py --models tiny   # a quick look
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_common import start_daemon  # noqa: E402 - after the path setup

MODELS = {  # name -> build_tiny_model arguments
    "tiny": {"hidden_size": 64, "layers": 2, "heads": 4, "intermediate_size": 128},
    "113M": {"hidden_size": 768, "layers": 12, "heads": 12, "intermediate_size": 3072},
}
DEFAULT_ROUND_STEPS = 50  # NodeSettings.round_steps


def write_data(path: Path) -> None:
    """Text shipped with Python itself: the docstrings of some standard modules."""
    import collections
    import json as json_module
    import pathlib
    import textwrap
    import typing

    rows = []
    for module in (collections, json_module, pathlib, textwrap, typing, argparse, inspect):
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 200:
                rows.append({"text": doc})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def plain_loop(args: argparse.Namespace) -> dict:
    """The baseline: the same training, nothing else around it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from node.training.data import load_dataset

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = load_dataset([args.data], tokenizer, seq_len=args.seq_len)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(args.steps):
        index = torch.randint(len(data.train), (args.batch_size,), generator=gen)
        loss = model(input_ids=data.train.input_ids[index], labels=data.train.labels[index]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    return {"tokens_per_second": args.steps * args.batch_size * args.seq_len / seconds}


PUBLISH = "mergeswarm_delta_publish_duration_seconds"  # a histogram: mean = sum / count


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def daemon_round(root: Path, model: Path, data: Path, steps: int, batch: int, seq_len: int) -> dict:
    procs = []
    try:
        seed, maddrs = start_daemon(
            root / "seed", "seed", "--publish-head", str(model), "--no-mirror"
        )
        procs.append(seed)
        node_dir = root / "node"
        cmd = ["--join", maddrs[0], "--data", str(data), "--metrics-port", "0"]
        cmd += ["--round-steps", str(steps), "--batch-size", str(batch), "--seq-len", str(seq_len)]
        procs.append(start_daemon(node_dir, "node", *cmd)[0])
        deadline = time.monotonic() + 3600
        while time.monotonic() < deadline:
            port_file = node_dir / "metrics_port"
            if port_file.is_file():
                url = f"http://127.0.0.1:{port_file.read_text().strip()}/metrics"
                text = urllib.request.urlopen(url, timeout=10).read().decode()
                if (_metric(text, "mergeswarm_deltas_published_total") or 0) >= 1:
                    sps = _metric(text, "mergeswarm_training_samples_per_second")
                    return {
                        "tokens_per_second": sps * seq_len,
                        "publish_seconds": _metric(text, f"{PUBLISH}_sum")
                        / _metric(text, f"{PUBLISH}_count"),
                        "step_seconds": batch / sps,
                    }
            time.sleep(1)
        raise SystemExit("the node published no delta within an hour")
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=10, help="steps timed per model")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain:
        print(json.dumps(plain_loop(args)))
        return 0
    os.environ.setdefault("HIVEMIND_LOGLEVEL", "WARNING")
    from node.training.tiny_model import build_tiny_model

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-node-") as tmp:
        root = Path(tmp)
        data = root / "data.jsonl"
        write_data(data)
        for name in args.models:
            print(f"{name}: building, plain loop, daemon ...", file=sys.stderr)
            model = build_tiny_model(root / name, **MODELS[name])
            plain = subprocess.run(
                [sys.executable, __file__, "--plain", "--model", str(model), "--data", str(data)]
                + ["--steps", str(args.steps), "--batch-size", str(args.batch_size)]
                + ["--seq-len", str(args.seq_len)],
                capture_output=True,
                text=True,
                check=True,
            )
            baseline = json.loads(plain.stdout.strip().splitlines()[-1])
            node = daemon_round(
                root / f"swarm-{name}", model, data, args.steps, args.batch_size, args.seq_len
            )
            params = (
                sum(os.path.getsize(f) for f in model.glob("*.safetensors")) // 4
            )  # float32 bytes -> params
            rows.append({"model": name, "params": params, "plain": baseline, "node": node})
    lines = [
        "# bench_node: CPU, this machine",
        f"command: {' '.join(sys.argv)}",
        "",
        "| model | params | plain loop tokens/s | node tokens/s | ratio | publish s | "
        f"publish / default round ({DEFAULT_ROUND_STEPS} steps) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p, n = r["plain"]["tokens_per_second"], r["node"]["tokens_per_second"]
        share = r["node"]["publish_seconds"] / (DEFAULT_ROUND_STEPS * r["node"]["step_seconds"])
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.1f}M | {p:.0f} | {n:.0f} | {n / p:.2f} | "
            f"{r['node']['publish_seconds']:.2f} | {share:.1%} |"
        )
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
