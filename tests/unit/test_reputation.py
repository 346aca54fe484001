"""Influence a key earns: rounds in which its deltas were merged, and a cap on what the keys
with none may weigh in a round."""

from __future__ import annotations

import json

import pytest

from aggregator.reputation import Reputation, newcomer_factor
from aggregator.screening import weigh_round


def test_newcomers_together_weigh_at_most_their_share_of_a_round():
    weights = {f"h{i}": 1.0 for i in range(4)} | {f"s{i}": 1.0 for i in range(16)}
    newcomers = {f"s{i}" for i in range(16)}
    factor = newcomer_factor(weights, newcomers, share=0.25)
    new = 16 * factor
    assert new / (new + 4) == pytest.approx(0.25)


def test_no_cap_in_a_new_swarm_or_when_newcomers_stay_under_their_share():
    assert newcomer_factor({"a": 1.0, "b": 1.0}, {"a", "b"}, 0.25) == 1.0  # nobody established
    assert newcomer_factor({"a": 1.0, "b": 1.0, "c": 1.0, "n": 0.5}, {"n"}, 0.25) == 1.0
    assert newcomer_factor({"a": 1.0, "n": 9.0}, {"n"}, 1.0) == 1.0  # share 1: no cap


def test_a_crowd_of_new_keys_neither_outweighs_nor_drags_the_established_volunteers():
    norms = {f"h{i}": 1.0 for i in range(4)} | {f"e{i}": 1e-3 for i in range(8)}
    newcomers = {f"e{i}" for i in range(8)}
    rules = {"norm_factor": 10, "norm_action": "reject", "gain_share": 0.25}
    blind = weigh_round(norms, None, **rules)  # no reputation: the honest are refused
    assert all(blind[f"h{i}"].weight is None for i in range(4))
    seen = weigh_round(norms, None, newcomers=newcomers, newcomer_share=0.25, **rules)
    assert all(seen[f"h{i}"].weight == 1.0 for i in range(4))
    crowd = sum(seen[f"e{i}"].weight for i in range(8))
    assert crowd / (crowd + 4) == pytest.approx(0.25)


def test_a_head_is_credited_once_and_the_counts_survive_a_restart(tmp_path):
    path = tmp_path / "reputation.json"
    rep = Reputation(path)
    assert not rep.established("alice")
    assert rep.credit("head1", ["alice", "bob", "alice"])
    assert not rep.credit("head1", ["alice"])  # seen again: not counted twice
    assert rep.credit("head2", ["alice"])
    again = Reputation(path)
    assert again.merged == {"alice": 2, "bob": 1}
    assert again.established("bob") and not again.established("carol")
    assert not again.credit("head2", ["bob"])


def test_an_unreadable_reputation_file_starts_afresh(tmp_path):
    path = tmp_path / "reputation.json"
    path.write_text(json.dumps({"merged": "nonsense"}))
    assert Reputation(path).merged == {}
