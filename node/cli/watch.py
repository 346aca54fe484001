"""``mergeswarm monitor`` and ``mergeswarm status``: the whole swarm's health."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from node.data_dir import DataDir

from . import common
from .daemon import (
    add_daemon_args,
    add_data_dir_arg,
    add_join_args,
    load_daemon_settings,
    run_daemon,
)


def register(sub: argparse._SubParsersAction) -> None:
    from node.config import MonitorSettings

    m = sub.add_parser(
        "monitor",
        help="turn the whole swarm's heartbeats into one Prometheus scrape target",
        description="Join a swarm and serve, on --metrics-port, metrics of the whole swarm "
        "from the heartbeats every peer publishes (volunteers behind NAT included): peers by "
        "role and version, head round and age, each peer's lag, deltas accepted and rejected, "
        "bytes moved, merge duration, training throughput, the lease holder.",
    )
    add_data_dir_arg(m)
    add_daemon_args(m, MonitorSettings)
    m.set_defaults(run=run_monitor, data_dir=common.default_data_dir() / "monitor")

    s = sub.add_parser(
        "status",
        help="print the swarm's head and every peer's role, version, lag and throughput",
        description="Join a swarm briefly and print what its records say: swarm id, head, "
        "round and age, and one row per peer that heart-beats.",
    )
    add_join_args(s, data_dir=False)
    s.add_argument("--json", action="store_true", help="print JSON")
    s.add_argument(
        "--wait", type=float, default=3.0, help="seconds to let the DHT settle before reading"
    )
    s.set_defaults(run=run_status)


def run_monitor(args: argparse.Namespace) -> int:
    from node.config import MonitorSettings
    from node.monitor.monitor import Monitor
    from node.net.blobstore import BlobStore

    settings = load_daemon_settings(MonitorSettings, args)

    def build(swarm, closers):
        monitor = Monitor(swarm, BlobStore(DataDir(args.data_dir).blobs), settings)
        monitor.tick()
        return monitor

    return run_daemon(settings, args.data_dir, build)


def run_status(args: argparse.Namespace) -> int:
    from node.config import JoinSettings
    from node.monitor.view import read_view
    from node.net.swarm import Swarm
    from node.settings import load_settings
    from protocol.errors import MergeswarmError

    join = load_settings(JoinSettings, args, config_file=args.config)
    if not join.join:
        raise MergeswarmError("give a peer of the swarm: --join MULTIADDR")
    with tempfile.TemporaryDirectory() as tmp:
        options = join.options(Path(tmp))
        options.client_mode = True  # a passer-by: serves nothing
        swarm = Swarm(options)
        try:
            time.sleep(args.wait)
            view = read_view(swarm)
        finally:
            swarm.shutdown()
    if args.json:
        print(json.dumps(view.to_json(), indent=2))
        return 0
    head = view.head
    print(f"swarm   {view.swarm_id}")
    if head is None:
        print("head    none yet")
    else:
        age = view.head_age_seconds
        age_text = f", published {age:.0f} s ago" if age is not None else ""
        print(
            f"head    round {head.round}, base {head.base_id[:16]}, {head.deltas} deltas{age_text}"
        )
    totals = view.to_json()["totals"]
    print(
        f"totals  {totals['samples_per_second']:.1f} samples/s, {totals['deltas_accepted']:.0f} "
        f"deltas merged, {totals['bytes_in'] / 1e6:.1f} MB moved"
    )
    print()
    print(f"{'peer':<14} {'role':<10} {'version':<10} {'lag':>4} {'deltas':>7} {'samples/s':>10}")
    for p in view.peers:
        b = p.beat
        lag = "-" if p.lag is None else str(p.lag)
        deltas = b.deltas_published if b.role == "volunteer" else b.deltas_accepted
        print(
            f"{p.peer_id[:12]:<14} {b.role:<10} {b.version[:10]:<10} {lag:>4} {deltas:>7} "
            f"{b.samples_per_second:>10.1f}" + ("  (lease)" if b.lease else "")
        )
    return 0
