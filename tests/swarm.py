"""Helpers for tests that run real peers: daemons as separate processes on 127.0.0.1.

Every process started here is registered and killed (with its p2pd, by
process group) by the autouse ``reap_peers`` fixture in conftest.

``mergeswarm`` processes fork from a zygote that has done the imports (tests/zygote.py), not
start from scratch: MERGESWARM_TEST_ZYGOTE=0 starts them as plain processes instead.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, TypeVar

from node.daemon.launch import (
    LOOPBACK,
    SHARED_CORES_ENV,
    PeerProcess,
    PeerStartError,
    kill_group,
    launch_peer,
)
from tests.zygote import Child, Zygote

MERGESWARM = str(Path(sys.executable).with_name("mergeswarm"))
T = TypeVar("T")

_running: list[subprocess.Popen | Child] = []
_zygote: Zygote | None = None
_zygote_lock = threading.Lock()  # start_all's threads may ask for the first fork at once


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
            popen=popen,
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
    return run_mergeswarm(args, env=_env(), timeout=timeout)


def run_mergeswarm(
    args: Sequence[object], *, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """``subprocess.run([mergeswarm, *args], capture_output=True, text=True, ...)``, the
    process forked from the zygote (and reaped after the test should it outlive its timeout)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = popen(
            [MERGESWARM, *map(str, args)],
            stdout=out,
            stderr=err,
            start_new_session=True,
            env=os.environ.copy() if env is None else env,
        )
        _running.append(proc)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # A forked child dumps its threads' stacks on SIGUSR1 (tests/zygote.py): say
            # where it hangs, with what it printed.
            proc.send_signal(signal.SIGUSR1)
            time.sleep(1)
            err.seek(0)
            tail = err.read().decode(errors="replace")[-6000:]
            raise AssertionError(
                f"{proc.args[:2]} took over {timeout} s; stderr:\n{tail}"
            ) from None
        out.seek(0)
        err.seek(0)
        text = [f.read().decode(errors="replace") for f in (out, err)]
    return subprocess.CompletedProcess(proc.args, proc.returncode, *text)


def popen(
    argv: list[str], *, stdout: IO, stderr: IO | int, env: dict[str, str], **kwargs: object
) -> subprocess.Popen | Child:
    """subprocess.Popen for launch_peer and run_mergeswarm, where a ``mergeswarm`` command
    forks from the zygote (started at the first)."""
    global _zygote
    if argv[0] != MERGESWARM or os.environ.get("MERGESWARM_TEST_ZYGOTE") == "0":
        return subprocess.Popen(argv, stdout=stdout, stderr=stderr, env=env, **kwargs)
    assert kwargs == {"start_new_session": True}, kwargs  # all that a child can be asked
    with _zygote_lock:
        if _zygote is None:
            _zygote = Zygote(Path(tempfile.mkdtemp(prefix="zygote-")), _env())
    errors = stdout if stderr == subprocess.STDOUT else stderr
    return _zygote.spawn(argv[1:], env=env, stdout=stdout.fileno(), stderr=errors.fileno())


def close_zygote() -> None:
    global _zygote
    if _zygote is not None:
        _zygote.close()
        _zygote = None


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
