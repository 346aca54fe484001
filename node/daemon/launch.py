"""Starting peer daemons as processes on this machine: the demo, the benchmarks and the
integration tests all start them the same way.

A daemon runs in its own session (so a stop reaches its libp2p daemon too), appends its
output to a log, and counts as up once it has written its multiaddrs file.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from node.data_dir import DataDir
from protocol.errors import MergeswarmError

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
# The environment of daemons that share this machine's cores (the demo's, the lab's, the
# soak's, the tests'): one torch thread each. Torch's default, a thread per core in every
# process, has each one's OpenMP threads spin on cores the others need: the three-round test
# (tests/test_aggregator.py) took 37% less CPU and 18% less time with one, next to a busy core.
SHARED_CORES_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


class PeerStartError(MergeswarmError):
    """A daemon exited or did not come up in time; the message ends with its log's tail."""


@dataclass
class PeerProcess:
    proc: subprocess.Popen
    data_dir: Path
    log: Path
    maddrs: list[str]

    @property
    def peer_id(self) -> str:
        return self.maddrs[0].rsplit("/p2p/", 1)[1]

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait: the daemon's clean shutdown; then nothing of it is left."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            kill_group(self.proc, signal.SIGKILL)  # p2pd, should it outlive its parent

    def kill9(self) -> None:
        kill_group(self.proc, signal.SIGKILL)
        self.proc.wait(timeout=10)


def launch_peer(
    name: str,
    argv: Sequence[str],
    *,
    data_dir: Path,
    log: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
    started: Callable[[subprocess.Popen], object] = lambda proc: None,
    popen: Callable[..., subprocess.Popen] = subprocess.Popen,
) -> PeerProcess:
    """Start the daemon ``name`` (for messages) as ``argv`` (its whole command line, with
    ``--data-dir data_dir``) and return once it is up; PeerStartError when it exits first or
    takes over ``timeout``. ``started`` is told of the process at once (to reap it, should
    the wait fail); ``popen`` starts it (the tests fork theirs from a pre-imported process)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    maddrs = DataDir(data_dir).multiaddrs
    maddrs.unlink(missing_ok=True)  # a previous run's
    with open(log, "ab") as out:
        proc = popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=dict(env) if env is not None else None,
        )
    started(proc)
    peer = PeerProcess(proc, data_dir, log, [])
    deadline = time.monotonic() + timeout
    while not maddrs.is_file():
        if proc.poll() is not None:
            raise PeerStartError(f"{name} exited with {proc.returncode}:\n{peer.log_tail()}")
        if time.monotonic() > deadline:
            raise PeerStartError(f"{name} did not start in {timeout:.0f} s:\n{peer.log_tail()}")
        time.sleep(0.2)
    peer.maddrs = maddrs.read_text().split()
    return peer


def kill_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal the process's whole session (it and its libp2p daemon)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
