"""Influence a key earns: how many rounds merged a delta of each author, and how far the keys
with none may move a round.

Keys are free, so a crowd of new ones must not outweigh the volunteers the swarm already
knows. An author whose delta a head merged is *established*; the others are *newcomers*.
:func:`newcomer_factor` scales the newcomers' weights in a round down so that together they
weigh at most ``share`` of it, whenever established authors take part (a new swarm, where
nobody is established yet, is not held back). Only deltas that weighed enough in their
round earn it (aggregator.daemon's CREDIT_WEIGHT: a delta weighed down by the cap or by its
small gain earns nothing); the aggregator that merged the round names their authors in the
head it signs (``Head.credited``), and every aggregator counts the heads it follows, and
their ancestors, from those signed records, so all of them know the same established keys.
Each keeps its counts in its data directory.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable
from pathlib import Path

from protocol.durable import write_atomic

logger = logging.getLogger(__name__)

REMEMBERED_HEADS = 256  # heads already credited, kept so that none is credited twice


class Reputation:
    """Rounds in which each author had a delta merged, as this aggregator saw them."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.merged: dict[str, int] = {}
        self._credited: list[str] = []  # base ids of the heads counted, oldest first
        self._lock = threading.Lock()  # heads are counted by the round and by following
        if path is not None and path.is_file():
            try:
                data = json.loads(path.read_text())
                self.merged = {str(a): int(n) for a, n in data["merged"].items()}
                self._credited = [str(b) for b in data["heads"]][-REMEMBERED_HEADS:]
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                logger.warning("%s: unreadable (%s); reputation starts afresh", path, exc)

    def established(self, author: str) -> bool:
        return self.merged.get(author, 0) > 0

    def most_merged(self, n: int) -> list[str]:
        """The ``n`` authors with the most rounds merged (the smaller key first on a tie)."""
        with self._lock:
            ranked = sorted(self.merged.items(), key=lambda item: (-item[1], item[0]))
        return [author for author, _ in ranked[:n]]

    def credit(self, head_id: str, authors: Iterable[str]) -> bool:
        """Count one round for each of ``authors`` (whose deltas head ``head_id`` merged);
        False when that head was counted already."""
        with self._lock:
            if head_id in self._credited:
                return False
            for author in set(authors):
                self.merged[author] = self.merged.get(author, 0) + 1
            self._credited = [*self._credited, head_id][-REMEMBERED_HEADS:]
            if self.path is not None:
                data = {"merged": self.merged, "heads": self._credited}
                write_atomic(self.path, json.dumps(data, sort_keys=True).encode())
            return True


def newcomer_factor(weights: dict[str, float], newcomers: set[str], share: float) -> float:
    """What the newcomers' weights are multiplied by so that together they weigh at most
    ``share`` of the round (1.0: no cap needed, or no established author takes part).

    :param weights: delta id -> weight so far, for the deltas that take part.
    :param newcomers: the delta ids whose authors are not established.
    """
    new = sum(w for d, w in weights.items() if d in newcomers)
    known = sum(w for d, w in weights.items() if d not in newcomers)
    if share >= 1.0 or new <= 0 or known <= 0:
        return 1.0
    allowed = share / (1.0 - share) * known
    return min(1.0, allowed / new)
