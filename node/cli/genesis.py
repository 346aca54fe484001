"""``mergeswarm genesis``: write a pretrained genesis model directory and print its base id."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from node.training import genesis


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "genesis",
        help="write a pretrained model as a genesis directory (nothing downloaded)",
        description=(
            "Write a Hugging Face model directory to start a swarm from (init --genesis, "
            "aggregator --genesis) and print its base id. Known models ship in Python packages: "
            + "; ".join(f"{n} needs `{m.install}`" for n, m in sorted(genesis.KNOWN_MODELS.items()))
            + "."
        ),
    )
    p.add_argument(
        "-o", "--output", type=Path, required=True, metavar="DIR", help="directory to create"
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--model",
        metavar="NAME",
        help=f"a model shipped in a Python package: {', '.join(sorted(genesis.KNOWN_MODELS))}",
    )
    source.add_argument(
        "--gguf",
        type=Path,
        metavar="FILE",
        help="a GGUF file of an architecture transformers reads",
    )
    source.add_argument(
        "--from",
        dest="from_dir",
        type=Path,
        metavar="MODEL_DIR",
        help="a Hugging Face model directory (safetensors or .bin weights)",
    )
    p.add_argument(
        "--dtype",
        choices=genesis.GENESIS_DTYPES,
        default="float32",
        help="dtype of the written weights (default: float32)",
    )
    p.add_argument("--force", action="store_true", help="replace DIR if it is not empty")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as transformers_logging

    from protocol.model_dir import ModelDir

    if not sys.stderr.isatty():  # like this CLI's own bars: on a terminal only
        transformers_logging.disable_progress_bar()
    sources = {"model": args.model, "gguf": args.gguf, "from_dir": args.from_dir}
    source = genesis.find_source(**sources)
    eta = f" (about {source.load_seconds} s)" if source.load_seconds else ""
    print(f"loading {source.label}{eta}", file=sys.stderr)
    gid = genesis.write_genesis(args.output, dtype=args.dtype, force=args.force, **sources)
    with ModelDir(args.output) as md:
        params = sum(info.numel for info in md.tensors.values())
    print(f"wrote {args.output}: {params:,} parameters in {args.dtype}", file=sys.stderr)
    print(gid)
    return 0
