"""What every daemon command shares: the join, heartbeat and metrics flags, the metrics
endpoint, the stop signal and the join line it prints."""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

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

    if getattr(args, "metrics_port", None) is None:
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


def run_daemon(
    args: argparse.Namespace,
    options: Any,
    build: Callable[[Any, list[Callable[[], None]]], Any],
    *,
    work: str | None = None,
    interval: float = 2.0,
    join_timeout: float = 60.0,
) -> int:
    """The life of every daemon command, in one place.

    Join the swarm (``options``: SwarmOptions), build the daemon with ``build(swarm,
    closers)`` (it may append clean-ups to ``closers``), serve its metrics when asked, print
    the join line, run its ``work`` method (which takes the stop event) in a thread while
    this thread ticks its housekeeping, and on SIGTERM or SIGINT let the work finish (up to
    ``join_timeout``), close everything and leave the swarm. A failing work loop stops the
    daemon and is raised, so the command exits non-zero.
    """
    from node.daemon.peer import run_until
    from node.net.swarm import Swarm

    swarm = Swarm(options)
    stop = stop_event()  # after the DHT process forked: it must not inherit the handler
    closers: list[Callable[[], None]] = []
    failure: list[BaseException] = []
    try:
        daemon = build(swarm, closers)
        daemon.heartbeat_every = args.heartbeat_every
        server = serve_metrics(daemon, args, args.data_dir)
        if server is not None:
            closers.append(server.close)
        print_join_line(swarm)
        worker = None
        if work is not None:

            def loop() -> None:
                try:
                    getattr(daemon, work)(stop)
                except BaseException as exc:  # reported by this thread, which exits non-zero
                    failure.append(exc)
                    stop.set()

            worker = threading.Thread(target=loop, name=work, daemon=True)
            worker.start()
        run_until(daemon, stop, interval=min(interval, args.heartbeat_every))
        if worker is not None:
            worker.join(timeout=join_timeout)
    finally:
        for close in reversed(closers):
            close()
        swarm.shutdown()
    if failure:
        raise failure[0]
    return 0
