"""What an aggregator lets into a round: pure checks of announced deltas.

:func:`rank_candidates` orders one delta per author among those announced
against the head and its recent ancestors, in an order no author can choose;
:func:`inspect_delta` opens one fetched ``.msd`` and checks it end to end
(signature, author, base, layout, finite values) while measuring its norm;
:func:`screen_norms` holds each norm against the round's median, so that one
delta scaled up a hundred times cannot drag the merge; :func:`weigh_round`
adds, where the aggregator has evaluation data, what each delta bought on it.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from aggregator.methods import lower_weighted_median
from aggregator.reputation import newcomer_factor
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
from protocol.swarm_config import SwarmConfig


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


def rank_candidates(
    announced: list[Candidate], beacon: str, established: Collection[str] = ()
) -> list[Candidate]:
    """One delta per author (the freshest, then the first in rank), freshest first, then
    those of ``established`` authors (aggregator.reputation), then in an order drawn from
    ``beacon`` (the head's base id).

    The order is the same for every aggregator that knows the same reputations, and a
    delta's place in it is the hash of the beacon and its id: an author can grind ids for a
    small one only after the head appeared, and a slot goes to a delta only once it has
    arrived and passed inspection (the aggregator's admission), so made-up ids cannot crowd
    honest deltas out, nor can a crowd of new keys take the slots of the volunteers the
    swarm knows. A delta id announced by several authors stays under each: inspection
    passes only its signer's.
    """

    def order(c: Candidate) -> tuple[int, bool, bytes, str]:  # total: no input order leaks
        draw = hashlib.sha256(f"{beacon}:{c.delta_id}".encode()).digest()
        return (c.age, c.author not in established, draw, c.author)

    best: dict[str, Candidate] = {}
    for c in sorted(announced, key=order):
        best.setdefault(c.author, c)
    return sorted(best.values(), key=order)


@dataclass(frozen=True)
class Admitted:
    """A candidate that arrived and passed inspection: its norm, and its held-out loss gain
    on the parent where the aggregator has evaluation data."""

    candidate: Candidate
    norm: float
    gain: float | None = None


def fill_slots(
    ranked: list[Candidate],
    check: Callable[[list[Candidate]], list[Admitted | None]],
    slots: int,
    parallel: int,
    on_copy: Callable[[Candidate], None],
) -> list[Admitted]:
    """Candidates in rank order that ``check`` admits, until ``slots`` have passed.

    ``check`` takes a batch (at least ``parallel`` candidates, or as many as slots are
    left, whose delta ids differ) and returns each one's admission, or None. A slot goes
    only to a delta that passed: made-up, broken or harmful ones take nothing from the
    honest ones behind them. A delta id admitted twice (a copy of another author's
    announcement) goes to ``on_copy``.
    """
    admitted: list[Admitted] = []
    signed: set[str] = set()
    pending = list(ranked)
    while pending and len(admitted) < slots:
        batch = first_distinct(pending, max(parallel, slots - len(admitted)))
        pending = [c for c in pending if c not in batch]
        for c, result in zip(batch, check(batch), strict=True):
            if result is None or len(admitted) == slots:
                continue
            if c.delta_id in signed:
                on_copy(c)
                continue
            signed.add(c.delta_id)
            admitted.append(result)
    return admitted


def first_distinct(ranked: list[Candidate], n: int) -> list[Candidate]:
    """The first ``n`` candidates in rank order whose delta ids differ (two announcements of
    one id are never checked at once: the second waits for the next batch)."""
    batch: list[Candidate] = []
    ids: set[str] = set()
    for c in ranked:
        if len(batch) == n:
            break
        if c.delta_id not in ids:
            batch.append(c)
            ids.add(c.delta_id)
    return batch


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


def screen_norms(
    norms: dict[str, float],
    factor: float,
    action: str,
    reference: dict[str, float] | None = None,
) -> dict[str, float | None]:
    """Delta id -> weight multiplier (1.0, or less when clipped), or None when rejected.

    The bound is ``factor`` times the median norm of the round (weighted by ``reference``
    where given); ``clip`` scales a delta above it down to the bound, ``reject`` drops it.
    """
    if not norms:
        return {}
    median = weighted_median(norms, reference) if reference else statistics.median(norms.values())
    bound = factor * median
    out: dict[str, float | None] = {}
    for delta_id, norm in norms.items():
        if norm <= bound:
            out[delta_id] = 1.0
        else:  # clipping to a zero bound (most deltas empty) leaves nothing: a rejection
            out[delta_id] = bound / norm if action == "clip" and bound > 0 else None
    return out


def weighted_median(values: dict[str, float], weights: dict[str, float]) -> float:
    """The lower weighted median of ``values`` (keys without a positive weight do not count;
    none with one: the plain median)."""
    found = lower_weighted_median((v, weights.get(k, 0.0)) for k, v in values.items())
    return statistics.median(values.values()) if found is None else found


def bought_something(gain: float) -> bool:
    """Whether a delta's held-out loss gain counts: finite and above zero."""
    return math.isfinite(gain) and gain > 0


def admit_scored(
    passed: list[tuple[Candidate, float]],
    gains: dict[str, float],
    refuse: Callable[[Candidate, float], None],
) -> dict[str, Admitted]:
    """Delta id -> admission, for the inspected candidates (with their norms) whose gain, where
    they were scored, bought something; ``refuse`` gets each other one and its gain."""
    out: dict[str, Admitted] = {}
    for c, norm in passed:
        gain = gains.get(c.delta_id)
        if gain is not None and not bought_something(gain):
            refuse(c, gain)
        else:
            out[c.delta_id] = Admitted(c, norm, gain)
    return out


def gain_weights(gains: dict[str, float], share: float) -> dict[str, float | None]:
    """Delta id -> merge weight from its held-out loss gain: full weight for a gain of at
    least ``share`` times the round's best, less in proportion below it, None (refused)
    for no gain at all.

    A crowd of deltas that buy next to nothing (near-empty, or a sliver of honest work)
    then weighs next to nothing, and cannot dilute the deltas that carry the round; the
    best gain is the reference because no author can raise it without doing the work.
    """
    best = max((g for g in gains.values() if math.isfinite(g)), default=0.0)
    out: dict[str, float | None] = {}
    for delta_id, gain in gains.items():
        if not bought_something(gain):
            out[delta_id] = None
        else:
            out[delta_id] = min(1.0, gain / (share * best))
    return out


@dataclass(frozen=True)
class Weighed:
    """A round's verdict on one admitted delta: its merge weight, or why it is left out."""

    weight: float | None
    reason: str | None = None  # one of DELTA_REJECT_REASONS when weight is None
    note: str = ""


def weigh_round(
    norms: dict[str, float],
    gains: dict[str, float] | None,
    *,
    norm_factor: float,
    norm_action: str,
    gain_share: float,
    newcomers: set[str] = frozenset(),
    newcomer_share: float = 1.0,
) -> dict[str, Weighed]:
    """Every admitted delta's weight in this round's merge (before staleness discounts).

    Without evaluation data (``gains`` None) the weight is the norm screen's. With it, a
    delta that did not lower the held-out loss is out, and the others weigh by
    :func:`gain_weights`. The deltas in ``newcomers`` (by authors none of whose deltas was
    merged yet) together weigh at most ``newcomer_share`` of the round when established
    authors take part (aggregator.reputation). The norm screen's median counts deltas by
    those weights, so that a crowd of near-empty or new deltas cannot drag it down and get
    honest ones refused.
    """
    by_gain = gain_weights(gains, gain_share) if gains is not None else None
    passed = {d: n for d, n in norms.items() if by_gain is None or by_gain.get(d) is not None}
    base = {d: by_gain[d] if by_gain is not None else 1.0 for d in passed}
    capped = newcomer_factor(base, newcomers & set(passed), newcomer_share)
    reference = {d: w * (capped if d in newcomers else 1.0) for d, w in base.items()}
    weighted = by_gain is not None or capped < 1.0
    screened = screen_norms(passed, norm_factor, norm_action, reference if weighted else None)
    out: dict[str, Weighed] = {}
    for delta_id, norm in norms.items():
        if delta_id not in passed:
            out[delta_id] = Weighed(None, "no_gain", f"held-out loss gain {gains[delta_id]:.4g}")
        elif screened[delta_id] is None:
            out[delta_id] = Weighed(None, "norm", f"norm {norm:.4g} is far above the round's")
        else:
            out[delta_id] = Weighed(screened[delta_id] * reference[delta_id])
    return out


def weigh_admitted(
    admitted: list[Admitted], config: SwarmConfig, *, scored: bool, newcomers: set[str]
) -> dict[str, Weighed]:
    """:func:`weigh_round` for a round's admitted deltas under the swarm's rules (``scored``:
    the aggregator has evaluation data, so their gains count)."""
    return weigh_round(
        {a.candidate.delta_id: a.norm for a in admitted},
        {a.candidate.delta_id: a.gain for a in admitted} if scored else None,
        norm_factor=config.norm_factor,
        norm_action=config.norm_action,
        gain_share=config.gain_share,
        newcomers=newcomers,
        newcomer_share=config.newcomer_share,
    )
