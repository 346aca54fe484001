"""A daemon that waits says what for and what to do, at once and every minute after, not in
silence (node.daemon.peer's ``waiting``; roles on an in-memory swarm, tests/unit/world.py)."""

from __future__ import annotations

import logging

from node.config import VolunteerSettings
from node.daemon import peer
from node.volunteer.volunteer import Volunteer
from tests.unit.world import World, step


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_an_aggregator_without_genesis_in_a_swarm_without_head_names_the_flag(
    tmp_path, tiny_base, caplog, monkeypatch
):
    world = World(tmp_path, tiny_base)
    agg = world.aggregator("agg", world.config(["agg"]))  # no genesis, and nobody has a head
    with caplog.at_level(logging.WARNING):
        step(agg)
        step(agg)  # within the minute: said once
        assert agg.status == "waiting for a head"
        said = [m for m in _warnings(caplog) if m.startswith("waiting for a head")]
        assert len(said) == 1 and "--genesis MODEL_DIR" in said[0]
        monkeypatch.setattr(peer, "NOTICE_EVERY", 0.0)  # a minute later
        step(agg)
        assert len([m for m in _warnings(caplog) if m.startswith("waiting for a head")]) == 2


def test_a_volunteer_says_whether_it_waits_for_the_config_or_for_a_head(
    tmp_path, tiny_base, caplog
):
    world = World(tmp_path, tiny_base)
    world.anchor(["agg"])  # a swarm whose config names its aggregator: none in sight yet
    volunteer = Volunteer(*world.peer("v"), VolunteerSettings(data=["unused.txt"]))
    with caplog.at_level(logging.WARNING):
        volunteer._wait_for_head()
        assert volunteer.status == "waiting for the swarm's config"
        agg = world.aggregator("agg", world.config(["agg"]))  # publishes the config, no head
        volunteer.configs.read_at = 0.0
        volunteer.tick()
        volunteer._wait_for_head()
    said = _warnings(caplog)
    assert said[0].startswith("waiting for the swarm's config: ") and "--join" in said[0]
    assert said[1].startswith("waiting for a head: no head from 1 aggregator(s) yet")
    assert agg.head is None
