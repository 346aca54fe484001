"""Crash points: kill -9 this process at a named instant, for crash-consistency tests.

``MERGESWARM_CRASH_AT=<name>`` in a daemon's environment makes the first
:func:`crash_point` of that name SIGKILL the process, the way a power cut
would: no finally blocks, no flushing. Some points also exist per round
(``aggregator:fetched:3``), to crash in the middle of a chain. Unset (always, outside tests), each
point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "MERGESWARM_CRASH_AT"


def crash_point(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
