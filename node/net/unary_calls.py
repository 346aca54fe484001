"""Keep hivemind's reader of unary-call answers alive when a caller gives up.

hivemind (1.1.12) carries every unary call, a DHT RPC or a blob HAVE, in and out, over one
persistent connection between a P2P client and its p2pd, and one task reads every message
from it. When an answer arrives, that task sets it on the caller's future if the call id is
still listed as pending. A caller that timed out has its future cancelled at once but
unlists it only when its own task next runs; an answer read in between meets the cancelled
future, ``set_result`` raises InvalidStateError, and the reader task ends. Nothing restarts
it: from then on every unary call to and from the peer waits out its timeout, while the peer
looks alive (its process, its DHT and its p2pd all work).

The default soak (scripts/soak.py, 16 volunteers) hit it twice in a row: an aggregator that
had just published a head, with the whole swarm asking it for the patch at once, went deaf
for six minutes, and with it the only copy of the patch, until the chaos killed it.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "PendingCalls",
    "guard_dht_unary_calls",
    "guard_unary_calls",
    "reader_stopped",
    "unary_reader_alive",
]


class PendingCalls(dict):
    """Call id -> future, in which a call counts as pending only while its future is not
    done. hivemind's reader asks ``call_id in pending`` before it sets an answer, so the
    answer to a call its caller gave up on is dropped like one to an unknown call instead
    of ending the reader."""

    def __contains__(self, call_id: object) -> bool:
        future = self.get(call_id)
        return future is not None and not future.done()


def guard_unary_calls(p2p: Any) -> None:
    """Install :class:`PendingCalls` in a hivemind P2P client. Call it on the client's
    event loop, so that no call is listed between the copy and the swap."""
    control = p2p._client.control
    if not isinstance(control._pending_calls, PendingCalls):
        control._pending_calls = PendingCalls(control._pending_calls)


async def guard_dht_unary_calls(_dht: object, node: Any) -> None:
    """For ``DHT.run_coroutine``: the same guard in the DHT process, whose RPCs ride on
    that process's own persistent connection."""
    guard_unary_calls(node.p2p)


def reader_stopped(p2p: Any) -> str | None:
    """Why the client's reader of unary-call answers ended; None while it runs."""
    task = p2p._client.control._read_task
    if task is None or not task.done():
        return None
    return "cancelled" if task.cancelled() else repr(task.exception())


def unary_reader_alive(p2p: Any) -> bool:
    """Whether the client's reader of unary-call answers is still running."""
    return reader_stopped(p2p) is None
