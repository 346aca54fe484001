"""``mergeswarm seed`` and ``mergeswarm blob add|get|ls``: joining a swarm and moving blobs."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from node.data_dir import DataDir

from . import common


def add_join_args(p: argparse.ArgumentParser, *, data_dir: bool = True) -> None:
    """The flags every peer takes to start or join a swarm (from JoinSettings)."""
    from node.config import JoinSettings
    from node.settings import add_flags

    add_flags(p, JoinSettings)
    p.add_argument("--config", type=Path, metavar="FILE.toml", help="settings file (TOML)")
    if data_dir:
        p.add_argument(
            "--data-dir",
            type=Path,
            default=common.default_data_dir(),
            help="identity, swarm id and blobs (default: $MERGESWARM_DATA_DIR or ~/.mergeswarm)",
        )


def add_heartbeat_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--heartbeat-every",
        type=float,
        default=15.0,
        metavar="SECONDS",
        help="publish this peer's heartbeat record this often (default 15)",
    )


def add_metrics_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus /metrics and /healthz on this port (0: any free one)",
    )
    p.add_argument(
        "--metrics-host", default="127.0.0.1", help="address for --metrics-port (default 127.0.0.1)"
    )


def serve_metrics(daemon, args: argparse.Namespace, data_dir: Path):
    """Start the daemon's metrics endpoint when --metrics-port was given (None otherwise)."""
    from node.metrics import MetricsServer
    from protocol.durable import write_atomic

    if args.metrics_port is None:
        return None
    server = MetricsServer(
        daemon.metrics.registry, daemon.health, args.metrics_host, args.metrics_port, daemon.ready
    )
    write_atomic(DataDir(data_dir).metrics_port, f"{server.port}\n".encode())
    print(f"metrics on http://{args.metrics_host}:{server.port}/metrics", flush=True)
    return server


def swarm_options(args: argparse.Namespace, data_dir: Path):
    from node.config import JoinSettings
    from node.settings import load_settings

    settings = load_settings(JoinSettings, args, config_file=args.config)
    return settings.options(data_dir)


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
    get.add_argument("--timeout", type=float, default=600.0, help="seconds (default 600)")
    add_join_args(get, data_dir=False)
    get.add_argument(
        "--data-dir", type=Path, help="keep the peer's state here (default: a temporary one)"
    )
    get.set_defaults(run=run_blob_get)
    ls = bsub.add_parser("ls", help="list the blobs in a peer's store")
    ls.add_argument("--data-dir", type=Path, default=common.default_data_dir())
    ls.set_defaults(run=run_blob_ls)


def stop_event() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def print_join_line(swarm) -> None:
    print(f"swarm {swarm.swarm_id}; to join it, use:", flush=True)
    for maddr in swarm.maddrs:
        print(f"  --join {maddr}", flush=True)


def run_seed(args: argparse.Namespace) -> int:
    from node.blobstore import BlobStore
    from node.peer import run_until
    from node.seed import Seed
    from node.swarm import HEAD_TTL, Swarm

    swarm = Swarm(swarm_options(args, args.data_dir))
    stop = stop_event()  # after the DHT process forked: it must not inherit the handler
    try:
        store = BlobStore(DataDir(args.data_dir).blobs, int(args.quota_gb * 1e9))
        seed = Seed(swarm, store, trusted_aggregators=args.trusted_aggregators)
        seed.mirror = not args.no_mirror
        seed.heartbeat_every = args.heartbeat_every
        seed.upload = not args.no_upload
        if args.publish_head is not None:
            from node.seed import genesis_head

            head = genesis_head(store, args.publish_head)
            seed.share_new_blobs()
            swarm.publish("head", head, ttl=HEAD_TTL)
            print(f"published head: round {head.round}, base {head.base_id}", flush=True)
        print_join_line(swarm)
        mirror = threading.Thread(target=seed.mirror_forever, args=(stop,), daemon=True)
        mirror.start()
        run_until(seed, stop, interval=min(2.0, args.heartbeat_every))
    finally:
        swarm.shutdown()
    return 0


def run_blob_add(args: argparse.Namespace) -> int:
    from node.blobstore import BlobStore

    if not args.file.is_file():
        raise FileNotFoundError(2, "no such file", str(args.file))
    print(BlobStore(DataDir(args.data_dir).blobs).add_file(args.file))
    return 0


def run_blob_get(args: argparse.Namespace) -> int:
    from node.blobs import fetch
    from node.blobstore import BlobStore
    from node.settings import SettingsError
    from node.swarm import Swarm

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
            fetch(swarm, store, args.blob_id, timeout=args.timeout, serve_while_fetching=False)
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
    from node.blobstore import BlobStore

    store = BlobStore(DataDir(args.data_dir).blobs)
    for blob_id in store.ids():
        pins = ",".join(store.pins(blob_id)) or "-"
        print(f"{blob_id}  {store.size(blob_id):>14,}  {pins}")
    return 0
