"""Helpers for tests that run real peers: daemons as separate processes on 127.0.0.1.

Every process started here is registered and killed (with its p2pd, by
process group) by the autouse ``reap_peers`` fixture in conftest.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from node.daemon.launch import (
    LOOPBACK,
    SHARED_CORES_ENV,
    PeerProcess,
    PeerStartError,
    kill_group,
    launch_peer,
)

MERGESWARM = str(Path(sys.executable).with_name("mergeswarm"))
T = TypeVar("T")

_running: list[subprocess.Popen] = []


def start_peer(
    data_dir: Path,
    *args: str,
    command: str = "seed",
    timeout: float = 60,
    env: dict[str, str] | None = None,
) -> PeerProcess:
    """Start ``mergeswarm <command>`` on loopback and wait for its multiaddrs file."""
    cmd = [MERGESWARM, command, "--data-dir", str(data_dir), "--host-maddr", LOOPBACK, *args]
    try:
        peer = launch_peer(
            f"{command} in {data_dir}",
            cmd,
            data_dir=data_dir,
            log=data_dir / f"{command}.log",
            env=_env() | (env or {}),
            timeout=timeout,
            started=_running.append,
        )
    except PeerStartError as exc:  # a test's failure, with the daemon's log
        raise AssertionError(str(exc)) from None
    return peer


def start_all(*starts: Callable[[], PeerProcess]) -> list[PeerProcess]:
    """Call each ``start_peer`` wrapper at once (the daemons start side by side); their peers."""
    with ThreadPoolExecutor(len(starts)) as pool:
        return list(pool.map(lambda start: start(), starts))


def register_process(proc: subprocess.Popen) -> None:
    """Have ``reap_peers`` kill this process (started in a new session) after the test."""
    _running.append(proc)


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(
        [MERGESWARM, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=_env(),
    )
    _running.append(proc)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _env() -> dict[str, str]:
    return os.environ | SHARED_CORES_ENV | {"PYTHONUNBUFFERED": "1"}


def wait_for(check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.25) -> T:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def reap_all() -> None:
    while _running:
        proc = _running.pop()
        kill_group(proc, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
