"""What an aggregator lets into a round: one delta per author, honest files only, bounded norms."""

from __future__ import annotations

import hashlib
import math
import random
from pathlib import Path

import pytest
import torch

from aggregator.screening import (
    Admitted,
    Candidate,
    Rejected,
    fill_slots,
    gain_weights,
    inspect_delta,
    rank_candidates,
    screen_norms,
    weigh_round,
    weighted_median,
)
from protocol.container import DeltaReader
from protocol.delta import create_delta
from protocol.identity import Identity
from protocol.ids import base_id, file_id
from protocol.model_dir import FLOAT_DTYPES, ModelDir
from protocol.records import DeltaAnnouncement
from tests.forge import assemble, nan_delta, scaled_finetune, single_tensor_delta, split

BASE = "ab" * 32
MAX_BYTES = 1 << 30


def _id(n: int) -> str:
    return f"{n:064x}"


def _candidate(author: str, delta_id: str, age: int) -> Candidate:
    announcement = DeltaAnnouncement(base_id=BASE, delta_id=delta_id, size=1, round=0)
    return Candidate(author, announcement, age)


def _picked(candidates: list[Candidate], beacon: str = BASE) -> list[tuple[str, str, int]]:
    return [(c.author, c.delta_id, c.age) for c in rank_candidates(candidates, beacon)]


def _draw(beacon: str, delta_id: str) -> bytes:
    return hashlib.sha256(f"{beacon}:{delta_id}".encode()).digest()


# rank_candidates


def test_rank_keeps_each_authors_freshest_delta():
    alice, bob = "a" * 64, "b" * 64
    got = _picked(
        [_candidate(alice, _id(1), 1), _candidate(alice, _id(2), 0), _candidate(bob, _id(3), 1)]
    )
    assert got == [(alice, _id(2), 0), (bob, _id(3), 1)]


def test_rank_breaks_an_authors_tie_in_age_by_the_beacons_draw():
    alice = "a" * 64
    got = _picked([_candidate(alice, _id(9), 0), _candidate(alice, _id(4), 0)])
    first = min((_id(9), _id(4)), key=lambda d: _draw(BASE, d))
    assert got == [(alice, first, 0)]


def test_rank_takes_a_delta_announced_twice_once():
    alice = "a" * 64
    got = _picked([_candidate(alice, _id(5), 0), _candidate(alice, _id(5), 0)])
    assert got == [(alice, _id(5), 0)]


def test_rank_orders_freshest_first_then_by_a_draw_no_author_chooses():
    authors = [c * 64 for c in "abcdefgh"]
    announced = [_candidate(a, _id(i), i % 2) for i, a in enumerate(authors)]
    for beacon in (BASE, "f" * 64):
        got = _picked(announced, beacon)
        assert [age for _, _, age in got] == [0] * 4 + [1] * 4
        for age in (0, 1):
            ids = [d for _, d, a in got if a == age]
            assert ids == sorted(ids, key=lambda d, b=beacon: _draw(b, d))
    # the smallest id is not first by right: which one leads depends on the head
    assert _picked(announced, BASE) != _picked(announced, "f" * 64)


def test_rank_does_not_depend_on_the_order_of_announcements():
    rng = random.Random(0)
    announced = [
        _candidate(f"{rng.randrange(6):064x}", _id(rng.randrange(40)), rng.randrange(3))
        for _ in range(60)
    ]
    want = _picked(announced)
    assert len(want) == len({author for author, _, _ in want}) == 6
    for _ in range(20):
        rng.shuffle(announced)
        assert _picked(announced) == want


def test_a_delta_id_announced_by_two_authors_stays_under_both_whatever_the_order():
    alice, bob = "a" * 64, "b" * 64
    shared = _id(1)
    one = _picked([_candidate(alice, shared, 0), _candidate(bob, shared, 0)])
    other = _picked([_candidate(bob, shared, 0), _candidate(alice, shared, 0)])
    assert one == other == [(alice, shared, 0), (bob, shared, 0)]  # inspection tells them apart


# screen_norms


@pytest.mark.parametrize("action", ["reject", "clip"])
def test_norms_within_the_bound_keep_full_weight(action):
    norms = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 19.9}  # median 2.5, bound 25
    assert screen_norms(norms, 10.0, action) == {"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0}


def test_a_norm_a_hundred_times_the_others_is_rejected():
    norms = {"a": 1.0, "b": 1.2, "c": 0.9, "big": 100.0}
    assert screen_norms(norms, 10.0, "reject") == {"a": 1.0, "b": 1.0, "c": 1.0, "big": None}


def test_clipping_scales_a_large_norm_down_to_factor_times_the_median():
    norms = {"a": 1.0, "b": 1.2, "c": 0.9, "big": 100.0}
    weights = screen_norms(norms, 10.0, "clip")
    assert {k: v for k, v in weights.items() if k != "big"} == {"a": 1.0, "b": 1.0, "c": 1.0}
    median = (1.0 + 1.2) / 2
    assert weights["big"] * norms["big"] == pytest.approx(10.0 * median)
    assert 0 < weights["big"] < 1


@pytest.mark.parametrize("action", ["reject", "clip"])
def test_the_one_non_zero_norm_among_zeros_is_rejected(action):
    norms = {"z1": 0.0, "z2": 0.0, "z3": 0.0, "x": 1e-6}
    assert screen_norms(norms, 10.0, action) == {"z1": 1.0, "z2": 1.0, "z3": 1.0, "x": None}


def test_no_norms_screen_to_nothing():
    assert screen_norms({}, 10.0, "reject") == {}
    assert screen_norms({}, 10.0, "clip") == {}


# weigh_round: norms and, with evaluation data, held-out loss gains


def test_weighted_median_counts_values_by_weight_and_falls_back_to_the_plain_median():
    values = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 100.0}
    assert weighted_median(values, {"a": 1, "b": 1, "c": 1, "d": 1}) == 2.0  # the lower median
    assert weighted_median(values, {"a": 0.01, "b": 0.01, "c": 1, "d": 1}) == 3.0
    assert weighted_median(values, {}) == statistics_median(values)


def statistics_median(values: dict) -> float:
    ordered = sorted(values.values())
    return (ordered[1] + ordered[2]) / 2


def test_gain_weights_are_full_from_a_share_of_the_best_gain_and_none_without_gain():
    gains = {"best": 0.04, "half": 0.02, "small": 0.001, "zero": 0.0, "hurt": -0.5}
    gains["broken"] = -math.inf
    weights = gain_weights(gains, share=0.25)
    assert weights["best"] == weights["half"] == 1.0  # 0.02 >= 0.25 * 0.04
    assert weights["small"] == pytest.approx(0.001 / 0.01)
    assert weights["zero"] is weights["hurt"] is weights["broken"] is None


def test_without_gains_a_round_is_weighed_by_its_norms_alone():
    norms = {"a": 1.0, "b": 1.1, "big": 100.0}
    verdicts = weigh_round(norms, None, norm_factor=10, norm_action="reject", gain_share=0.25)
    assert [verdicts[d].weight for d in ("a", "b")] == [1.0, 1.0]
    assert verdicts["big"].weight is None and verdicts["big"].reason == "norm"


def test_a_delta_that_bought_no_gain_is_left_out_for_no_gain():
    norms = {"a": 1.0, "b": 1.0, "flip": 1.0}
    gains = {"a": 0.03, "b": 0.02, "flip": -0.04}
    verdicts = weigh_round(norms, gains, norm_factor=10, norm_action="reject", gain_share=0.25)
    assert verdicts["flip"].weight is None and verdicts["flip"].reason == "no_gain"
    assert verdicts["a"].weight == verdicts["b"].weight == 1.0


def test_a_crowd_of_near_empty_deltas_neither_refuses_nor_dilutes_the_honest_ones():
    # Without gains, eight near-empty deltas drag the median down and the honest ones fail
    # the norm screen; with gains, they weigh next to nothing in the median and the merge.
    norms = {f"h{i}": 1.0 for i in range(4)} | {f"e{i}": 1e-3 for i in range(8)}
    blind = weigh_round(norms, None, norm_factor=10, norm_action="reject", gain_share=0.25)
    assert all(blind[f"h{i}"].weight is None for i in range(4))
    gains = {f"h{i}": 0.03 for i in range(4)} | {f"e{i}": 3e-5 for i in range(8)}
    seen = weigh_round(norms, gains, norm_factor=10, norm_action="reject", gain_share=0.25)
    assert all(seen[f"h{i}"].weight == 1.0 for i in range(4))
    crowd = sum(seen[f"e{i}"].weight for i in range(8))
    assert crowd < 0.05  # against 4.0 for the honest deltas


# fill_slots: a slot only for a delta that passed


def _admit_all_but(bad: set[str]):
    checked: list[list[str]] = []

    def check(batch):
        checked.append([c.delta_id for c in batch])
        return [None if c.delta_id in bad else Admitted(c, 1.0) for c in batch]

    return check, checked


def test_slots_go_to_the_first_candidates_that_pass_and_failures_take_none():
    ranked = [_candidate(f"a{i}", _id(i), 0) for i in range(10)]
    check, checked = _admit_all_but({_id(0), _id(1), _id(2)})
    admitted = fill_slots(ranked, check, slots=3, parallel=2, on_copy=lambda c: None)
    assert [a.candidate.delta_id for a in admitted] == [_id(3), _id(4), _id(5)]
    assert checked[0] == [_id(0), _id(1), _id(2)]  # as many as slots are left, at least 2


def test_a_delta_id_admitted_under_two_authors_goes_to_on_copy():
    ranked = [_candidate("a", _id(1), 0), _candidate("b", _id(1), 0), _candidate("c", _id(2), 0)]
    check, checked = _admit_all_but(set())
    copies = []
    admitted = fill_slots(ranked, check, slots=3, parallel=4, on_copy=copies.append)
    assert [(a.candidate.author, a.candidate.delta_id) for a in admitted] == [
        ("a", _id(1)),
        ("c", _id(2)),
    ]
    assert [c.author for c in copies] == ["b"]
    assert all(len(set(batch)) == len(batch) for batch in checked)  # never twice at once


# inspect_delta on real .msd files


@pytest.fixture(scope="module")
def author() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="module")
def honest(tiny_base, tiny_finetuned, author, tmp_path_factory) -> Path:
    """(finetuned - base), kept whole in fp32: its norm is the plain L2 distance of the models."""
    out = tmp_path_factory.mktemp("screening") / "honest.msd"
    create_delta(tiny_base, tiny_finetuned, out, identity=author, drop_rate=0.0, codec="fp32")
    return out


def _announce(path: Path, author: str, *, base: str | None = None, size: int | None = None):
    if base is None:
        with DeltaReader(path) as r:
            base = r.header.base_id
    announcement = DeltaAnnouncement(
        base_id=base,
        delta_id=file_id(path),
        size=path.stat().st_size if size is None else size,
        round=0,
    )
    return Candidate(author, announcement, 0)


def _inspect(path: Path, candidate: Candidate, head: Path, max_bytes: int = MAX_BYTES):
    with ModelDir(head) as md:
        return inspect_delta(path, candidate, md, max_bytes=max_bytes)


def _reason(path: Path, candidate: Candidate, head: Path, max_bytes: int = MAX_BYTES) -> str:
    with pytest.raises(Rejected) as info:
        _inspect(path, candidate, head, max_bytes)
    return info.value.reason


def test_an_honest_delta_gives_its_base_and_the_distance_between_the_models(
    honest, tiny_base, tiny_finetuned, author
):
    got_base, norm = _inspect(honest, _announce(honest, author.author), tiny_base)
    assert got_base == base_id(tiny_base)
    base, ft = ModelDir(tiny_base), ModelDir(tiny_finetuned)
    want = math.sqrt(
        sum(
            float((ft.tensor(n).double() - base.tensor(n).double()).square().sum())
            for n in base.names()
            if base.tensors[n].dtype in FLOAT_DTYPES
        )
    )
    assert want > 0
    assert norm == pytest.approx(want, rel=1e-5)


def test_a_delta_scaled_a_hundred_times_measures_a_hundred_times_larger(
    tiny_base, tiny_finetuned, author, tmp_path
):
    big_model = scaled_finetune(tiny_base, tiny_finetuned, tmp_path / "scaled", 100)
    norms = {}
    for name, model in (("normal", tiny_finetuned), ("big", big_model)):
        path = tmp_path / f"{name}.msd"
        create_delta(tiny_base, model, path, identity=author, drop_rate=0.9, seed=7)
        norms[name] = _inspect(path, _announce(path, author.author), tiny_base)[1]
    assert norms["big"] / norms["normal"] == pytest.approx(100, rel=0.02)
    # and the round's screening catches it against a few ordinary ones
    round_norms = {"n1": norms["normal"], "n2": norms["normal"] * 1.1, "big": norms["big"]}
    assert screen_norms(round_norms, 10.0, "reject")["big"] is None


def test_a_delta_signed_by_someone_else_than_its_announcer_is_rejected(honest, tiny_base):
    impostor = Identity.generate().author
    assert _reason(honest, _announce(honest, impostor), tiny_base) == "bad_signature"


def test_a_header_changed_after_signing_is_rejected(honest, tiny_base, author, tmp_path):
    parts = split(honest)
    parts.header["metadata"] = {"note": "changed"}
    forged = tmp_path / "forged.msd"
    forged.write_bytes(assemble(parts))  # the author's old signature, a new header
    candidate = _announce(forged, author.author, base=base_id(tiny_base))
    assert _reason(forged, candidate, tiny_base) == "bad_signature"


def test_a_file_of_another_size_than_announced_is_rejected(honest, tiny_base, author):
    size = honest.stat().st_size
    for announced in (size - 1, size + 1):
        candidate = _announce(honest, author.author, size=announced)
        assert _reason(honest, candidate, tiny_base) == "size"


def test_a_file_larger_than_the_fetch_bound_is_rejected(honest, tiny_base, author):
    size = honest.stat().st_size
    candidate = _announce(honest, author.author)
    assert _reason(honest, candidate, tiny_base, max_bytes=size - 1) == "size"
    assert _inspect(honest, candidate, tiny_base, max_bytes=size)[1] > 0


def test_a_delta_against_another_base_than_announced_is_rejected(
    tiny_base, tiny_finetuned, author, tmp_path
):
    # trained on the fine-tuned model, announced as trained on the base (the aggregator's head)
    other = tmp_path / "other.msd"
    create_delta(tiny_finetuned, tiny_base, other, identity=author)
    candidate = _announce(other, author.author, base=base_id(tiny_base))
    assert _reason(other, candidate, tiny_base) == "unknown_base"


def test_a_delta_that_does_not_fit_the_heads_layout_is_rejected(
    honest, tiny_base_bf16_sharded, author
):
    # same architecture, but the head holds bf16 tensors where the delta's base held f32
    candidate = _announce(honest, author.author)
    assert _reason(honest, candidate, tiny_base_bf16_sharded) == "layout"


def test_a_corrupted_byte_inside_a_tensor_frame_is_rejected_as_malformed(
    honest, tiny_base, author, tmp_path
):
    parts = split(honest)
    data = bytearray(honest.read_bytes())
    first_frame = len(data) - sum(len(f) for f in parts.frames)
    data[first_frame + len(parts.frames[0]) // 2] ^= 0x10
    bad = tmp_path / "flipped.msd"
    bad.write_bytes(bytes(data))
    assert _reason(bad, _announce(bad, author.author), tiny_base) == "malformed"


def test_a_delta_holding_nan_is_rejected_as_non_finite(tiny_base, author, tmp_path):
    clean, nan = tmp_path / "clean.msd", tmp_path / "nan.msd"
    single_tensor_delta(clean, tiny_base, author, torch.tensor(1e-3))
    nan_delta(nan, tiny_base, author)
    assert _inspect(clean, _announce(clean, author.author), tiny_base)[1] > 0
    assert _reason(nan, _announce(nan, author.author), tiny_base) == "non_finite"


def test_a_delta_that_overflows_once_rescaled_is_rejected_as_non_finite(
    tiny_base, author, tmp_path
):
    path = tmp_path / "huge.msd"
    single_tensor_delta(path, tiny_base, author, torch.tensor(3e38))  # x10 by DARE: overflow
    assert _reason(path, _announce(path, author.author), tiny_base) == "non_finite"


def test_a_delta_sparsified_at_another_rate_than_the_swarms_is_rejected(
    tiny_base, tiny_finetuned, author, tmp_path
):
    path = tmp_path / "dense.msd"
    create_delta(tiny_base, tiny_finetuned, path, identity=author, drop_rate=0.0, seed=1)
    candidate = _announce(path, author.author)
    with ModelDir(tiny_base) as md:
        assert inspect_delta(path, candidate, md, max_bytes=MAX_BYTES, drop_rate=0.0)[1] > 0
        with pytest.raises(Rejected) as info:  # denser than the swarm's 0.9: it would weigh more
            inspect_delta(path, candidate, md, max_bytes=MAX_BYTES, drop_rate=0.9)
    assert info.value.reason == "drop_rate"


def test_rank_puts_established_authors_before_newcomers_of_the_same_age():
    crowd = [_candidate(f"new{i}", _id(100 + i), 0) for i in range(16)]
    known = [_candidate("alice", _id(1), 0), _candidate("bob", _id(2), 0)]
    stale = _candidate("carol", _id(3), 1)
    everyone = [*crowd, stale, *known]
    ranked = rank_candidates(everyone, BASE, established={"alice", "bob", "carol"})
    assert {c.author for c in ranked[:2]} == {"alice", "bob"}
    assert ranked[-1].author == "carol"  # freshness still comes first
    blind = rank_candidates(everyone, BASE)  # without reputation: the beacon's draw alone
    assert [c.author for c in blind[:18]] == [
        c.author for c in sorted([*crowd, *known], key=lambda c: _draw(BASE, c.delta_id))
    ]
