"""``mergeswarm init``, ``mergeswarm aggregator`` and ``mergeswarm export``: a swarm's rounds."""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from node.data_dir import DataDir

from .daemon import add_daemon_args, add_data_dir_arg, load_daemon_settings, run_daemon
from .handover import add_config_args

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    from node.config import AggregatorSettings, JoinSettings
    from node.settings import add_flags
    from protocol.swarm_config import SwarmConfig

    p = sub.add_parser(
        "init",
        help="write a new swarm's config (genesis, merge recipe, round policy, trusted aggregators)",
        description="Write the config of a new swarm: its id, the genesis base's id, how "
        "aggregators merge and screen deltas, how volunteers sparsify them, the round policy "
        "and the aggregators volunteers trust. Aggregators publish it in the swarm, so "
        "volunteers need only a multiaddr.",
    )
    p.add_argument("--genesis", type=Path, required=True, metavar="MODEL_DIR", help="the base")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="swarm.toml")
    p.add_argument("--swarm-id", help="the swarm's id (default: a new random one)")
    p.add_argument(
        "--aggregator-dir",
        type=Path,
        action="append",
        default=[],
        metavar="DATA_DIR",
        help="trust the aggregator whose data directory this is (its key is created there if "
        "missing); repeatable",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    add_flags(p, SwarmConfig, title="the swarm's rules")
    p.set_defaults(run=run_init)

    a = sub.add_parser(
        "aggregator",
        help="run an aggregator: merge the swarm's deltas into new heads, round after round",
        description="Join the swarm of --config, and each round gather, check and merge the "
        "deltas volunteers announced, then publish the new head as a patch. Several "
        "aggregators may run: one holds the round's lease, the others stand by.",
    )
    add_config_args(a)
    add_data_dir_arg(a, "identity, blobs and bases")
    add_daemon_args(a, AggregatorSettings, settings_flag="--settings", skip=frozenset({"swarm_id"}))
    a.set_defaults(run=run_aggregator)

    e = sub.add_parser(
        "export",
        help="fetch the swarm's head (or a named base) and write it as a model directory",
        description="Join a swarm, fetch the head base (or --round N / --base ID), check its "
        "id, and write a directory that transformers loads.",
    )
    e.add_argument("-o", "--output", type=Path, required=True, metavar="DIR")
    which = e.add_mutually_exclusive_group()
    which.add_argument("--round", type=int, metavar="N", help="the base of round N")
    which.add_argument("--base", metavar="ID", help="the base with this id")
    e.add_argument("--timeout", type=float, default=600.0, help="seconds (default 600)")
    e.add_argument(
        "--data-dir", type=Path, help="keep the peer's state here (default: a temporary one)"
    )
    add_flags(e, JoinSettings)
    e.set_defaults(run=run_export)


def run_init(args: argparse.Namespace) -> int:
    from protocol.errors import MergeswarmError
    from protocol.identity import Identity
    from protocol.ids import base_id
    from protocol.model_dir import ModelDir
    from protocol.records import is_swarm_id
    from protocol.swarm_config import (
        SwarmConfig,
        anchored_swarm_id,
        parse_config,
        swarm_anchor,
    )

    if args.output.exists() and not args.force:
        raise MergeswarmError(f"{args.output}: already exists (--force to overwrite)")
    values = {
        name: getattr(args, name)
        for name in SwarmConfig.model_fields
        if getattr(args, name, None) is not None
    }
    aggregators = list(values.get("aggregators", []))
    for data_dir in args.aggregator_dir:
        aggregators.append(Identity.load_or_create(DataDir(data_dir).identity).author)
    values["aggregators"] = sorted(set(aggregators))
    genesis = base_id(ModelDir(args.genesis))
    name = args.swarm_id or _new_swarm_id()
    # the id ends with a hash of the genesis and the aggregators: peers that know the id
    # take no config that names others (an id that already ends with one is kept)
    swarm_id = name
    if swarm_anchor(name) is None:
        swarm_id = anchored_swarm_id(name, genesis, values["aggregators"])
    if not is_swarm_id(swarm_id):
        raise MergeswarmError(
            f"swarm id {swarm_id!r}: use 3-46 of a-z, 0-9 and '-' for --swarm-id "
            "(the trust anchor, -t and 16 hex digits, is appended)"
        )
    values |= {"swarm_id": swarm_id, "genesis_id": genesis}
    config = parse_config(values, "mergeswarm init")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(config.to_toml())
    print(f"swarm {config.swarm_id}, genesis {config.genesis_id[:16]}: wrote {args.output}")
    print(
        f"its id ends with the trust anchor of the genesis and {len(config.aggregators)} "
        "aggregator(s): peers that join it follow no other config"
    )
    if not config.aggregators:
        print("no --aggregator-dir given: volunteers will follow any aggregator (open swarm)")
    print(
        "aggregators of a swarm open to volunteers should get held-out text of what volunteers "
        "train on (mergeswarm aggregator --eval-data FILE.jsonl): each delta must then lower "
        "its loss, and weighs by how much (README: Security model)"
    )
    return 0


def _new_swarm_id() -> str:
    import secrets

    return f"swarm-{secrets.token_hex(6)}"


def run_aggregator(args: argparse.Namespace) -> int:
    from aggregator.daemon import Aggregator
    from node.config import AggregatorSettings
    from node.net.blobstore import BlobStore
    from node.training.data import read_examples
    from protocol.errors import MergeswarmError
    from protocol.handover import follow_handovers, load_handover
    from protocol.swarm_config import load_swarm_config

    config = load_swarm_config(args.config)
    handovers = [load_handover(path) for path in args.handover]
    follow_handovers(config, handovers)  # a wrong file fails here, in one line
    settings = load_daemon_settings(AggregatorSettings, args)
    for path in settings.eval_data:  # fail before joining, not at the first merge
        read_examples(path)
    try:
        allowed = settings.allowed_volunteers()
    except (OSError, ValueError) as exc:
        raise MergeswarmError(f"--volunteers: {exc}") from None
    if not settings.eval_data and allowed is None:
        logger.warning(
            "no --eval-data: deltas are screened by their norms only, and a crowd of new keys "
            "can outweigh honest volunteers (README: Security model)"
        )

    def build(swarm, closers):
        store = BlobStore(DataDir(args.data_dir).blobs)
        return Aggregator(swarm, store, config, settings, handovers)

    return run_daemon(
        settings, args.data_dir, build, work="run_rounds", interval=1.0, swarm_id=config.swarm_id
    )


def run_export(args: argparse.Namespace) -> int:
    from node.chain.bases import Bases
    from node.chain.history import chain_to
    from node.config import JoinSettings
    from node.net.blobs import fetch
    from node.net.blobstore import BlobStore
    from node.net.swarm import Swarm
    from node.settings import load_settings
    from protocol.errors import MergeswarmError
    from protocol.model_dir import ModelDir, write_model_dir

    if args.output.exists():
        raise MergeswarmError(f"{args.output}: already exists; choose another output")
    join = load_settings(JoinSettings, args)
    if not join.join:
        raise MergeswarmError("give a peer of the swarm: --join MULTIADDR")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or Path(tmp) / "peer"
        swarm = Swarm(join.options(data_dir))
        try:
            store = BlobStore(DataDir(data_dir).blobs)
            fetch_blob = lambda blob: fetch(swarm, store, blob, timeout=args.timeout)  # noqa: E731
            bases = Bases(Path(tmp) / "bases", store, fetch_blob)
            chain = chain_to(swarm, round_=args.round, base=args.base)
            for head in chain:  # the nearest snapshot, then patches forward
                print(f"round {head.round}: base {head.base_id[:16]}", flush=True)
                path = bases.sync(head)
            target = chain[-1]
            with ModelDir(path) as md:
                write_model_dir(args.output, md, ((n, md.tensor(n)) for n in md.names()))
        finally:
            swarm.shutdown()
    print(f"wrote round {target.round}, base {target.base_id} to {args.output}")
    return 0
