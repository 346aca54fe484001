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
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

MERGESWARM = str(Path(sys.executable).with_name("mergeswarm"))
LOOPBACK = "/ip4/127.0.0.1/tcp/0"
T = TypeVar("T")

_running: list[subprocess.Popen] = []


@dataclass
class PeerProcess:
    proc: subprocess.Popen
    data_dir: Path
    log: Path
    maddrs: list[str]

    @property
    def peer_id(self) -> str:
        return self.maddrs[0].rsplit("/p2p/", 1)[1]

    def kill9(self) -> None:
        _kill_group(self.proc, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> int:
        """SIGTERM and wait: the daemon's clean shutdown."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        finally:
            _kill_group(self.proc, signal.SIGKILL)  # p2pd, should it outlive its parent

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def start_peer(
    data_dir: Path,
    *args: str,
    command: str = "seed",
    timeout: float = 60,
    env: dict[str, str] | None = None,
) -> PeerProcess:
    """Start ``mergeswarm <command>`` on loopback and wait for its multiaddrs file."""
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "multiaddrs").unlink(missing_ok=True)
    log = data_dir / f"{command}.log"
    cmd = [MERGESWARM, command, "--data-dir", str(data_dir), "--host-maddr", LOOPBACK, *args]
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=_env() | (env or {}),
        )
    _running.append(proc)
    peer = PeerProcess(proc, data_dir, log, [])
    path = data_dir / "multiaddrs"

    def ready() -> list[str] | None:
        if proc.poll() is not None:
            raise AssertionError(f"{command} exited with {proc.returncode}:\n{peer.log_tail()}")
        return path.read_text().split() if path.is_file() else None

    maddrs = wait_for(ready, timeout, f"{command} in {data_dir} to start")
    peer.maddrs = maddrs
    return peer


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
    return os.environ | {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


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


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def reap_all() -> None:
    while _running:
        proc = _running.pop()
        _kill_group(proc, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
