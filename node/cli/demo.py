"""``mergeswarm demo``: the offline round trip on a tiny model."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from protocol.codecs import CODECS

from . import common


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run a create -> inspect -> apply round trip on a tiny model, offline",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where to keep the models (default: a new temporary directory)",
    )
    p.add_argument("--steps", type=int, default=30, help="fine-tuning steps")
    p.add_argument(
        "--drop-rate",
        type=common.drop_rate,
        default=0.5,
        help="DARE drop rate (a randomly initialised tiny model has far less redundancy than a pretrained one, so the demo drops less than a swarm's usual 0.9)",
    )
    p.add_argument("--codec", choices=sorted(CODECS), default="bf16", help="value codec")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from node.demo import run_demo

    hf_logging.disable_progress_bar()  # per-model load/save bars would drown the demo's steps

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mergeswarm-demo-"))
    report = run_demo(workdir, steps=args.steps, drop_rate=args.drop_rate, codec=args.codec)
    ratio = report.dense_fp32_bytes / report.delta_bytes
    print(f"\nmergeswarm demo: done in {report.workdir}")
    print(f"  genesis base  {report.genesis_id}")
    print(f"  delta         {report.delta_id}")
    print(f"  child base    {report.child_id}")
    print(
        f"  delta size    {report.delta_bytes:,} bytes for {report.params:,} params "
        f"({report.kept:,} kept; {ratio:.1f}x smaller than the dense fp32 delta)"
    )
    for name, loss in report.losses.items():
        print(f"  loss {name:<10}{loss:.4f}")
    return 0
