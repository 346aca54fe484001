"""Fork choice: which of several head records every peer follows.

When aggregators disagree, each peer picks, among heads signed by a trusted
author: the highest round, then the most deltas merged, then the smallest
base id. The rule is a total order on what the records say, so every peer
that sees the same heads picks the same one.

Only what a head can show counts: the deltas it names (not the count it
claims), and a head past round 0 counts only when it names a parent other
than itself; walking the chain back then checks that each parent is exactly
one round older (node.chain.history).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from protocol.records import Head


def head_order(head: Head) -> tuple[int, int, int]:
    """Sort key: larger is preferred."""
    return head.round, len(head.merged), -int(head.base_id, 16)


def well_formed(head: Head) -> bool:
    """A head that can be followed: round 0 (a genesis, or a stand-in head), or a later
    round that names a parent other than itself."""
    return head.round == 0 or (head.parent is not None and head.parent != head.base_id)


def choose_head(
    heads: Iterable[tuple[str, Head]], trusted: Collection[str] = ()
) -> tuple[str, Head] | None:
    """The (author, head) to follow, among well-formed heads by ``trusted`` authors (all
    when empty)."""
    eligible = [(a, h) for a, h in heads if (not trusted or a in trusted) and well_formed(h)]
    if not eligible:
        return None
    return max(eligible, key=lambda item: head_order(item[1]))
