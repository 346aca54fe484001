"""What an aggregator lets into a round: pure checks of announced deltas.

:func:`rank_candidates` orders one delta per author among those announced
against the head and its recent ancestors, in an order no author can choose;
:func:`inspect_delta` opens one fetched ``.msd`` and checks it end to end
(signature, author, base, layout, finite values) while measuring its norm;
:func:`screen_norms` holds each norm against the round's median, so that one
delta scaled up a hundred times cannot drag the merge.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from protocol.constants import DELTA_REJECT_REASONS
from protocol.container import DeltaReader
from protocol.delta import check_fits
from protocol.errors import (
    BaseMismatchError,
    DeltaFormatError,
    MergeswarmError,
    NonFiniteError,
    SignatureError,
)
from protocol.model_dir import ModelDir
from protocol.records import DeltaAnnouncement


class Rejected(MergeswarmError):
    """A delta is refused; ``reason`` is one of DELTA_REJECT_REASONS (bounded metric labels)."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in DELTA_REJECT_REASONS:  # a new reason must be named there first
            raise ValueError(f"unnamed reject reason {reason!r}")
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Candidate:
    """An announced delta, ``age`` rounds behind the head (0: trained on the head)."""

    author: str
    announcement: DeltaAnnouncement
    age: int

    @property
    def delta_id(self) -> str:
        return self.announcement.delta_id


def rank_candidates(announced: list[Candidate], beacon: str) -> list[Candidate]:
    """One delta per author (the freshest, then the first in rank), freshest first, then in
    an order drawn from ``beacon`` (the head's base id).

    The order is the same for every aggregator, and a delta's place in it is the hash of
    the beacon and its id: an author can grind ids for a small one only after the head
    appeared, and a slot goes to a delta only once it has arrived and passed inspection
    (the aggregator's admission), so made-up ids cannot crowd honest deltas out. A delta id
    announced by several authors stays under each: inspection passes only its signer's.
    """

    def order(c: Candidate) -> tuple[int, bytes, str]:  # total: no input order leaks
        draw = hashlib.sha256(f"{beacon}:{c.delta_id}".encode()).digest()
        return (c.age, draw, c.author)

    best: dict[str, Candidate] = {}
    for c in sorted(announced, key=order):
        best.setdefault(c.author, c)
    return sorted(best.values(), key=order)


def inspect_delta(
    path: Path,
    candidate: Candidate,
    head: ModelDir,
    *,
    max_bytes: int,
    drop_rate: float | None = None,
) -> tuple[str, float]:
    """(base id it was trained on, L2 norm of its task vector), or raise :class:`Rejected`.

    :param drop_rate: the DARE drop rate the swarm's config requires (None: any). Its mask
        is regenerated from the header's seed and rate, so the rate is what was applied.
    """
    a = candidate.announcement
    size = path.stat().st_size
    if size > max_bytes or size != a.size:
        raise Rejected("size", f"delta {a.delta_id[:16]}: {size} bytes (announced {a.size})")
    try:
        with DeltaReader(path, expected_author=candidate.author) as reader:
            if reader.header.base_id != a.base_id:
                raise Rejected("unknown_base", f"delta {a.delta_id[:16]}: not the announced base")
            check_fits(reader, head, reader.header.base_id)
            used = reader.header.sparsifier.drop_rate
            squares = 0.0
            for name in reader.names():
                values = reader.read_tensor(name).double()
                squares += float(values.square().sum())
            norm = math.sqrt(squares)
    except SignatureError as exc:
        raise Rejected("bad_signature", str(exc)) from None
    except NonFiniteError as exc:
        raise Rejected("non_finite", str(exc)) from None
    except BaseMismatchError as exc:
        raise Rejected("layout", str(exc)) from None
    except DeltaFormatError as exc:
        raise Rejected("malformed", str(exc)) from None
    if not math.isfinite(norm):
        raise Rejected("non_finite", f"delta {a.delta_id[:16]}: its norm overflows")
    if drop_rate is not None and abs(used - drop_rate) > 1e-9:  # denser: it would weigh more
        raise Rejected("drop_rate", f"delta {a.delta_id[:16]}: drop rate {used}, not {drop_rate}")
    return a.base_id, norm


def screen_norms(norms: dict[str, float], factor: float, action: str) -> dict[str, float | None]:
    """Delta id -> weight multiplier (1.0, or less when clipped), or None when rejected.

    The bound is ``factor`` times the median norm of the round; ``clip`` scales a
    delta above it down to the bound, ``reject`` drops it.
    """
    if not norms:
        return {}
    bound = factor * statistics.median(norms.values())
    out: dict[str, float | None] = {}
    for delta_id, norm in norms.items():
        if norm <= bound:
            out[delta_id] = 1.0
        else:  # clipping to a zero bound (most deltas empty) leaves nothing: a rejection
            out[delta_id] = bound / norm if action == "clip" and bound > 0 else None
    return out
