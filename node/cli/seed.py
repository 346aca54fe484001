"""``mergeswarm seed``: a peer that trains nothing, mirrors what the swarm needs and serves it."""

from __future__ import annotations

import argparse
from pathlib import Path

from node.data_dir import DataDir

from .daemon import add_heartbeat_arg, add_join_args, run_daemon, swarm_options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "seed",
        help="mirror and serve what the swarm needs (no training); without --join, start a swarm",
        description="A peer that trains nothing: it follows the head, mirrors the head base's "
        "blobs and unmerged deltas, and serves them. A stable bootstrap for others.",
    )
    add_join_args(p)
    p.add_argument(
        "--quota-gb", type=float, default=0.0, help="blob store size limit in GB (0: none)"
    )
    p.add_argument("--no-mirror", action="store_true", help="serve only what is added locally")
    p.add_argument(
        "--publish-head",
        type=Path,
        metavar="MODEL_DIR",
        help="snapshot this model directory and publish it as the swarm's head (round 0) "
        "until an aggregator publishes newer ones: how a swarm starts before aggregators exist",
    )
    p.add_argument(
        "--trusted-aggregators",
        action="append",
        default=[],
        metavar="AUTHOR",
        help="follow heads only from this author key (64 hex; repeatable; none: any)",
    )
    p.add_argument(
        "--no-upload",
        action="store_true",
        help="fetch what the swarm needs but offer nothing to others (metered links)",
    )
    add_heartbeat_arg(p)
    p.set_defaults(run=run_seed)


def run_seed(args: argparse.Namespace) -> int:
    from node.net.blobstore import BlobStore
    from node.net.swarm import HEAD_TTL
    from node.seed import Seed, genesis_head
    from protocol.records import HEAD

    def build(swarm, closers):
        store = BlobStore(DataDir(args.data_dir).blobs, int(args.quota_gb * 1e9))
        seed = Seed(swarm, store, trusted_aggregators=args.trusted_aggregators)
        seed.mirror = not args.no_mirror
        seed.upload = not args.no_upload
        if args.publish_head is not None:
            head = genesis_head(store, args.publish_head)
            seed.share_new_blobs()
            swarm.publish(HEAD, head, ttl=HEAD_TTL)
            print(f"published head: round {head.round}, base {head.base_id}", flush=True)
        return seed

    # a fetch in progress is not waited for: what it got so far is kept for a resume
    return run_daemon(
        args, swarm_options(args, args.data_dir), build, work="mirror_forever", join_timeout=0
    )
