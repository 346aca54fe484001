"""A zygote for the integration tests' ``mergeswarm`` processes: one process imports torch,
transformers, hivemind and our packages once, then forks a child per command.

Every daemon and CLI call a test starts used to pay those imports itself: about 2.5 s of one
core each, a few hundred times a suite. A forked child starts in milliseconds with them done.

The child is what ``subprocess.Popen([mergeswarm, *args], start_new_session=True, ...)``
would have started: its own session, the given environment, working directory and output
files, stdin from /dev/null, and its exit runs the interpreter's shutdown (threads joined,
atexit handlers). It differs in what is fixed at import: the zygote imports with one torch
and one BLAS thread (SHARED_CORES_ENV, as every test daemon runs; a forked process must not
inherit thread pools) and hivemind's log level at WARNING (the CLI's default without -v).

The zygote stays the children's parent: it reaps them and sends each exit status down the
connection that asked for the child (:class:`Child` reads it, as Popen reads waitpid).

    python -m tests.zygote SOCKET    # prints "ready" once imported; exits when stdin closes
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path

READY = "ready"
REQUEST_BYTES = 1 << 20  # argv and environment, as JSON
# What a forked child must not inherit: threads. One torch thread, as the tests' daemons
# run anyway, and no BLAS pool (OpenBLAS starts one at import unless told not to).
ZYGOTE_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "HIVEMIND_LOGLEVEL": "WARNING"}


class ZygoteError(RuntimeError):
    """The zygote is gone or refused a request."""


class Child:
    """A forked ``mergeswarm`` process, as much of subprocess.Popen as the tests use."""

    def __init__(self, args: list[str], pid: int, conn: socket.socket) -> None:
        self.args, self.pid, self._conn = args, pid, conn
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self._collect(0)

    def wait(self, timeout: float | None = None) -> int:
        if self._collect(timeout) is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:  # once reaped, the pid may be someone else's
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def _collect(self, timeout: float | None) -> int | None:
        if self.returncode is not None:
            return self.returncode
        self._conn.settimeout(timeout)
        try:
            message = self._conn.recv(64)
        except (TimeoutError, BlockingIOError):
            return None
        self._conn.close()
        if not message.startswith(b"exit "):  # the zygote died: its children died with it
            raise ZygoteError(f"the zygote lost {self.args[:2]} (pid {self.pid})")
        self.returncode = int(message.split()[1])
        return self.returncode


class Zygote:
    """The client: starts ``python -m tests.zygote`` and asks it for children."""

    def __init__(self, workdir: Path, env: Mapping[str, str], timeout: float = 120) -> None:
        self.workdir = workdir
        self.path = str(workdir / "zygote.sock")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.zygote", self.path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**env, **ZYGOTE_ENV},
            cwd=Path(__file__).resolve().parent.parent,
            text=True,
        )
        self.pid = self._proc.pid
        ready = _read_line(self._proc.stdout, timeout)
        if ready != READY:
            self.close()
            raise ZygoteError(f"the zygote did not start (it said {ready!r})")

    def spawn(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str],
        stdout: int,
        stderr: int,
        cwd: str | None = None,
    ) -> Child:
        """Fork ``mergeswarm *args`` in a new session, its output to the two file descriptors."""
        request = {"args": list(args), "env": dict(env), "cwd": cwd or os.getcwd()}
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            conn.connect(self.path)
            socket.send_fds(conn, [json.dumps(request).encode()], [stdout, stderr])
            answer = conn.recv(64)
        except OSError as exc:
            conn.close()
            raise ZygoteError(f"the zygote at {self.path} did not answer: {exc}") from exc
        if not answer.startswith(b"pid "):
            conn.close()
            raise ZygoteError(f"the zygote refused {list(args)[:2]}: {answer!r}")
        return Child(["mergeswarm", *args], int(answer.split()[1]), conn)

    def close(self) -> None:
        """Stop the zygote (its children live on in their own sessions) and remove its socket."""
        with contextlib.suppress(OSError):
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _read_line(stream, timeout: float) -> str:
    selector = selectors.DefaultSelector()
    selector.register(stream, selectors.EVENT_READ)
    ready = selector.select(timeout)
    selector.close()
    return stream.readline().strip() if ready else ""


# --- the zygote process -------------------------------------------------------------------


def _preload() -> None:
    """Everything a daemon or command imports sooner or later (the point of the zygote)."""
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import aggregator.daemon  # noqa: F401
    import node.cli  # noqa: F401
    import node.demo.local_swarm  # noqa: F401
    import node.monitor  # noqa: F401
    import node.seed  # noqa: F401
    import node.volunteer  # noqa: F401


def _child(request: dict, fds: list[int], inherited: list[int], settled: int) -> None:
    """In the forked child: become the process ``request`` asks for, run it, exit.
    A byte on ``settled`` once it leads its own session (a kill of its group reaches it)."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for fd in inherited:
            os.close(fd)
        os.setsid()
        os.write(settled, b"1")
        os.close(settled)
        devnull = os.open(os.devnull, os.O_RDONLY)
        for target, fd in ((0, devnull), (1, fds[0]), (2, fds[1])):
            os.dup2(fd, target)
        for fd in {devnull, *fds} - {0, 1, 2}:
            os.close(fd)
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # stacks, for a hang's report
        os.chdir(request["cwd"])
        os.environ.clear()  # in place: settings read os.environ by reference
        os.environ.update(request["env"])
        sys.argv = ["mergeswarm", *request["args"]]
        import numpy

        numpy.random.seed()  # a fresh process draws its own seed (random reseeds at fork)
        _own_hivemind_locks()
        from node.cli import main

        code = main(request["args"])
    except SystemExit as exc:  # argparse's errors and --help
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - as the interpreter would: a traceback, status 1
        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            threading._shutdown()  # as Py_Finalize: wait for non-daemon threads, then atexit
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _own_hivemind_locks() -> None:
    """Fresh copies of the process-shared locks hivemind makes at import. Forked, every child
    would share the zygote's: one killed -9 while holding one (a kill test during a daemon's
    start) left every later daemon of the session waiting on it in hivemind.DHT()."""
    import multiprocessing as mp

    from hivemind.utils import asyncio as hm_asyncio
    from hivemind.utils import mpfuture

    mpfuture.SharedBytes._lock = mp.Lock()
    mpfuture.MPFuture._initialization_lock = mp.Lock()
    mpfuture.MPFuture._update_lock = mp.Lock()
    hm_asyncio._AsyncContextWrapper.EXECUTOR_LOCK = mp.Lock()


def serve(path: str) -> None:
    _preload()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(64)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so that the wakeup fd fires
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "accept")
    selector.register(wake_r, selectors.EVENT_READ, "reap")
    selector.register(sys.stdin, selectors.EVENT_READ, "stdin")
    children: dict[int, socket.socket] = {}
    print(READY, flush=True)
    while True:
        for key, _ in selector.select():
            if key.data == "stdin" and not sys.stdin.readline():
                return  # the test session is over
            if key.data == "reap":
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 1 << 16)
                _reap(children)
            if key.data == "accept":
                conn, _ = listener.accept()
                try:
                    message, fds, _, _ = socket.recv_fds(conn, REQUEST_BYTES, 2)
                    request = json.loads(message)
                except (OSError, ValueError) as exc:
                    with contextlib.suppress(OSError):
                        conn.send(f"error {exc}".encode())
                    conn.close()
                    continue
                sys.stdout.flush()
                sys.stderr.flush()
                inherited = [listener.fileno(), wake_r, wake_w, conn.fileno()]
                inherited += [c.fileno() for c in children.values()]
                settled_r, settled_w = os.pipe()
                pid = os.fork()
                if pid == 0:
                    _child(request, fds, [*inherited, settled_r], settled_w)
                for fd in (*fds, settled_w):
                    os.close(fd)
                os.read(settled_r, 1)  # as Popen returns: the child in its session (or dead)
                os.close(settled_r)
                children[pid] = conn
                with contextlib.suppress(OSError):
                    conn.send(f"pid {pid}".encode())
        _reap(children)  # a SIGCHLD between select and the handler's byte


def _reap(children: dict[int, socket.socket]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.send(f"exit {os.waitstatus_to_exitcode(status)}".encode())
            conn.close()


if __name__ == "__main__":
    os.environ.update(ZYGOTE_ENV)
    serve(sys.argv[1])
