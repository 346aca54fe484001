#!/usr/bin/env python
"""A discrete-event simulation of the blob exchange and the round cycle, from 8 peers to
10,000, driven by the daemons' own piece policy.

Every decision a real fetcher or provider takes about pieces is the real one: the run to ask a
source for (``pick_run``), whether to ask for the next run before this one is in
(``may_ask_ahead``), how long a worker whose source has nothing for it waits before asking
again (``idle_wait``), what a complete provider offers (``superseed_offer``, super-seeding)
and when it cuts a run short (``keep_sending``), all from node/net/pieces.py, which
node/net/blobs calls too; so do the constants of node.net.blobs.fetch (failures and
back-offs, how often providers are looked for and their records read again, sources per
fetch), the serving limits (``ServeLimits``: runs served at once, per peer), the piece size,
where a blob's provider records stand and which of them a reader reads
(node.net.blobs.providers: a first key, then overflow shards), and the cap on authors under
one DHT key (the first ``MAX_AUTHORS_PER_KEY`` a key). What is modelled instead of run:
links and time.

Model (assumptions, stated once):
- Uplinks: home peers log-uniform in 5-50 Mbit/s, downlinks 5x their uplink; 1% of the
  peers (at least one) in a datacenter at 1 Gbit/s both ways. A patch's origin (the
  aggregator) is a datacenter peer; a delta's origin is a home volunteer.
- A link's capacity is shared equally by the pieces in flight on it when each piece starts
  (a piece keeps its rate); a peer's one-way latency is uniform in 5-50 ms, a round trip
  the sum of both ends' and a Have request one round trip.
- Peers see a new head within a tick (uniform 0-2 s) and start fetching; they find
  providers from the records (first come, capped as the DHT caps each key) and the
  manifest from the first that answers. Reading records takes no time.
- Churn: each peer stays online for an exponential time (mean ``--session`` minutes) and
  comes back after an exponential time (mean ``--away`` minutes), resuming with the pieces
  it had; its provider records age out after PROVIDER_TTL; a dial to a departed peer fails
  after DEAD_DIAL_SECONDS. The patch's origin stays, and the delta phase has no churn.
- A fetcher asks a source's offer again before choosing each run (unless it asked within
  HAVE_REUSE_SECONDS), except the run it asks for ahead, which is chosen from what it
  knows as half of the current run has landed (the real fetcher's Have round trip then
  overlaps the rest of the run).

A round: K = min(volunteers, max_deltas) volunteers publish a delta at once; two aggregators
and two seeds fetch them all; the aggregator merges (``--merge-seconds`` a + b*K, from
scripts/bench_aggregate.py); the patch then spreads from the aggregator to every peer.

    .venv/bin/python scripts/simulate_swarm.py --peers 8 100 1000 --json small.json  # ~4 min
    .venv/bin/python scripts/simulate_swarm.py --peers 10000 --horizon 900 --json 10k.json  # 75+ CPU-min
    .venv/bin/python scripts/simulate_swarm.py --load small.json 10k.json --plot docs/scale.png
    .venv/bin/python scripts/simulate_swarm.py --calibrate           # against bench_transfer

``--json FILE`` writes ``{"model": {...}, "runs": {str(N): {"patch": {"t50", "t90",
"t100", "origin_copies", ...}, "delta": {"k", "collect_s", "origin_copies", ...},
"origin_copies": float, "merge_s": float, "round_overhead_s": float}}}``; times are
seconds from the head's publication (None: not reached within ``--horizon``).
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.net import pieces as policy  # noqa: E402 - the daemons' own piece policy
from node.net.blobs.fetch import (  # noqa: E402 - after the repository is on the path
    HAVE_REUSE_SECONDS,
    MAX_FAILURES,
    MAX_SOURCES,
    PROVIDER_LOOK_SECONDS,
    RECORDS_REREAD_SECONDS,
    ROTATE_SECONDS,
)
from node.net.blobs.providers import (  # noqa: E402
    PROVIDER_TTL,
    crowded,
    first_key_share,
    overflow_shards,
)
from node.net.blobs.serve import ServeLimits  # noqa: E402
from protocol.ids import BLOB_PIECE  # noqa: E402
from protocol.records import MAX_AUTHORS_PER_KEY, PROVIDER_SHARDS, provider_shard  # noqa: E402

MBIT = 1e6 / 8  # bytes per second in a Mbit/s
TICK_SECONDS = 2.0  # a daemon's housekeeping tick: it sees a new head within one
DEAD_DIAL_SECONDS = 3.0  # a dial to a peer that left fails after this long
WORKER_RESTART_SECONDS = 0.05  # the download loop's tick: a stopped worker is started again
PATCH_BYTES = 270_000_000  # a SmolLM2-135M base in bf16 (a patch as large as a snapshot)
DELTA_BYTES = 20_000_000  # a SmolLM2-135M delta at 0.149 bytes a parameter (DARE p=0.9)
AGGREGATORS, SEEDS = 2, 2  # who fetches every delta
PROGRESS_SECONDS = 30.0  # simulated time between progress lines (runs over a few seconds)

Process = Generator[float, None, None]


class Clock:
    """Events in time order; a process is a generator that yields how long it waits."""

    def __init__(self) -> None:
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable, tuple]] = []
        self._seq = 0

    def at(self, delay: float, fn: Callable, *args) -> None:
        heapq.heappush(self._queue, (self.now + delay, self._seq, fn, args))
        self._seq += 1

    def start(self, process: Process, delay: float = 0.0) -> None:
        self.at(delay, self._resume, process)

    def _resume(self, process: Process) -> None:
        wait = next(process, None)
        if wait is not None:
            self.at(wait, self._resume, process)

    @property
    def pending(self) -> bool:
        return bool(self._queue)

    def run(self, until: float, done: Callable[[], bool]) -> None:
        while self._queue and not done() and self._queue[0][0] <= until:
            when, _, fn, args = heapq.heappop(self._queue)
            self.now = when
            fn(*args)


@dataclass(eq=False)
class Peer:
    name: int
    up: float  # bytes/s
    down: float
    latency: float  # one way, seconds
    online: bool = True
    have: dict[str, bytearray] = field(default_factory=dict)
    pieces: Counter = field(default_factory=Counter)  # pieces held, per blob
    sent: dict[str, list[int]] = field(default_factory=dict)  # per piece, when complete
    served: int = 0  # bytes sent of every blob (what Have answers)
    blob_out: Counter = field(default_factory=Counter)
    active: int = 0  # runs being served
    per_peer: Counter = field(default_factory=Counter)
    sharing: Counter = field(default_factory=Counter)  # runs served to sharers, per blob
    out_flight: int = 0  # pieces going out now
    in_flight: int = 0  # pieces coming in now

    def __post_init__(self) -> None:
        self.shard = provider_shard(f"peer-{self.name}")  # where its provider records stand


@dataclass(eq=False)
class Src:
    """A fetch's view of one source: the attributes node.net.pieces.Source names."""

    peer: Peer
    have: bytes = b""
    complete: bool = False
    served: int | None = None
    bad_until: float = 0.0
    failures: int = 0
    asked_at: float = -math.inf
    useful_at: float = 0.0  # its last piece, or when it was taken on
    working: bool = False


@dataclass(eq=False)
class Blob:
    id: str
    size: int
    origin: Peer
    audience: list[Peer]  # who fetches it
    # provider records under the first key and by overflow shard, first come, as many a key
    # as the DHT keeps under one
    first: list[Peer] = field(default_factory=list)
    shards: list[list[Peer]] = field(default_factory=lambda: [[] for _ in range(PROVIDER_SHARDS)])
    done_at: list[float] = field(default_factory=list)  # when each fetcher completed

    def __post_init__(self) -> None:
        self.wanted_by = set(self.audience)  # who fetches it, to look up

    @property
    def count(self) -> int:
        return max(1, -(-self.size // BLOB_PIECE))

    def piece_size(self, index: int) -> int:
        return min(BLOB_PIECE, self.size - index * BLOB_PIECE)

    def providers(self, reader: Peer, rng: random.Random) -> list[Peer]:
        """What node.net.blobs.providers.providers gives ``reader``: the first key's, and once
        it is crowded a random share of them and those of a few overflow keys."""
        found = self.first
        if crowded(len(found)):
            found = rng.sample(found, first_key_share(len(found)))
            found += [p for shard in overflow_shards(rng) for p in self.shards[shard]]
        return [p for p in found if p is not reader]

    def provide(self, peer: Peer, cap: int) -> None:
        """``peer`` announces itself (node.net.blobs.providers.announce): under the first key
        while it is not crowded, under its overflow key after; each key keeps ``cap``."""
        shard = self.shards[peer.shard]
        if peer in self.first or peer in shard:
            return
        key = self.first if not crowded(len(self.first)) else shard
        if len(key) >= cap and key is self.first:
            key = shard  # the DHT refused it there
        if len(key) < cap:
            key.append(peer)

    def unprovide(self, peer: Peer) -> None:
        """``peer``'s record aged out."""
        for key in (self.first, self.shards[peer.shard]):
            if peer in key:
                key.remove(peer)


class Fetch:
    """One peer's download of one blob (node.net.blobs.fetch.Fetcher's loop, in events)."""

    def __init__(self, sim: Simulation, peer: Peer, blob: Blob) -> None:
        self.sim, self.peer, self.blob = sim, peer, blob
        self.sources: dict[Peer, Src] = {}
        self.banned: set[Peer] = set()
        self.answered: set[Peer] = set()
        self.in_flight: set[int] = set()
        self.last_piece = sim.clock.now
        self.alive = True  # until the peer leaves (it starts a new fetch when back)
        self.rotated_at = sim.clock.now
        self.records: list[Peer] = []  # providers as last read, and when
        self.records_at = -math.inf
        self.have = peer.have.setdefault(blob.id, bytearray((blob.count + 7) // 8))

    @property
    def complete(self) -> bool:
        return self.peer.pieces[self.blob.id] >= self.blob.count

    @property
    def going(self) -> bool:
        return self.alive and not self.complete

    def main(self) -> Process:
        """Find the manifest (the first live provider's answer), then look for more providers
        every PROVIDER_LOOK_SECONDS while there is room, a worker on each."""
        while self.going:
            if len(self.sources) >= MAX_SOURCES:
                self._rotate()
            if len(self.sources) < MAX_SOURCES:
                self._refresh()
                if not self.answered and self.sources:
                    live = [s for s in self.sources.values() if s.peer.online]
                    for s in list(self.sources.values()):
                        if not s.peer.online:  # never answered: one failed dial, then banned
                            self._ban(s)
                    yield min(
                        (self.sim.rtt(self.peer, s.peer) for s in live), default=DEAD_DIAL_SECONDS
                    )
                    self.answered.update(s.peer for s in live)
                    continue
            for src in list(self.sources.values()):  # new ones, and any a failure ended
                self._restart(src)
            yield PROVIDER_LOOK_SECONDS

    def _restart(self, src: Src) -> None:
        ready = src.bad_until <= self.sim.clock.now and not src.working
        if ready and self.going and self.sources.get(src.peer) is src:
            src.working = True
            self.sim.clock.start(self.work(src))

    def _fresh(self) -> list[Peer]:
        """Providers not among the sources, in random order (records are read shuffled); the
        records are read again after RECORDS_REREAD_SECONDS, or when none is left unbanned."""
        now = self.sim.clock.now
        stale = now - self.records_at >= RECORDS_REREAD_SECONDS
        if stale or all(p in self.banned for p in self.records):
            self.records = self.blob.providers(self.peer, self.sim.rng)
            self.records_at = now
        pool = [p for p in self.records if p not in self.banned and p not in self.sources]
        return self.sim.rng.sample(pool, min(MAX_SOURCES, len(pool)))

    def _refresh(self, fresh: list[Peer] | None = None) -> None:
        for p in (self._fresh() if fresh is None else fresh)[: MAX_SOURCES - len(self.sources)]:
            self.sources[p] = Src(p, useful_at=self.sim.clock.now)

    def _rotate(self) -> None:
        """Fetcher._refresh_sources when full: idle sources make way for untried providers."""
        now = self.sim.clock.now
        if now - self.rotated_at < ROTATE_SECONDS:
            return
        self.rotated_at = now
        fresh = self._fresh()
        for src in policy.making_way(self.sources.values(), len(fresh), now):
            del self.sources[src.peer]
        self._refresh(fresh)

    def _ban(self, src: Src) -> None:
        self.banned.add(src.peer)
        self.sources.pop(src.peer, None)

    def _fail(self, src: Src, backoff: float, count: bool = True) -> None:
        if count:
            src.failures += 1
            if src.failures >= MAX_FAILURES:
                self._ban(src)
                return
        src.bad_until = self.sim.clock.now + policy.retry_after(backoff, src.failures, count)

    def _ask_have(self, src: Src) -> None:
        """What the source answers to Have (its offer; super-seeding when complete)."""
        s, blob = src.peer, self.blob
        src.complete = s.pieces[blob.id] >= blob.count
        src.have = (
            policy.superseed_offer(s.sent.get(blob.id), blob.count, bytes(self.have))
            if src.complete
            else bytes(s.have.get(blob.id, b""))
        )
        src.served = s.served
        src.asked_at = self.sim.clock.now
        self.answered.add(s)

    def _pick(self, src: Src) -> list[int]:
        run = policy.pick_run(
            src,
            list(self.sources.values()),
            count=self.blob.count,
            blob_size=self.blob.size,
            wanted=policy.wanted(self.have, self.in_flight),
            waiting=policy.spare_complete(bool(self.in_flight), len(self.records), MAX_SOURCES),
            now=self.sim.clock.now,
            last_piece=self.last_piece,
            rng=self.sim.rng,
        )
        self.in_flight.update(run)
        return run

    def work(self, src: Src) -> Process:
        ahead: list[int] = []  # the run asked for ahead, if one is
        try:
            yield from self._work(src, ahead)
        finally:
            self.in_flight.difference_update(ahead)
            src.working = False
            if self.going and self.sources.get(src.peer) is src:  # the download loop's tick
                wait = max(WORKER_RESTART_SECONDS, src.bad_until - self.sim.clock.now)
                self.sim.clock.at(wait, self._restart, src)

    def _work(self, src: Src, ahead: list[int]) -> Process:
        """Runs from one source on one stream, the next asked for at half of this one."""
        clock, s, blob, me = self.sim.clock, src.peer, self.blob, self.peer
        stream = False
        idle = 0  # answers in a row that offered nothing wanted
        while self.going and src.bad_until <= clock.now and self.sources.get(s) is src:
            if ahead:
                run = ahead.copy()
                ahead.clear()
            else:
                if clock.now - src.asked_at >= HAVE_REUSE_SECONDS:
                    yield self.sim.rtt(me, s) if s.online else DEAD_DIAL_SECONDS
                    if not s.online:
                        if s in self.answered:
                            self._fail(src, 5)
                        else:
                            self._ban(src)
                        return
                    self._ask_have(src)
                run = self._pick(src)
            if not run:
                idle += 1
                yield policy.idle_wait(idle)
                continue
            idle = 0
            if not stream:  # a stream opened, the run asked for
                yield self.sim.rtt(me, s)
                stream = True
            if not s.online:
                self.in_flight.difference_update(run)
                self._fail(src, 2)
                return
            limits = self.sim.limits
            if s.active >= limits.slots or s.per_peer[me] >= limits.per_peer:
                self.in_flight.difference_update(run)
                self._fail(src, 0.5, count=False)
                return
            whole, capped = True, False
            complete = s.pieces[blob.id] >= blob.count
            copy_out = complete and min(s.sent.get(blob.id, [0])) > 0
            s.active += 1
            s.per_peer[me] += 1
            s.sharing[blob.id] += 1
            try:
                for n, index in enumerate(run):
                    others = s.sharing[blob.id] - 1
                    if not policy.keep_sending(
                        n, complete=complete, other_sharers=others, copy_out=copy_out
                    ):
                        whole, capped = False, True
                        break
                    size = blob.piece_size(index)
                    s.out_flight += 1
                    me.in_flight += 1
                    self.sim.flight += 1
                    rate = min(
                        s.up / s.out_flight, me.down / me.in_flight, self.sim.cap / self.sim.flight
                    )
                    yield size / rate
                    s.out_flight -= 1
                    me.in_flight -= 1
                    self.sim.flight -= 1
                    if not (s.online and self.alive):
                        whole = False
                        self._fail(src, 2)
                        break
                    self.in_flight.discard(index)
                    src.useful_at = clock.now
                    self.sim.land(self, s, index, size, complete)
                    if (
                        not ahead
                        and 2 * (n + 1) >= len(run)
                        and n + 1 < len(run)
                        and policy.may_ask_ahead(src, list(self.sources.values()))
                    ):
                        self._ask_have(src)  # its round trip overlaps the rest of the run
                        ahead.extend(self._pick(src))
            finally:
                s.active -= 1
                s.per_peer[me] -= 1
                s.sharing[blob.id] -= 1
                self.in_flight.difference_update(run)  # those that landed are out already
            if capped:
                self._rotate() if len(self.sources) >= MAX_SOURCES else self._refresh()
            if not (whole and ahead):
                self.in_flight.difference_update(ahead)
                ahead.clear()
                stream = False


class Simulation:
    """Peers, their links and churn, and the blobs they fetch."""

    def __init__(
        self,
        peers: list[Peer],
        rng: random.Random,
        session: float,
        away: float,
        cap: float = math.inf,
        provider_cap: int = MAX_AUTHORS_PER_KEY,
    ) -> None:
        self.peers, self.rng = peers, rng
        self.cap = cap  # bytes/s of every transfer together (loopback: the CPUs), if bounded
        self.flight = 0  # pieces in flight anywhere
        self.clock = Clock()
        self.limits = ServeLimits()
        self.provider_cap = provider_cap  # provider records a shard of a blob's can have
        self.blobs: list[Blob] = []
        self.fetches: dict[tuple[Peer, str], Fetch] = {}
        self.session, self.away = session, away
        self.remaining = 0  # fetches of every blob not complete yet

    def rtt(self, a: Peer, b: Peer) -> float:
        return 2 * (a.latency + b.latency)

    def add_blob(self, blob: Blob) -> None:
        blob.origin.have[blob.id] = bytearray([255] * ((blob.count + 7) // 8))
        blob.origin.pieces[blob.id] = blob.count
        blob.origin.sent[blob.id] = [0] * blob.count
        blob.provide(blob.origin, self.provider_cap)
        self.blobs.append(blob)
        self.remaining += len(blob.audience)
        for peer in blob.audience:
            self.clock.at(self.rng.uniform(0, TICK_SECONDS), self._start_fetch, peer, blob)

    def _start_fetch(self, peer: Peer, blob: Blob) -> None:
        if peer.online and peer.pieces[blob.id] < blob.count:
            fetch = Fetch(self, peer, blob)
            self.fetches[(peer, blob.id)] = fetch
            self.clock.start(fetch.main())

    def land(self, fetch: Fetch, source: Peer, index: int, size: int, complete: bool) -> None:
        peer, blob = fetch.peer, fetch.blob
        source.served += size
        source.blob_out[blob.id] += size
        if complete:
            source.sent[blob.id][index] += 1
        if policy.held(index, fetch.have):
            return
        fetch.have[index // 8] |= 1 << (index % 8)
        fetch.last_piece = self.clock.now
        peer.pieces[blob.id] += 1
        if peer.pieces[blob.id] == 1:  # a partial holder announces itself
            blob.provide(peer, self.provider_cap)
        if peer.pieces[blob.id] == blob.count:
            peer.sent[blob.id] = [0] * blob.count
            blob.done_at.append(self.clock.now)
            self.remaining -= 1

    def start_churn(self) -> None:
        if self.session <= 0:
            return
        for peer in self.peers[1:]:  # the origin of the patch stays
            self.clock.at(self.rng.expovariate(1 / self.session), self._leave, peer)

    def _leave(self, peer: Peer) -> None:
        if any(peer is b.origin for b in self.blobs):
            return  # an origin that left would end the experiment, not measure it
        peer.online = False
        for blob in self.blobs:
            if fetch := self.fetches.get((peer, blob.id)):
                fetch.alive = False
            self.clock.at(PROVIDER_TTL, self._expire, peer, blob)
        self.clock.at(self.rng.expovariate(1 / self.away), self._return, peer)

    def _expire(self, peer: Peer, blob: Blob) -> None:
        if not peer.online:
            blob.unprovide(peer)

    def _return(self, peer: Peer) -> None:
        peer.online = True
        for blob in self.blobs:
            if peer.pieces[blob.id]:
                blob.provide(peer, self.provider_cap)
            if peer in blob.wanted_by:
                self._start_fetch(peer, blob)
        self.clock.at(self.rng.expovariate(1 / self.session), self._leave, peer)

    def run(self, horizon: float, progress: Callable[[float], None] = lambda now: None) -> None:
        """Until every fetch is complete or ``horizon``; ``progress`` is told the simulated
        time every PROGRESS_SECONDS of it (the events run in the same order either way)."""
        now = 0.0
        while now < horizon and self.remaining > 0 and self.clock.pending:
            now = min(now + PROGRESS_SECONDS, horizon)
            self.clock.run(now, lambda: self.remaining <= 0)
            progress(now)


def make_peers(n: int, rng: random.Random, datacenter_share: float = 0.01) -> list[Peer]:
    """``n`` peers, the first in a datacenter (the patch's origin), then 1% more."""
    peers = []
    dc = max(1, round(n * datacenter_share))
    for i in range(n):
        if i < dc:
            up = down = 1000 * MBIT
        else:
            up = math.exp(rng.uniform(math.log(5), math.log(50))) * MBIT
            down = 5 * up
        peers.append(Peer(i, up, down, rng.uniform(0.005, 0.05)))
    return peers


def percentile_times(done: Iterable[float], total: int) -> dict[str, float | None]:
    times = sorted(done)
    out = {}
    for share in (50, 90, 100):
        k = math.ceil(total * share / 100)
        out[f"t{share}"] = round(times[k - 1], 2) if 0 < k <= len(times) else None
    return out


def simulate_patch(n: int, args, seed: int) -> dict:
    rng = random.Random(seed)
    peers = make_peers(n, rng)
    sim = Simulation(peers, rng, args.session * 60, args.away * 60, provider_cap=args.provider_cap)
    blob = Blob("patch", args.patch_bytes, peers[0], peers[1:])
    sim.add_blob(blob)
    sim.start_churn()
    started = time.monotonic()

    def progress(now: float) -> None:  # a line on stderr now and then: large N take an hour
        wall = time.monotonic() - started
        if wall > 10:
            copies = blob.origin.blob_out[blob.id] / blob.size
            print(
                f"  N = {n}: {now:.0f} s simulated, {len(blob.done_at)} of {len(blob.audience)}"
                f" hold the patch, the origin sent {copies:.2f} copies ({wall / 60:.1f} min)",
                file=sys.stderr,
                flush=True,
            )

    sim.run(args.horizon, progress)
    return {
        **percentile_times(blob.done_at, len(blob.audience)),
        "origin_copies": round(blob.origin.blob_out[blob.id] / blob.size, 3),
        "holders": len(blob.done_at),
        "fetchers": len(blob.audience),
        "wall_s": round(time.monotonic() - started, 1),
    }


def simulate_deltas(n: int, args, seed: int) -> dict:
    """K volunteers' deltas, each fetched by the aggregators and seeds at once."""
    rng = random.Random(seed + 1)
    k = min(max(n - AGGREGATORS - SEEDS, 1), args.max_deltas)
    fetchers = make_peers(AGGREGATORS + SEEDS, rng, datacenter_share=1.0)
    volunteers = make_peers(k + 1, rng)[1:]  # home peers
    sim = Simulation(fetchers + volunteers, rng, 0, 1)
    blobs = [Blob(f"delta{i}", args.delta_bytes, v, fetchers) for i, v in enumerate(volunteers)]
    for blob in blobs:
        sim.add_blob(blob)
    sim.run(args.horizon)
    one = percentile_times(blobs[0].done_at, len(fetchers))
    collected = [max(b.done_at) if len(b.done_at) == len(fetchers) else math.inf for b in blobs]
    return {
        "k": k,
        **one,
        "origin_copies": round(
            sum(b.origin.blob_out[b.id] for b in blobs) / (k * args.delta_bytes), 3
        ),
        "collect_s": round(max(collected), 2),
        "aggregator_download_bytes": k * args.delta_bytes,
    }


def calibrate(args) -> None:
    """The 8-peer loopback run of scripts/bench_transfer.py, simulated: a 200 MB blob from
    one origin to 7 seeds, links set to the loopback rate that run measured."""
    # everyone pulling from the origin took 4.9-6.4 s for 7 copies: 286 MB/s at best
    rate = 7 * 200e6 / 4.9
    print("| 8 peers, 200 MB (bench_transfer) | all hold it, s | origin copies |")
    print("|---|---|---|")
    print("| measured on loopback, 2026-12-05 (docs/benchmarks.md) | 6.1 | 1.20 |")
    for what, cap in (("each link", math.inf), ("all links together (2 cores)", rate)):
        peers = [Peer(i, rate, rate, 0.0001) for i in range(8)]
        sim = Simulation(peers, random.Random(args.seed), 0, 1, cap=cap)
        blob = Blob("calibration", 200_000_000, peers[0], peers[1:])
        sim.add_blob(blob)
        sim.run(600)
        done = percentile_times(blob.done_at, 7)["t100"]
        copies = blob.origin.blob_out[blob.id] / blob.size
        print(f"| simulated, {rate / 1e6:.0f} MB/s on {what} | {done} | {copies:.2f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--peers", type=int, nargs="+", default=[8, 100, 1000, 10000], help="swarm sizes N"
    )
    parser.add_argument(
        "--patch-bytes", type=int, default=PATCH_BYTES, help="a base patch (SmolLM2-135M, bf16)"
    )
    parser.add_argument(
        "--delta-bytes", type=int, default=DELTA_BYTES, help="a volunteer's delta (SmolLM2)"
    )
    parser.add_argument("--max-deltas", type=int, default=16, help="the swarm config's")
    parser.add_argument(
        "--merge-seconds",
        type=float,
        nargs=2,
        default=[3.3, 2.7],
        metavar=("A", "B"),
        help="an aggregator's checks and merge of K deltas take a + b*K seconds (default: "
        "SmolLM2-135M on 2 cores, a least-squares fit of scripts/bench_aggregate.py's)",
    )
    parser.add_argument("--session", type=float, default=60.0, help="minutes online, mean")
    parser.add_argument("--away", type=float, default=20.0, help="minutes away, mean")
    parser.add_argument("--horizon", type=float, default=3600.0, help="simulated seconds")
    parser.add_argument("--seed", type=int, default=0, help="of every random draw")
    parser.add_argument(
        "--provider-cap",
        type=int,
        default=MAX_AUTHORS_PER_KEY,
        help="provider records each of a blob's keys (its first and its PROVIDER_SHARDS "
        "overflow keys) can have (default: the DHT's cap of authors under one key); another "
        "value is an experiment on what the cap costs",
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--plot", type=Path, help="time to 90%% and origin copies against N")
    parser.add_argument(
        "--calibrate", action="store_true", help="the 8-peer loopback run of bench_transfer.py"
    )
    parser.add_argument(
        "--load", type=Path, nargs="+", metavar="JSON", help="report runs saved by --json"
    )
    args = parser.parse_args(argv)
    if args.calibrate:
        calibrate(args)
        return 0
    runs: dict[str, dict] = {}
    model = {k: v for k, v in vars(args).items() if k not in ("json", "plot", "calibrate", "load")}
    for saved in args.load or []:  # runs saved by --json, reported again instead of simulated
        loaded = json.loads(saved.read_text())
        model = loaded["model"] | {"peers": [*map(int, runs), *map(int, loaded["runs"])]}
        runs |= loaded["runs"]
    for n in [] if args.load else args.peers:
        print(f"N = {n}: the patch ...", flush=True)
        patch = simulate_patch(n, args, args.seed)
        print(f"N = {n}: the deltas ...", flush=True)
        delta = simulate_deltas(n, args, args.seed)
        merge = args.merge_seconds[0] + args.merge_seconds[1] * delta["k"]
        runs[str(n)] = {
            "patch": patch,
            "delta": delta,
            "origin_copies": patch["origin_copies"],
            "merge_s": round(merge, 1),
            "round_overhead_s": round(delta["collect_s"] + merge + (patch["t90"] or math.inf), 1),
        }
        print(json.dumps(runs[str(n)]), flush=True)
    report(runs)
    if args.json:
        args.json.write_text(json.dumps({"model": model, "runs": runs}, indent=2) + "\n")
    if args.plot:
        plot(runs, args.plot)
    return 0


def report(runs: dict) -> None:
    print(
        "\n| peers | patch t50 s | t90 s | t100 s | origin copies | t90 / log2 N |"
        " delta K | delta t100 s | delta origin copies | collect K s | agg. download MB |"
        " round overhead s |"
    )
    print("|" + "---|" * 12)
    for n, r in runs.items():
        p, d = r["patch"], r["delta"]
        per_log = p["t90"] / math.log2(int(n)) if p["t90"] else None
        print(
            f"| {int(n):,} | {p['t50']} | {p['t90']} | {p['t100']} | {p['origin_copies']:.2f} |"
            f" {per_log and round(per_log, 2)} | {d['k']} | {d['t100']} | {d['origin_copies']:.2f} |"
            f" {d['collect_s']} | {d['aggregator_download_bytes'] / 1e6:.0f} |"
            f" {r['round_overhead_s']} |"
        )


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [int(n) for n in runs]
    fig, left = plt.subplots(figsize=(7, 4.2))
    left.set_xscale("log")
    left.plot(
        ns,
        [runs[str(n)]["patch"]["t90"] for n in ns],
        "o-",
        color="tab:blue",
        label="time to 90% (s)",
    )
    left.set_xlabel("peers (N)")
    left.set_ylabel("time for 90% of peers to hold a 270 MB patch (s)", color="tab:blue")
    right = left.twinx()
    right.plot(
        ns,
        [runs[str(n)]["origin_copies"] for n in ns],
        "s--",
        color="tab:red",
        label="origin copies",
    )
    right.axhline(2, color="tab:red", linestyle=":", linewidth=1, label="target: 2 copies")
    left.set_ylim(bottom=0)
    right.set_ylabel("copies uploaded by the origin", color="tab:red")
    right.set_ylim(0, max(2.5, max(runs[str(n)]["origin_copies"] for n in ns) * 1.1))
    left.set_title("Blob exchange by simulation (scripts/simulate_swarm.py)")
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    left.legend(handles=handles, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
