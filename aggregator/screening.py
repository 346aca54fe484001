"""What an aggregator lets into a round: pure checks of announced deltas.

:func:`pick_candidates` chooses at most one delta per author among those
announced against the head and its recent ancestors; :func:`inspect_delta`
opens one fetched ``.msd`` and checks it end to end (signature, author, base,
layout, finite values) while measuring its norm; :func:`screen_norms` holds
each norm against the round's median, so that one delta scaled up a hundred
times cannot drag the merge.
"""

from __future__ import annotations

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


def pick_candidates(announced: list[Candidate], max_deltas: int) -> list[Candidate]:
    """One delta per author (the freshest, then the smaller id), freshest first, at most
    ``max_deltas``.

    The order and the cut are deterministic, so every aggregator picks the same set. A
    delta id announced by several authors stays under each: inspection passes only its
    signer's, so a replayed announcement cannot crowd out the real one.
    """
    order = lambda c: (c.age, c.delta_id, c.author)  # noqa: E731 - total: no input order leaks
    best: dict[str, Candidate] = {}
    for c in sorted(announced, key=order):
        best.setdefault(c.author, c)
    return sorted(best.values(), key=order)[:max_deltas]


def inspect_delta(
    path: Path, candidate: Candidate, head: ModelDir, *, max_bytes: int
) -> tuple[str, float]:
    """(base id it was trained on, L2 norm of its task vector), or raise :class:`Rejected`."""
    a = candidate.announcement
    size = path.stat().st_size
    if size > max_bytes or size != a.size:
        raise Rejected("size", f"delta {a.delta_id[:16]}: {size} bytes (announced {a.size})")
    try:
        with DeltaReader(path, expected_author=candidate.author) as reader:
            if reader.header.base_id != a.base_id:
                raise Rejected("unknown_base", f"delta {a.delta_id[:16]}: not the announced base")
            check_fits(reader, head, reader.header.base_id)
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
