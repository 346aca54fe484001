"""Fork choice: which of several head records every peer follows.

When aggregators disagree, each peer picks, among heads signed by a trusted
author: the highest round, then the most deltas merged, then the smallest
base id. The rule is a total order on what the records say, so every peer
that sees the same heads picks the same one.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from protocol.records import Head


def head_order(head: Head) -> tuple[int, int, int]:
    """Sort key: larger is preferred."""
    return head.round, head.deltas, -int(head.base_id, 16)


def choose_head(
    heads: Iterable[tuple[str, Head]], trusted: Collection[str] = ()
) -> tuple[str, Head] | None:
    """The (author, head) to follow, among heads by ``trusted`` authors (all when empty)."""
    eligible = [(a, h) for a, h in heads if not trusted or a in trusted]
    if not eligible:
        return None
    return max(eligible, key=lambda item: head_order(item[1]))
