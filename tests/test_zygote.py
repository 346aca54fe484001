"""The zygote the integration tests fork their ``mergeswarm`` processes from (tests/zygote.py)
gives them what a plain process started by subprocess would have."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from node.data_dir import DataDir
from tests import swarm
from tests.swarm import LOOPBACK, MERGESWARM, kill_group, popen, run_mergeswarm
from tests.zygote import Child

pytestmark = pytest.mark.skipif(
    os.environ.get("MERGESWARM_TEST_ZYGOTE") == "0", reason="the zygote is switched off"
)


@pytest.mark.parametrize(
    "args", [["--help"], ["base-id", "/nonexistent"], ["no-such-command"], ["seed", "--bad"]]
)
def test_a_forked_command_prints_and_exits_as_a_plain_process_would(args):
    forked = run_mergeswarm(args, timeout=60)
    plain = subprocess.run([MERGESWARM, *args], capture_output=True, text=True, timeout=60)
    assert (forked.returncode, forked.stdout, forked.stderr) == (
        plain.returncode,
        plain.stdout,
        plain.stderr,
    )


def _seed(tmp_path: Path, log, **env: str) -> Child:
    proc = popen(
        [MERGESWARM, "seed", "--data-dir", str(tmp_path / "seed"), "--host-maddr", LOOPBACK],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=os.environ | env,
    )
    swarm.register_process(proc)
    assert isinstance(proc, Child)  # forked, not started
    return proc


def test_a_forked_daemon_has_its_own_session_environment_and_directory(tmp_path):
    with tempfile.TemporaryFile() as log:
        proc = _seed(tmp_path, log, MERGESWARM_TEST_MARK="forked")
        assert os.getsid(proc.pid) == proc.pid  # so a kill of its group reaches its p2pd
        assert os.readlink(f"/proc/{proc.pid}/cwd") == os.getcwd()
        up = DataDir(tmp_path / "seed").multiaddrs
        swarm.wait_for(up.is_file, 60, "the seed to be up")
        assert proc.poll() is None
        # /proc shows a process's environment as exec left it: its p2pd's is the one it set
        (p2pd,) = [pid for pid in _session(proc.pid) if _comm(pid) == "p2pd"]
        environ = Path(f"/proc/{p2pd}/environ").read_bytes().split(b"\0")
        assert b"MERGESWARM_TEST_MARK=forked" in environ


def _session(sid: int) -> list[int]:
    """The processes of session ``sid`` (a daemon and everything it started)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    found.append(int(entry.name))
            except ProcessLookupError:
                pass
    return found


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except FileNotFoundError:
        return ""


def test_a_forked_daemon_stops_on_sigterm_and_reads_minus_9_after_a_kill_9(tmp_path):
    with tempfile.TemporaryFile() as log:
        first = _seed(tmp_path / "a", log)
        with pytest.raises(subprocess.TimeoutExpired):
            first.wait(timeout=0.5)
        up = DataDir(tmp_path / "a/seed").multiaddrs
        swarm.wait_for(up.is_file, 60, "the seed to be up")
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=30) == 0
        second = _seed(tmp_path / "b", log)
        kill_group(second, signal.SIGKILL)
        assert second.wait(timeout=10) == -signal.SIGKILL


def test_the_zygote_holds_no_thread_that_a_forked_child_would_lose():
    run_mergeswarm(["--help"], timeout=60)  # the zygote is up
    assert swarm._zygote is not None
    pid = swarm._zygote.pid
    assert len(os.listdir(f"/proc/{pid}/task")) == 1  # the main thread, nothing else
