"""Skipping what keeps failing: each key that failed waits, twice as long each time."""

from __future__ import annotations

import time
from collections.abc import Hashable, Iterator


class Backoff:
    """Failures by key; a key that failed is not ready for ``first * 2**(failures - 1)``
    seconds (at most ``cap``)."""

    def __init__(self, first: float, cap: float = 3600.0) -> None:
        self.first = first
        self.cap = cap
        self._failures: dict[Hashable, int] = {}
        self._until: dict[Hashable, float] = {}

    def ready(self, key: Hashable) -> bool:
        return time.monotonic() >= self._until.get(key, 0.0)

    def failed(self, key: Hashable) -> float:
        """Count a failure; the seconds ``key`` now waits."""
        failures = self._failures.get(key, 0) + 1
        self._failures[key] = failures
        wait = min(self.first * 2 ** (failures - 1), self.cap)
        self._until[key] = time.monotonic() + wait
        return wait

    def forget(self, key: Hashable) -> None:
        self._failures.pop(key, None)
        self._until.pop(key, None)

    def clear(self) -> None:
        self._failures.clear()
        self._until.clear()

    def __iter__(self) -> Iterator[Hashable]:  # the keys that failed and were not forgotten
        return iter(self._failures)
