"""The blob exchange's piece policy (node.net.pieces), without a network."""

from __future__ import annotations

import random
from dataclasses import dataclass

from node.net.pieces import (
    IDLE_POLL_MAX_SECONDS,
    IDLE_POLL_SECONDS,
    IDLE_SOURCE_SECONDS,
    LONG_RUN,
    SHORT_RUN,
    STALL_SECONDS,
    _rarest,
    full_bitmap,
    gives_way,
    held,
    idle_wait,
    keep_sending,
    may_ask_ahead,
    pick_run,
    spare_complete,
    superseed_offer,
)

COUNT = 256
SIZE = COUNT * 1000


@dataclass
class Src:
    have: bytes
    complete: bool = False
    served: int | None = None
    bad_until: float = 0.0
    useful_at: float = 0.0


def bitmap(indices, count: int = COUNT) -> bytes:
    out = bytearray((count + 7) // 8)
    for i in indices:
        out[i // 8] |= 1 << (i % 8)
    return bytes(out)


def run_for(source, sources, *, wanted=-1, now=100.0, last_piece=99.0, seed=0):
    rng = random.Random(seed)
    return pick_run(
        source, sources, count=COUNT, blob_size=SIZE, wanted=wanted, now=now,
        last_piece=last_piece, rng=rng,
    )  # fmt: skip


def test_bitmaps_are_little_endian_per_byte():
    have = bitmap([0, 9, 255])
    assert [i for i in range(COUNT) if held(i, have)] == [0, 9, 255]
    assert not held(COUNT + 8, have)  # past the end: not held
    assert all(held(i, full_bitmap(COUNT)) for i in range(COUNT))


def test_superseeding_offers_the_asker_its_missing_pieces_sent_least_often():
    sent = [2] * COUNT
    sent[10] = sent[11] = sent[200] = 1
    offer = superseed_offer(sent, COUNT, asker_has=bitmap([11]))
    assert [i for i in range(COUNT) if held(i, offer)] == [10, 200]
    assert superseed_offer(None, COUNT, bitmap([])) == full_bitmap(COUNT)  # sent nothing yet
    everything = bitmap(range(COUNT))
    assert superseed_offer(sent, COUNT, everything) == full_bitmap(COUNT)


def test_a_complete_provider_cuts_runs_short_only_when_others_trade_or_a_copy_is_out():
    for n in range(3 * SHORT_RUN):
        assert keep_sending(n, complete=False, other_sharers=3, copy_out=True)  # partial
        assert keep_sending(n, complete=True, other_sharers=0, copy_out=False)
        cut = keep_sending(n, complete=True, other_sharers=1, copy_out=False)
        assert cut == (n < SHORT_RUN)
        assert keep_sending(n, complete=True, other_sharers=0, copy_out=True) == cut


def test_a_lone_complete_source_gets_long_runs_aligned_on_a_grid():
    origin = Src(full_bitmap(COUNT), complete=True, served=0)
    run = run_for(origin, [origin])
    assert len(run) == LONG_RUN and run[0] % LONG_RUN == 0
    assert run == list(range(run[0], run[0] + LONG_RUN))


def test_rarest_pieces_come_first_and_in_short_runs_while_others_trade():
    rare = set(range(40, 48))
    a = Src(bitmap(range(COUNT)), served=0)  # a partial holder of everything
    b = Src(bitmap(set(range(COUNT)) - rare), served=0)  # lacks the rare ones
    for seed in range(20):
        run = run_for(a, [a, b], seed=seed)
        assert set(run) <= rare and len(run) == SHORT_RUN and run[0] % SHORT_RUN == 0


def test_the_rarest_candidates_are_those_the_fewest_sources_hold_at_any_rarity():
    rng = random.Random(0)
    for _ in range(300):
        sources = rng.randint(1, 20)
        density = rng.random()
        haves = [sum(1 << i for i in range(64) if rng.random() < density) for _ in range(sources)]
        candidates = rng.getrandbits(64)
        counts = {i: sum(h >> i & 1 for h in haves) for i in range(64) if candidates >> i & 1}
        fewest = min(counts.values(), default=0)
        expected = sum(1 << i for i, n in counts.items() if n == fewest)
        assert _rarest(candidates, haves) == expected


def test_pieces_in_flight_or_held_are_not_asked_for_again():
    a = Src(bitmap(range(8)))
    assert run_for(a, [a], wanted=~0b1111) == [4, 5, 6, 7]
    assert run_for(a, [a], wanted=0) == []


def test_a_complete_source_is_asked_only_for_what_no_trader_holds_unless_stalled():
    origin = Src(full_bitmap(COUNT), complete=True, served=0)
    trader = Src(bitmap(range(0, COUNT - 4)), served=0)
    run = run_for(origin, [origin, trader])
    assert set(run) <= set(range(COUNT - 4, COUNT))
    trader.have = full_bitmap(COUNT)  # the traders hold everything between them
    assert run_for(origin, [origin, trader]) == []
    stalled = run_for(origin, [origin, trader], last_piece=100.0 - STALL_SECONDS)
    assert len(stalled) == SHORT_RUN  # but they stopped delivering: the origin serves


def test_a_complete_source_far_busier_than_another_is_spared_until_a_stall():
    idle = Src(full_bitmap(COUNT), complete=True, served=0)
    busy = Src(full_bitmap(COUNT), complete=True, served=SIZE)  # a whole copy more
    assert run_for(busy, [idle, busy]) == []
    assert run_for(idle, [idle, busy]) != []
    assert run_for(busy, [idle, busy], last_piece=100.0 - STALL_SECONDS) != []
    busy.bad_until = 1e9  # a source not being asked does not count as the least busy
    assert run_for(idle, [idle, busy]) != []


def test_only_traders_or_an_all_complete_swarm_are_asked_ahead():
    origin = Src(full_bitmap(COUNT), complete=True)
    other_origin = Src(full_bitmap(COUNT), complete=True)
    trader = Src(bitmap([1]), served=0)
    assert may_ask_ahead(trader, [origin, trader])
    assert not may_ask_ahead(origin, [origin, trader])
    assert may_ask_ahead(origin, [origin, other_origin])


def test_providers_that_have_not_answered_do_not_make_the_origin_a_trader_among_traders():
    # Made-up provider records cost a free key each: until one answers Have it is not a
    # trader, and the origin keeps its long runs, asked ahead on one stream.
    origin = Src(full_bitmap(COUNT), complete=True, served=0)
    unheard = [Src(b"") for _ in range(15)]
    assert len(run_for(origin, [origin, *unheard])) == LONG_RUN
    assert may_ask_ahead(origin, [origin, *unheard])
    unheard[0].served = 0  # one answered: a trader now
    assert len(run_for(origin, [origin, *unheard])) == SHORT_RUN
    assert not may_ask_ahead(origin, [origin, *unheard])


def test_a_source_that_sent_nothing_for_a_while_makes_way_for_an_untried_provider():
    source = Src(bitmap([1]), useful_at=100.0)  # taken on, or its last piece, at 100 s
    assert not gives_way(source, now=100.0 + IDLE_SOURCE_SECONDS - 0.1)
    assert gives_way(source, now=100.0 + IDLE_SOURCE_SECONDS)


def test_a_source_with_nothing_wanted_is_asked_again_ever_later_up_to_a_cap():
    waits = [idle_wait(polls) for polls in range(1, 40)]
    assert waits[0] == IDLE_POLL_SECONDS  # quick after a piece just missed
    assert waits[1] == 2 * IDLE_POLL_SECONDS
    assert waits == sorted(waits)
    assert waits[-1] == IDLE_POLL_MAX_SECONDS > IDLE_POLL_SECONDS


def test_the_origin_is_asked_only_while_nothing_is_on_its_way_from_traders():
    origin = Src(full_bitmap(COUNT), complete=True, served=0)
    trader = Src(bitmap(range(COUNT // 2)), served=0)  # the other half is only the origin's

    def ask(sources, *, waiting, last_piece=99.0):
        return pick_run(
            origin, sources, count=COUNT, blob_size=SIZE, wanted=-1, now=100.0,
            last_piece=last_piece, waiting=waiting, rng=random.Random(0),
        )  # fmt: skip

    assert ask([origin, trader], waiting=False) != []
    assert ask([origin, trader], waiting=True) == []
    assert ask([origin, trader], waiting=True, last_piece=100.0 - STALL_SECONDS) != []  # a stall
    assert ask([origin], waiting=True) != []  # with nobody to trade with, it is the only one


def test_the_origin_is_spared_only_in_a_swarm_larger_than_a_fetchs_sources():
    assert spare_complete(True, providers=40, places=16)
    assert not spare_complete(False, providers=40, places=16)  # nothing on its way
    assert not spare_complete(True, providers=16, places=16)  # small: its upload is the speed
