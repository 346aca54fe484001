"""``mergeswarm handover draft|sign``: hand a swarm over to another set of aggregators (or
other rules) with the endorsement of most of the current ones (protocol.handover)."""

from __future__ import annotations

import argparse
from pathlib import Path

from node.cli.daemon import add_data_dir_arg


def register(sub: argparse._SubParsersAction) -> None:
    h = sub.add_parser(
        "handover",
        help="change a swarm's aggregators or rules, signed by most of its aggregators",
        description="A swarm's id commits to its first aggregators. To add or retire one, or "
        "to change a rule: `handover draft` writes the next config, which you may edit; more "
        "than half of the current aggregators each run `handover sign` on it (passing the "
        "file from one to the next); then start the aggregators with --handover FILE. "
        "Volunteers, seeds and status follow on their own.",
    )
    hsub = h.add_subparsers(dest="handover_command", required=True, metavar="ACTION")

    d = hsub.add_parser("draft", help="write the next config: the current one, one epoch on")
    add_config_args(d)
    d.add_argument(
        "--add", action="append", default=[], metavar="AUTHOR", help="an aggregator key to add"
    )
    d.add_argument(
        "--add-dir",
        action="append",
        default=[],
        type=Path,
        metavar="DIR",
        help="add the aggregator whose data directory this is (its key is made there)",
    )
    d.add_argument(
        "--retire", action="append", default=[], metavar="AUTHOR", help="an aggregator to drop"
    )
    d.add_argument("-o", "--output", type=Path, required=True, metavar="NEXT.toml")
    d.set_defaults(run=run_draft)

    s = hsub.add_parser(
        "sign", help="endorse the next config with this aggregator's key (into a handover file)"
    )
    add_config_args(s)
    s.add_argument("--next", type=Path, required=True, metavar="NEXT.toml", help="from draft")
    add_data_dir_arg(s, "the aggregator's data directory (its key)")
    s.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        metavar="HANDOVER.json",
        help="the handover file: created, or given this endorsement if it exists",
    )
    s.set_defaults(run=run_sign)


def add_config_args(p: argparse.ArgumentParser) -> None:
    """--config and --handover: the swarm's config, as made by init and handed over since."""
    p.add_argument(
        "--config",
        type=Path,
        required=True,
        metavar="swarm.toml",
        help="the swarm's first config (from mergeswarm init)",
    )
    p.add_argument(
        "--handover",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="each handover of the config since init, in order (mergeswarm handover)",
    )


def _current(args: argparse.Namespace):
    from protocol.errors import MergeswarmError
    from protocol.handover import follow_handovers, load_handover
    from protocol.swarm_config import load_swarm_config, swarm_anchor

    root = load_swarm_config(args.config)
    if root.epoch != 0:
        raise MergeswarmError(f"{args.config} is epoch {root.epoch}: give the first config")
    if swarm_anchor(root.swarm_id) is None:
        raise MergeswarmError(
            f"swarm {root.swarm_id} has no trust anchor in its id: only swarms made by "
            "`mergeswarm init` since the anchor exist can be handed over"
        )
    return follow_handovers(root, [load_handover(p) for p in args.handover])[-1]


def run_draft(args: argparse.Namespace) -> int:
    from node.data_dir import DataDir
    from protocol.errors import MergeswarmError
    from protocol.identity import Identity
    from protocol.swarm_config import parse_config

    current = _current(args)
    if args.output.exists():
        raise MergeswarmError(f"{args.output}: already exists; choose another output")
    added = list(args.add)
    added += [Identity.load_or_create(DataDir(d).identity).author for d in args.add_dir]
    unknown = set(args.retire) - set(current.aggregators)
    if unknown:
        raise MergeswarmError(f"--retire {sorted(unknown)[0][:16]}...: not an aggregator now")
    aggregators = sorted((set(current.aggregators) | set(added)) - set(args.retire))
    values = current.model_dump(mode="json") | {
        "epoch": current.epoch + 1,
        "aggregators": aggregators,
    }
    nxt = parse_config(values, "the next config")
    if not nxt.aggregators:
        raise MergeswarmError("the next config would name no aggregators")
    args.output.write_text(nxt.to_toml())
    print(
        f"wrote {args.output}: epoch {nxt.epoch} of swarm {nxt.swarm_id}, "
        f"{len(nxt.aggregators)} aggregators (edit its rules if you like, then sign it: "
        f"{len(current.aggregators) // 2 + 1} of the {len(current.aggregators)} now must)"
    )
    return 0


def run_sign(args: argparse.Namespace) -> int:
    from node.data_dir import DataDir
    from protocol.durable import write_atomic
    from protocol.errors import MergeswarmError
    from protocol.handover import (
        Handover,
        check_successor,
        endorse,
        endorsers,
        enough,
        handover_json,
        load_handover,
    )
    from protocol.identity import Identity
    from protocol.swarm_config import load_swarm_config

    current = _current(args)
    nxt = load_swarm_config(args.next)
    check_successor(current, nxt)
    key = DataDir(args.data_dir).identity
    if not key.is_file():
        raise MergeswarmError(f"{key}: no key here; give the aggregator's --data-dir")
    me = Identity.load(key)
    if me.author not in current.aggregators:
        raise MergeswarmError(
            f"{me.author[:16]}... is not an aggregator of epoch {current.epoch}: only they sign"
        )
    endorsements = []
    if args.output.exists():
        found = load_handover(args.output)
        if found.config != nxt or found.previous != current:
            raise MergeswarmError(f"{args.output} hands over to another config than {args.next}")
        endorsements = [e for e in found.endorsements if e.author != me.author]
    handover = Handover(
        previous=current, config=nxt, endorsements=(*endorsements, endorse(me, current, nxt))
    )
    write_atomic(args.output, handover_json(handover).encode())
    signed = endorsers(current, handover)
    print(f"{args.output}: signed by {len(signed)} of the {len(current.aggregators)} aggregators")
    if enough(current, signed):
        files = " ".join(f"--handover {p}" for p in [*args.handover, args.output])
        print(f"enough: start the aggregators of the next config with {files}")
    else:
        print(f"pass it to another aggregator: {len(current.aggregators) // 2 + 1} must sign")
    return 0
