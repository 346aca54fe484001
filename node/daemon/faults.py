"""Crash points: kill -9 this process at a named instant, for crash-consistency tests.

``MERGESWARM_CRASH_AT=<name>`` in a daemon's environment makes the first
:func:`crash_point` of that name SIGKILL the process, the way a power cut
would: no finally blocks, no flushing. Some points also exist per round
(``aggregator:fetched:3``), to crash in the middle of a chain.
``MERGESWARM_PAUSE_AT=<name>=<seconds>`` makes the first one of that name stall the thread
instead (a partition test cuts the network meanwhile). Unset (always, outside tests), each
point costs two dictionary lookups.
"""

from __future__ import annotations

import os
import signal
import time

ENV = "MERGESWARM_CRASH_AT"
PAUSE_ENV = "MERGESWARM_PAUSE_AT"
_paused: set[str] = set()


def crash_point(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
    pause = os.environ.get(PAUSE_ENV)
    if pause and pause.rpartition("=")[0] == name and name not in _paused:
        _paused.add(name)
        time.sleep(float(pause.rpartition("=")[2]))
