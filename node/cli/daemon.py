"""What every daemon command shares: the join, heartbeat and metrics flags, the metrics
endpoint, the stop signal and the join line it prints."""

from __future__ import annotations

import argparse
import signal
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
    from node.daemon.metrics import MetricsServer
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


def stop_event() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def print_join_line(swarm) -> None:
    print(f"swarm {swarm.swarm_id}; to join it, use:", flush=True)
    for maddr in swarm.maddrs:
        print(f"  --join {maddr}", flush=True)
