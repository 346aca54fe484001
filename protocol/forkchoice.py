"""Fork choice: which of several head records every peer follows.

When aggregators disagree, each peer picks, among heads signed by a trusted
author: the highest round, then the most deltas merged, then the smallest
base id. The rule is a total order on what the records say, so every peer
that sees the same heads picks the same one.

Only what a head can show counts: the deltas it names (not the count it
claims, which must agree), and a head past round 0 counts only when it names a
parent other than itself; walking the chain back then checks that each parent
is exactly one round older (node.chain.history). A head dated more than
MAX_AHEAD_SECONDS after the reader's clock is not followed (its date opens the
next round's leases: one from the future would stall them).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from protocol.records import Head


def head_order(head: Head) -> tuple[int, int, int]:
    """Sort key: larger is preferred."""
    return head.round, len(head.merged), -int(head.base_id, 16)


MAX_AHEAD_SECONDS = 60.0


def well_formed(head: Head, now: float | None = None) -> bool:
    """A head that can be followed: round 0 (a genesis, or a stand-in head), or a later
    round that names a parent other than itself and as many deltas as it claims; and, given
    the reader's DHT time ``now``, not dated after it by more than MAX_AHEAD_SECONDS."""
    if now is not None and head.created is not None and head.created > now + MAX_AHEAD_SECONDS:
        return False
    if head.round == 0:
        return True
    return head.parent not in (None, head.base_id) and head.deltas == len(head.merged)


def choose_head(
    heads: Iterable[tuple[str, Head]], trusted: Collection[str] = (), now: float | None = None
) -> tuple[str, Head] | None:
    """The (author, head) to follow, among well-formed heads by ``trusted`` authors (all
    when empty)."""
    eligible = [(a, h) for a, h in heads if (not trusted or a in trusted) and well_formed(h, now)]
    if not eligible:
        return None
    return max(eligible, key=lambda item: head_order(item[1]))
