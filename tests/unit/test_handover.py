"""Handing a swarm over to other aggregators: a config after the first is taken only with the
endorsement of most of the aggregators before it, by every role (protocol.handover; roles on
an in-memory swarm with real signed records, tests/unit/world.py)."""

from __future__ import annotations

import threading

import pytest

from node.chain.history import current_head, find_config
from node.cli import main
from node.config import VolunteerSettings
from node.data_dir import DataDir
from node.monitor.view import read_view
from node.seed import Seed
from node.volunteer.volunteer import Volunteer
from protocol.handover import (
    Handover,
    HandoverError,
    check_handover,
    config_digest,
    endorse,
    follow_handovers,
    load_handover,
    next_config,
)
from protocol.identity import Identity
from protocol.records import CONFIG, HANDOVER, MAX_HANDOVER_BYTES, sign_record
from protocol.swarm_config import SwarmConfig, anchored_swarm_id, load_swarm_config, parse_config
from tests.unit.world import World, step

GENESIS = "a" * 64


def _swarm(n: int) -> tuple[SwarmConfig, list[Identity]]:
    keys = [Identity.generate() for _ in range(n)]
    authors = [k.author for k in keys]
    swarm_id = anchored_swarm_id("swarm-1234", GENESIS, authors)
    config = parse_config(
        {"swarm_id": swarm_id, "genesis_id": GENESIS, "aggregators": authors}, "test"
    )
    return config, keys


def _next(config: SwarmConfig, aggregators: list[str], **rules) -> SwarmConfig:
    values = config.model_dump(mode="json") | {"epoch": config.epoch + 1}
    return parse_config(values | {"aggregators": aggregators} | rules, "test")


def test_a_handover_needs_more_than_half_of_the_aggregators_before_it():
    root, keys = _swarm(4)
    newcomer = Identity.generate().author
    nxt = _next(root, [keys[0].author, newcomer])
    sigs = [endorse(k, root, nxt) for k in keys]
    assert (
        check_handover(root, Handover(previous=root, config=nxt, endorsements=tuple(sigs[:3])))
        == nxt
    )
    for short in ((), sigs[:2], (sigs[0], sigs[0], sigs[0])):  # half, or one key three times
        with pytest.raises(HandoverError, match="more than half"):
            check_handover(root, Handover(previous=root, config=nxt, endorsements=tuple(short)))


def test_endorsements_by_strangers_for_other_configs_or_forged_do_not_count():
    root, keys = _swarm(3)
    nxt = _next(root, [keys[0].author])
    other = _next(root, [keys[1].author])
    stranger = Identity.generate()
    replayed = endorse(keys[1], root, other)  # signed for another next config
    forged = endorse(keys[2], root, nxt).model_copy(update={"sig": "00" * 64})
    for extra in (endorse(stranger, root, nxt), replayed, forged):
        offered = Handover(
            previous=root, config=nxt, endorsements=(endorse(keys[0], root, nxt), extra)
        )
        with pytest.raises(HandoverError, match="endorsed by 1 of the 3"):
            check_handover(root, offered)


def test_the_next_config_must_keep_the_swarm_and_genesis_and_be_one_epoch_on():
    root, keys = _swarm(1)

    def offered(config: SwarmConfig) -> Handover:
        return Handover(
            previous=root, config=config, endorsements=(endorse(keys[0], root, config),)
        )

    skipped = _next(root, [keys[0].author]).model_copy(update={"epoch": 2})
    regenesis = _next(root, [keys[0].author]).model_copy(update={"genesis_id": "b" * 64})
    emptied = _next(root, [keys[0].author]).model_copy(update={"aggregators": ()})
    for bad, why in ((skipped, "epoch 2"), (regenesis, "genesis"), (emptied, "no aggregators")):
        with pytest.raises(HandoverError, match=why):
            check_handover(root, offered(bad))


def test_handovers_chain_from_the_root_and_the_first_valid_one_wins():
    root, keys = _swarm(2)
    newcomer = Identity.generate()
    one = _next(root, [k.author for k in keys] + [newcomer.author])
    two = _next(one, [newcomer.author, keys[1].author], round_period=60)
    h1 = Handover(
        previous=root, config=one, endorsements=tuple(endorse(k, root, one) for k in keys)
    )
    h2 = Handover(
        previous=one,
        config=two,
        endorsements=(endorse(newcomer, one, two), endorse(keys[1], one, two)),
    )
    assert follow_handovers(root, [h1, h2]) == [root, one, two]
    with pytest.raises(HandoverError):
        follow_handovers(root, [h2])
    junk = Handover(previous=root, config=_next(root, [newcomer.author]), endorsements=())
    assert next_config(root, [junk, h1]) == h1
    assert next_config(root, [junk]) is None


def test_a_handover_of_sixteen_aggregators_fits_in_one_record():
    root, keys = _swarm(16)
    nxt = _next(root, [Identity.generate().author for _ in range(16)])
    handover = Handover(
        previous=root, config=nxt, endorsements=tuple(endorse(k, root, nxt) for k in keys)
    )
    _, data = sign_record(keys[0], root.swarm_id, HANDOVER.name, "ab" * 32, handover, 1e9)
    assert len(data) <= MAX_HANDOVER_BYTES


@pytest.fixture
def handed_over(tmp_path, tiny_base):
    """A swarm made with aggregators "a" and "b", handed over (by both) to "b" and "c"."""
    world = World(tmp_path, tiny_base)
    world.anchor(["a", "b"])
    root = world.config(["a", "b"])
    nxt = _next(root, [world.author("b"), world.author("c")])
    keys = [Identity.load(DataDir(tmp_path / name).identity) for name in ("a", "b")]
    handover = Handover(
        previous=root, config=nxt, endorsements=tuple(endorse(k, root, nxt) for k in keys)
    )
    return world, root, handover


def test_every_role_follows_the_handover_and_the_retired_aggregator_stops(handed_over):
    world, root, handover = handed_over
    a = world.aggregator("a", root, genesis=world.genesis)
    step(a)  # the genesis head, under epoch 0
    volunteer = Volunteer(*world.peer("v"), VolunteerSettings(data=["unused.txt"]))
    volunteer.tick()
    assert volunteer.config == root
    c = world.aggregator("c", root, [handover])  # started with the handover: publishes it
    observer, _ = world.peer("observer")
    assert find_config(observer) == handover.config
    a.configs.read_at = volunteer.configs.read_at = 0.0  # their next look is due
    a.tick()
    volunteer.tick()
    assert a.config == volunteer.config == handover.config and not a.merges
    assert load_swarm_config(DataDir(world.root / "v").root / "swarm.toml") == handover.config
    step(a)
    assert a.status.startswith("not an aggregator of epoch 1")
    step(c)
    assert c.head == a.head  # c took up the head of epoch 0 and merges from it
    seed = Seed(*world.peer("seed"))
    seed.mirror_once(threading.Event())
    assert seed.config == handover.config
    assert read_view(observer).head == c.head
    assert current_head(observer, set(handover.config.aggregators)) == c.head


def test_a_strangers_handover_or_later_config_is_not_followed(handed_over, tmp_path):
    world, root, handover = handed_over
    a = world.aggregator("a", root, genesis=world.genesis)
    step(a)
    rogue, _ = world.peer("rogue")
    mine = _next(root, [rogue.identity.author])
    signed_by_a = endorse(Identity.load(DataDir(tmp_path / "a").identity), root, mine)
    fake = Handover(
        previous=root, config=mine, endorsements=(signed_by_a, endorse(rogue.identity, root, mine))
    )
    # every DHT node refuses both: one of two aggregators is not more than half, and a config
    # record holds epoch 0 only
    assert not rogue.publish(HANDOVER, fake, topic=config_digest(root), ttl=600)
    assert not rogue.publish(CONFIG, mine, ttl=600)  # epoch 1 offered as a first config
    assert world.net.rejected["untrusted"] == 1 and world.net.rejected["wrong_key"] == 1
    observer, _ = world.peer("observer")
    assert find_config(observer) == root  # one of two aggregators is not more than half


def test_the_cli_drafts_and_signs_a_handover(tmp_path, capsys):
    def author(name: str) -> str:
        return Identity.load_or_create(DataDir(tmp_path / name).identity).author

    values = {"genesis_id": GENESIS, "aggregators": [author("a"), author("b")]}
    swarm_id = anchored_swarm_id("s-123", GENESIS, values["aggregators"])
    root = parse_config(values | {"swarm_id": swarm_id}, "test")
    (tmp_path / "swarm.toml").write_text(root.to_toml())
    current = ["--config", str(tmp_path / "swarm.toml")]
    nxt, out = tmp_path / "next.toml", tmp_path / "handover-1.json"
    draft = ["handover", "draft", *current, "--add-dir", str(tmp_path / "c")]
    assert main([*draft, "--retire", author("a"), "-o", str(nxt)]) == 0
    assert load_swarm_config(nxt).aggregators == tuple(sorted([author("b"), author("c")]))
    sign = ["handover", "sign", *current, "--next", str(nxt), "-o", str(out), "--data-dir"]
    assert main([*sign, str(tmp_path / "c")]) == 1  # not an aggregator of epoch 0
    assert "only they sign" in capsys.readouterr().err
    assert main([*sign, str(tmp_path / "a")]) == 0
    assert "signed by 1 of the 2" in capsys.readouterr().out
    assert main([*sign, str(tmp_path / "b")]) == 0
    assert "enough: start the aggregators" in capsys.readouterr().out
    assert check_handover(root, load_handover(out)) == load_swarm_config(nxt)
