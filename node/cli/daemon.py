"""What every daemon command shares: flags from its settings model, the metrics endpoint, the
stop signal, the join line it prints, and one lifecycle (:func:`run_daemon`)."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from node.data_dir import DataDir

from . import common

logger = logging.getLogger(__name__)


def add_data_dir_arg(
    p: argparse.ArgumentParser, what: str = "identity, swarm id and blobs"
) -> None:
    p.add_argument(
        "--data-dir",
        type=Path,
        default=common.default_data_dir(),
        help=f"{what} (default: $MERGESWARM_DATA_DIR or ~/.mergeswarm)",
    )


def add_join_args(p: argparse.ArgumentParser, *, data_dir: bool = True) -> None:
    """The flags of a command that joins a swarm for a while (from JoinSettings)."""
    from node.config import JoinSettings
    from node.settings import add_flags

    add_flags(p, JoinSettings)
    p.add_argument("--config", type=Path, metavar="FILE.toml", help="settings file (TOML)")
    if data_dir:
        add_data_dir_arg(p)


def add_daemon_args(
    p: argparse.ArgumentParser,
    model: type,
    *,
    settings_flag: str = "--config",
    skip: frozenset[str] = frozenset(),
) -> None:
    """A daemon's flags: one per field of its settings model, and its settings file."""
    from node.settings import add_flags

    p.add_argument(
        settings_flag,
        dest="settings_file",
        type=Path,
        metavar="FILE.toml",
        help="settings file (TOML; keys are the flags' names with underscores)",
    )
    add_flags(
        p, model, skip=skip, title=f"settings (flags > MERGESWARM_* env > {settings_flag} file)"
    )


def load_daemon_settings(model: type, args: argparse.Namespace):
    """Defaults < ``--config`` (or ``--settings``) TOML < ``MERGESWARM_*`` env < flags."""
    from node.settings import load_settings

    return load_settings(model, args, config_file=getattr(args, "settings_file", None))


def serve_metrics(daemon, settings, data_dir: Path):
    """Start the daemon's metrics endpoint when a metrics port is set (None otherwise)."""
    from node.daemon.metrics import MetricsServer
    from protocol.durable import write_atomic

    if settings.metrics_port is None:
        return None
    host = settings.metrics_host
    server = MetricsServer(
        daemon.metrics.registry, daemon.health, host, settings.metrics_port, daemon.ready
    )
    write_atomic(DataDir(data_dir).metrics_port, f"{server.port}\n".encode())
    print(f"metrics on http://{host}:{server.port}/metrics", flush=True)
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
    print(
        f"swarm {swarm.swarm_id}, as author {swarm.identity.author}; to join it, use:", flush=True
    )
    for maddr in swarm.maddrs:
        print(f"  --join {maddr}", flush=True)


def settle_mode(swarm: Any, settings: Any, *, switch: bool) -> Any:
    """Say how the swarm sees this peer (printed and logged), and with ``switch`` (a peer
    that needs no inbound connections, whose --client-mode was not given) restart it in
    client mode when the peer it joined through could not open a connection to it. The
    swarm to use from here on."""
    from node.net.reach import clock_verdict, verdict
    from node.net.swarm import Swarm

    r = swarm.reachability
    if r is None:  # started a swarm, or nobody answered: nothing to tell yet
        return swarm
    clock_ok, clock_line = clock_verdict(r)
    if not clock_ok:
        logger.error(clock_line)
        print(clock_line, flush=True)
    if swarm.options.client_mode:
        line = "client mode: serves nobody, fetches from and pushes to reachable peers"
        why = "(--client-mode)" if settings.client_mode else "(the swarm cannot reach this peer)"
        logger.info("%s %s", line, why)
        print(f"{line} {why}", flush=True)
        return swarm
    reachable, line = verdict(r)
    if reachable or not switch or settings.client_mode is not None:
        (logger.info if reachable else logger.warning)(line)
        print(line, flush=True)
        return swarm
    logger.warning("%s; restarting in client mode", line)
    print(f"{line}; restarting in client mode", flush=True)
    options = swarm.options
    swarm.shutdown()
    options.client_mode = True
    return settle_mode(Swarm(options), settings, switch=False)


def run_daemon(
    settings: Any,
    data_dir: Path,
    build: Callable[[Any, list[Callable[[], None]]], Any],
    *,
    work: str | None = None,
    interval: float = 2.0,
    join_timeout: float = 60.0,
    swarm_id: str | None = None,
    auto_client_mode: bool = False,
) -> int:
    """The life of every daemon command, in one place.

    Join the swarm (as ``settings``, a DaemonSettings, say), build the daemon with ``build(swarm,
    closers)`` (it may append clean-ups to ``closers``), serve its metrics when asked, print
    the join line, run its ``work`` method (which takes the stop event) in a thread while
    this thread ticks its housekeeping, and on SIGTERM or SIGINT let the work finish (up to
    ``join_timeout``), close everything and leave the swarm. A failing work loop stops the
    daemon and is raised, so the command exits non-zero. ``auto_client_mode``: see
    :func:`settle_mode`.
    """
    from node.daemon.peer import run_until
    from node.net.swarm import Swarm

    options = settings.options(data_dir)
    if swarm_id is not None:  # named by the swarm's config
        options.swarm_id = swarm_id
    swarm = settle_mode(Swarm(options), settings, switch=auto_client_mode)
    stop = stop_event()  # after the DHT process forked: it must not inherit the handler
    closers: list[Callable[[], None]] = []
    failure: list[BaseException] = []
    stopped_at: float | None = None  # when the stop came, once it did
    try:
        daemon = build(swarm, closers)
        server = serve_metrics(daemon, settings, data_dir)
        if server is not None:
            closers.append(server.close)
        print_join_line(swarm)
        swarm.write_multiaddrs()  # up: what launchers wait for
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
        run_until(daemon, stop, interval=min(interval, settings.heartbeat_every))
        stopped_at = time.monotonic()
        if worker is not None:
            worker.join(timeout=join_timeout)
    finally:
        # how long each step of stopping took: under load some daemons outlast a 30 s grace
        steps = [] if stopped_at is None else [("work", time.monotonic() - stopped_at)]
        began = time.monotonic()
        for close in reversed(closers):
            close()
        steps.append(("closing", time.monotonic() - began))
        began = time.monotonic()
        swarm.shutdown()
        steps.append(("leaving the swarm", time.monotonic() - began))
        logger.info("stopped: %s", ", ".join(f"{name} {took:.1f} s" for name, took in steps))
    if failure:
        raise failure[0]
    return 0
