"""``mergeswarm blob add|get|ls``: moving blobs by hand (debugging a swarm)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from node.data_dir import DataDir

from . import common
from .daemon import add_join_args, swarm_options

NO_PROVIDER_SECONDS = 10.0  # without --wait: nobody offering the blob this long is an error


def register(sub: argparse._SubParsersAction) -> None:
    blob = sub.add_parser("blob", help="put, fetch and list blobs (debugging a swarm)")
    bsub = blob.add_subparsers(dest="blob_command", required=True, metavar="ACTION")
    add = bsub.add_parser(
        "add", help="put a file into a peer's blob store (a running peer announces it)"
    )
    add.add_argument("file", type=Path)
    add.add_argument("--data-dir", type=Path, default=common.default_data_dir())
    add.set_defaults(run=run_blob_add)
    get = bsub.add_parser("get", help="fetch a blob from whoever provides it and verify it")
    get.add_argument("blob_id", metavar="ID")
    get.add_argument("-o", "--output", type=Path, required=True, metavar="FILE")
    get.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="give up after this long (default 60; raise it for big blobs on slow links)",
    )
    get.add_argument(
        "--wait",
        action="store_true",
        help=f"wait for a provider up to --timeout (without it, nobody offering the blob "
        f"within {NO_PROVIDER_SECONDS:g} s is an error)",
    )
    add_join_args(get, data_dir=False)
    get.add_argument(
        "--data-dir", type=Path, help="keep the peer's state here (default: a temporary one)"
    )
    get.set_defaults(run=run_blob_get)
    ls = bsub.add_parser("ls", help="list the blobs in a peer's store")
    ls.add_argument("--data-dir", type=Path, default=common.default_data_dir())
    ls.set_defaults(run=run_blob_ls)


def run_blob_add(args: argparse.Namespace) -> int:
    from node.net.blobstore import BlobStore

    if not args.file.is_file():
        raise FileNotFoundError(2, "no such file", str(args.file))
    print(BlobStore(DataDir(args.data_dir).blobs).add_file(args.file))
    return 0


def run_blob_get(args: argparse.Namespace) -> int:
    from node.net.blobs import FetchError, fetch
    from node.net.blobstore import BlobStore
    from node.net.swarm import Swarm
    from node.settings import SettingsError

    options = swarm_options(args, Path("."))
    if not options.join:
        raise SettingsError("blob get needs --join MULTIADDR")
    tmp = None if args.data_dir else tempfile.TemporaryDirectory(prefix="mergeswarm-get-")
    data_dir = args.data_dir or Path(tmp.name)
    try:
        options.data_dir = data_dir
        swarm = Swarm(options)
        try:
            store = BlobStore(DataDir(data_dir).blobs)
            looking = None if args.wait else NO_PROVIDER_SECONDS
            print(f"looking for providers of {args.blob_id[:16]}...", file=sys.stderr, flush=True)
            try:
                fetch(
                    swarm,
                    store,
                    args.blob_id,
                    timeout=args.timeout,
                    serve_while_fetching=False,
                    manifest_timeout=looking,
                )
            except FetchError as exc:
                if args.wait or "no provider" not in str(exc):
                    raise
                raise FetchError(
                    f"nobody offers {args.blob_id[:16]}... within {looking:g} s ({exc}); "
                    "give --wait to wait for a provider up to --timeout"
                ) from None
        finally:
            swarm.shutdown()
        part = args.output.with_name(f".{args.output.name}.part-{os.getpid()}")
        shutil.copyfile(store.path(args.blob_id), part)
        os.replace(part, args.output)
        print(f"{args.blob_id} -> {args.output} ({args.output.stat().st_size:,} bytes, verified)")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


def run_blob_ls(args: argparse.Namespace) -> int:
    from node.net.blobstore import BlobStore

    store = BlobStore(DataDir(args.data_dir).blobs)
    for blob_id in store.ids():
        pins = ",".join(store.pins(blob_id)) or "-"
        print(f"{blob_id}  {store.size(blob_id):>14,}  {pins}")
    return 0
