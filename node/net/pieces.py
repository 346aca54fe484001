"""The piece policy of the blob exchange, as pure functions: which pieces a provider offers,
when it cuts a run short, which run a fetcher asks a source for, and whether it may ask
before the current run is in. The serving and fetching code (node.net.blobs) calls these,
and so does scripts/simulate_swarm.py; tests/unit/test_pieces.py pins them without a network.

Bitmaps (``have``) are little-endian per byte: piece i is bit i % 8 of byte i // 8.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Protocol

SHORT_RUN = 4  # pieces per request while others trade the blob: pieces spread quickly
LONG_RUN = 64  # pieces per request otherwise: fewer round trips
# Without a new piece this long, complete sources serve anything. A 1 MiB piece from a
# 5 Mbit/s uplink serving 4 runs takes about 7 s: a shorter wait took slow traders for stalled
# ones and had the origin send what they were delivering (scripts/simulate_swarm.py).
STALL_SECONDS = 10.0
IDLE_SOURCE_SECONDS = 15.0  # a source that sent nothing this long makes way for another
IDLE_POLL_SECONDS = 0.2  # idle_wait's first wait ...
IDLE_POLL_MAX_SECONDS = 1.6  # ... and its longest


class Source(Protocol):
    """What the policy knows of a source: its offer and how busy it says it is."""

    have: bytes  # the pieces it offers
    complete: bool  # it holds the whole blob
    served: int | None  # bytes it says it has served to everyone (None: not asked yet)
    bad_until: float  # monotonic time until which it is not asked
    useful_at: float  # monotonic time of its last piece (or of when it was taken on)


def trades(source: Source) -> bool:
    """Whether ``source`` is a trader: it answered (a provider record alone costs an attacker
    a free key and names nobody real) and holds part of the blob, not all of it."""
    return not source.complete and source.served is not None


def held(index: int, have: bytes) -> bool:
    """Whether bitmap ``have`` has piece ``index``."""
    return index // 8 < len(have) and bool(have[index // 8] >> (index % 8) & 1)


def full_bitmap(count: int) -> bytes:
    return bytes([255] * ((count + 7) // 8))


def superseed_offer(sent: Sequence[int] | None, count: int, asker_has: bytes) -> bytes:
    """Super-seeding: what a complete provider offers an asker. Of the pieces the asker
    lacks, those this provider has sent least often; everything when it has sent none of
    this blob yet (``sent`` None) or the asker lacks nothing."""
    missing = _indices(((1 << count) - 1) & ~bits(asker_has))
    if sent is None or not missing:
        return full_bitmap(count)
    least = min(sent[i] for i in missing)
    offer = 0
    for i in missing:
        if sent[i] == least:
            offer |= 1 << i
    return offer.to_bytes((count + 7) // 8, "little")


def keep_sending(sent: int, *, complete: bool, other_sharers: int, copy_out: bool) -> bool:
    """Whether a provider goes on with a run before its ``sent``-th piece (0-based).

    A partial holder always finishes its run. A complete one cuts a run at SHORT_RUN
    pieces once other fetchers that share what they get fetch the blob from it too
    (they will trade pieces: a long run would have it send the whole blob to each), or
    once it has sent a whole copy out and the asker shares (it finds the rest among
    the others).
    """
    return not complete or sent < SHORT_RUN or not (other_sharers or copy_out)


def bits(have: bytes) -> int:
    """Bitmap ``have`` as an int: piece i is bit i."""
    return int.from_bytes(have, "little")


def wanted(have: bytes, in_flight: Iterable[int]) -> int:
    """The pieces a fetcher wants (bit i: piece i): those it lacks and has not asked for."""
    mask = ~bits(have)
    for index in in_flight:
        mask &= ~(1 << index)
    return mask


def _indices(mask: int) -> list[int]:
    """The pieces whose bits ``mask`` sets, in order."""
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


def _rarest(candidates: int, haves: list[int]) -> int:
    """The candidates held by the fewest of ``haves``.

    Bit-sliced counting over the candidates' bits alone: first whether each is held by
    none, one or two (the rarest usually are, and fetchers call this for every run), then
    ``at_least[k]``, the pieces k or more of ``haves`` hold, exact up to a level that
    doubles until a level has a candidate."""
    haves = [h for have in haves if (h := have & candidates)]
    one = two = three = 0
    for have in haves:
        three |= two & have
        two |= one & have
        one |= have
    for exactly in (candidates & ~one, candidates & one & ~two, candidates & two & ~three):
        if exactly:
            return exactly
    top = 4
    while True:
        top = min(top, len(haves))
        at_least = [-1] + [0] * (top + 1)
        for have in haves:
            for k in range(top + 1, 0, -1):
                at_least[k] |= at_least[k - 1] & have
        for k in range(top + 1):
            if exactly := candidates & at_least[k] & ~at_least[k + 1]:
                return exactly
        top *= 2


def pick_run(
    source: Source,
    sources: Sequence[Source],
    *,
    count: int,
    blob_size: int,
    wanted: int,
    now: float,
    last_piece: float,
    rng: random.Random | None = None,
    waiting: bool = False,
) -> list[int]:
    """Up to SHORT_RUN (LONG_RUN when nobody trades the blob) consecutive pieces to ask
    ``source`` for, among those ``wanted`` (bit i: piece i is missing here and not in
    flight) that it offers: rarest first over ``sources`` (``source`` among them).

    A source holding the whole blob is asked only for pieces no trader (:func:`trades`)
    has, only while nothing is on its way from traders (not ``waiting``), and only if it has
    not served half a copy more than the least busy complete source (unless no piece came
    for STALL_SECONDS): the origin sends each piece about once, later fetchers spare it,
    and the fetchers trade the rest among themselves.
    """
    rng = rng or random
    usable = [s for s in sources if s.bad_until <= now]
    sharers = [s for s in usable if trades(s)]
    completes = sorted(
        (s for s in usable if s.complete and s.served is not None), key=lambda s: s.served
    )
    stalled = now - last_piece >= STALL_SECONDS
    least = completes[0].served if completes else 0
    spared = [s for s in completes[1:] if s.served > least + blob_size // 2]
    if not stalled and any(s is source for s in spared):
        return []
    if source.complete and not stalled and waiting and sharers:
        return []  # busy with traders: the origin is kept for when they have nothing
    haves = [bits(s.have) for s in sources]
    candidates = wanted & bits(source.have) & ((1 << count) - 1)
    if source.complete and not stalled:
        for s, have in zip(sources, haves, strict=True):
            if trades(s) and s.bad_until <= now:
                candidates &= ~have
    if not candidates:
        return []
    rarest = _rarest(candidates, haves)
    longest = SHORT_RUN if sharers else LONG_RUN
    # A random rarest piece (fetchers asking at once go different ways), moved back onto a
    # grid of ``longest`` laid from the start of its stretch of rarest pieces: runs then take
    # whole blocks, and no short remnants are left to cost a round trip each.
    start = rng.choice(_indices(rarest))
    stretch = start
    while stretch > 0 and rarest >> (stretch - 1) & 1:
        stretch -= 1
    start -= (start - stretch) % longest
    run = [start]
    while len(run) < longest and rarest >> (run[-1] + 1) & 1:
        run.append(run[-1] + 1)
    return run


def spare_complete(in_flight: bool, providers: int, places: int) -> bool:
    """Whether a fetch keeps complete sources (the origin) for what traders cannot give, the
    ``waiting`` of :func:`pick_run`: while pieces are on their way from traders, in a swarm
    with more providers than the fetch has places for sources. In a smaller one the origin's
    spare upload is what makes the fetch fast, and its copies stay few anyway."""
    return in_flight and providers > places


def gives_way(source: Source, now: float) -> bool:
    """Whether a fetch whose places are all taken drops ``source`` for a provider it has not
    tried: the source sent no piece for IDLE_SOURCE_SECONDS (busy, slow, or holding nothing
    wanted). Without it, everyone who starts a fetch at once (a new head) keeps the first few
    providers for good, and those few refuse most of them as busy while the rest idle."""
    return now - source.useful_at >= IDLE_SOURCE_SECONDS


def making_way(sources: Iterable[Source], untried: int, now: float) -> list[Source]:
    """The sources a fetch whose places are all taken drops for ``untried`` providers not
    among them: those that give way, no more than there are providers to take their place."""
    return [s for s in sources if gives_way(s, now)][:untried]


def retry_after(backoff: float, failures: int, counted: bool = True) -> float:
    """Seconds a fetch leaves a source alone after a failure: ``backoff`` after a refusal
    that does not count (busy), else ``backoff`` doubled for each failure so far, up to 32
    times."""
    return backoff * (2 ** min(failures, 5) if counted else 1)


def may_ask_ahead(source: Source, sources: Sequence[Source]) -> bool:
    """Whether ``source`` may be asked for a run before the current one is in: not a
    complete source while others trade the blob, whose pieces are best chosen as late as
    possible, from what the traders hold by then (so the origin sends each about once).
    Providers that have not answered yet are not traders: a flood of made-up records would
    otherwise cut the origin down to short runs, each on a fresh stream."""
    return not source.complete or not any(trades(s) for s in sources)


def idle_wait(polls: int) -> float:
    """Seconds a fetch's worker waits before asking its source for an offer again, after
    ``polls`` answers in a row (1 or more) that offered nothing it wants.

    A worker learns of a source's new pieces only by asking again. Asking every
    IDLE_POLL_SECONDS for good made every provider of a large swarm answer a Have request
    from each of its idle fetchers five times a second; backing off keeps a worker quick
    after a piece it just missed and quiet while its source has nothing for it. In
    scripts/simulate_swarm.py it also had the origin send fewer copies (at 300 peers 1.79
    against 1.99, at 1,000 2.21 against 2.28): an idle worker whose wait has grown asks
    its complete sources less often too."""
    return min(IDLE_POLL_SECONDS * 2 ** min(max(polls, 1) - 1, 16), IDLE_POLL_MAX_SECONDS)
