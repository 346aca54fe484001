"""``mergeswarm seed``: a peer that trains nothing, mirrors what the swarm needs and serves it."""

from __future__ import annotations

import argparse

from node.data_dir import DataDir

from .daemon import add_daemon_args, add_data_dir_arg, load_daemon_settings, run_daemon


def register(sub: argparse._SubParsersAction) -> None:
    from node.config import SeedSettings

    p = sub.add_parser(
        "seed",
        help="mirror and serve what the swarm needs (no training); without --join, start a swarm",
        description="A peer that trains nothing: it follows the head, mirrors the head base's "
        "blobs and unmerged deltas, and serves them. A stable bootstrap for others.",
    )
    add_data_dir_arg(p)
    add_daemon_args(p, SeedSettings)
    p.set_defaults(run=run_seed)


def run_seed(args: argparse.Namespace) -> int:
    from node.chain.history import publish_head
    from node.config import SeedSettings
    from node.net.blobstore import BlobStore
    from node.net.swarm import HEAD_TTL
    from node.seed import Seed, genesis_head

    settings = load_daemon_settings(SeedSettings, args)

    def build(swarm, closers):
        store = BlobStore(DataDir(args.data_dir).blobs, int(settings.quota_gb * 1e9))
        seed = Seed(swarm, store, settings)
        if settings.publish_head is not None:
            head = genesis_head(store, settings.publish_head)
            seed.share_new_blobs()
            publish_head(swarm, head, HEAD_TTL)
            print(f"published head: round {head.round}, base {head.base_id}", flush=True)
        return seed

    # a fetch in progress is not waited for: what it got so far is kept for a resume
    return run_daemon(settings, args.data_dir, build, work="mirror_forever", join_timeout=0)
