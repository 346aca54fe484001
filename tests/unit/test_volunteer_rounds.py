"""A volunteer's rounds on an in-memory swarm (tests/unit/world.py): it trains on the head,
its delta is merged, and a new head in the middle of a round is followed as the swarm's
rule says. With a daemon on libp2p: tests/test_node.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file

from node.config import VolunteerSettings
from node.net.blobstore import HEAD_PIN
from node.net.swarm import HEAD_TTL
from node.seed import genesis_head
from node.training.tiny_model import CORPUS
from node.training.trainer import Trainer
from node.volunteer.volunteer import Volunteer
from protocol.container import DeltaReader
from protocol.ids import base_id
from protocol.records import ANNOUNCE, HEAD, DeltaAnnouncement, owned_topic
from tests.unit.world import World, step

TRAIN = {"seq_len": 32, "batch_size": 2, "eval_blocks": 2, "lr": 2e-3, "warmup_steps": 2}


@pytest.fixture
def world(tmp_path, tiny_base) -> World:
    return World(tmp_path, tiny_base)


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("\n".join(CORPUS * 3))
    return path


@contextmanager
def training(volunteer: Volunteer) -> Iterator[threading.Thread]:
    """The volunteer's training thread, stopped (its round interrupted) on the way out."""
    stop = threading.Event()
    thread = threading.Thread(target=volunteer.train_forever, args=(stop,))
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        thread.join(timeout=60)


def wait_for(check: Callable[[], object], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def announced(volunteer: Volunteer, base: str) -> list[DeltaAnnouncement]:
    return [r.body for r in volunteer.swarm.read(ANNOUNCE, topic=base)]


def test_a_volunteer_trains_on_the_head_and_the_next_round_merges_its_delta(world, data):
    agg = world.aggregator("agg", world.config(["agg"]), genesis=world.genesis)
    step(agg)
    settings = VolunteerSettings(data=[str(data)], round_steps=2, rounds_per_head=1, **TRAIN)
    volunteer = Volunteer(*world.peer("v"), settings)
    volunteer.tick()  # follows the head
    with training(volunteer):
        wait_for(lambda: volunteer.published, "a delta")
    found = announced(volunteer, agg.head.base_id)
    assert [(a.round, a.steps) for a in found] == [(0, 2)]
    assert found[0].loss_after < found[0].loss_before
    step(agg)
    assert agg.head.merged == (found[0].delta_id,)
    volunteer.tick()
    assert volunteer.latest == agg.head


def test_a_volunteer_stops_offering_a_delta_once_its_base_is_past_the_staleness_window(world, data):
    agg = world.aggregator("agg", world.config(["agg"], staleness=0), genesis=world.genesis)
    step(agg)
    settings = VolunteerSettings(data=[str(data)], round_steps=2, rounds_per_head=1, **TRAIN)
    volunteer = Volunteer(*world.peer("v"), settings)
    volunteer.tick()
    genesis = agg.head
    with training(volunteer):
        wait_for(lambda: volunteer.published, "a delta on the genesis")
        first = announced(volunteer, genesis.base_id)[0].delta_id
        step(agg)
        volunteer.tick()
        wait_for(lambda: volunteer.published == 2, "a delta on round 1")
    assert [a["round"] for a in volunteer.state["announced"]] == [1]
    assert volunteer.swarm.publishing(ANNOUNCE) == [
        agg.head.base_id,
        owned_topic(volunteer.swarm.identity.author, agg.head.base_id),
    ]
    assert volunteer.store.pins(first) == []  # left to retention


def test_error_feedback_keeps_what_a_delta_left_out_and_carries_it_across_a_restart(world, data):
    agg = world.aggregator(
        "agg", world.config(["agg"], error_feedback=True, drop_rate=0.9), genesis=world.genesis
    )
    step(agg)
    settings = VolunteerSettings(data=[str(data)], round_steps=2, rounds_per_head=1, **TRAIN)
    volunteer = Volunteer(*world.peer("v"), settings)
    volunteer.tick()
    with training(volunteer):
        wait_for(lambda: volunteer.published, "a delta on the genesis")
    (first,) = announced(volunteer, agg.head.base_id)
    residual = volunteer.root / "residual"
    left = load_file(residual / "left.safetensors")
    trained = load_file(Trainer.latest(volunteer.root / "checkpoint") / "trainable.safetensors")
    base = load_file(world.genesis / "model.safetensors")
    with DeltaReader(volunteer.store.path(first.delta_id)) as reader:
        for name in reader.names():  # what was sent plus what is kept: the whole round
            want = trained[name] - base[name]
            assert torch.allclose(reader.read_tensor(name) + left[name], want, atol=1e-7)
            assert left[name].abs().sum() > 0.5 * want.abs().sum()  # p = 0.9 held most back
    step(agg)  # round 1 merges it; a restart of the volunteer follows it there
    again = Volunteer(*world.peer("v"), settings)
    again.tick()
    with training(again):
        wait_for(lambda: again.published, "a delta on round 1")
    carried = load_file(residual / "carried.safetensors")
    assert carried.keys() == left.keys()
    assert all(torch.equal(carried[n], left[n]) for n in left)


@pytest.mark.parametrize("policy", ["restart", "finish"])
def test_a_new_head_mid_round_is_followed_as_configured(
    world, data, tiny_base, tiny_finetuned, policy
):
    origin, store = world.peer("origin")  # a head from a seed, as `seed --publish-head` makes
    genesis = genesis_head(store, tiny_base)
    origin.transfers(store).announce(genesis.snapshot_id)
    assert origin.publish(HEAD, genesis, ttl=HEAD_TTL)
    steps = 100000 if policy == "restart" else 40  # restart: the round would never end
    settings = VolunteerSettings(
        data=[str(data)], round_steps=steps, on_new_head=policy, checkpoint_every=1000, **TRAIN
    )
    volunteer = Volunteer(*world.peer("v"), settings)
    volunteer.tick()
    with training(volunteer):
        wait_for(lambda: volunteer.metrics.steps._value.get() >= 2, "training on the genesis")
        volunteer.paused.set()  # hold the round in its middle while the head moves
        wait_for(lambda: volunteer.status == "paused", "the pause")
        newer = genesis_head(store, tiny_finetuned, round_=1, parent=genesis.base_id)
        origin.transfers(store).announce(newer.snapshot_id)
        assert origin.publish(HEAD, newer, ttl=HEAD_TTL)
        volunteer.tick()
        volunteer.paused.clear()
        wait_for(lambda: volunteer.head == newer, "the move to round 1")
        assert HEAD_PIN in volunteer.store.pins(newer.snapshot_id)
        wait_for(  # the old head's blob is left to retention
            lambda: volunteer.store.pins(genesis.snapshot_id) == [], "the old snapshot unpinned"
        )
        old = announced(volunteer, genesis.base_id)
        if policy == "restart":
            assert old == []  # the interrupted round published nothing
            volunteer.publish_now.set()  # the round on the new base would never end
            wait_for(lambda: announced(volunteer, newer.base_id), "publish-now")
        else:
            assert [a.steps for a in old] == [40]  # the round was finished, then it moved on


def test_a_lora_volunteer_publishes_a_dense_delta_of_the_adapted_modules(world, data):
    agg = world.aggregator("agg", world.config(["agg"]), genesis=world.genesis)
    step(agg)
    settings = VolunteerSettings(
        data=[str(data)], round_steps=2, rounds_per_head=1, lora=True, lora_rank=4, **TRAIN
    )
    volunteer = Volunteer(*world.peer("v"), settings)
    volunteer.tick()
    with training(volunteer):
        wait_for(lambda: volunteer.published, "a LoRA delta")
    (found,) = announced(volunteer, agg.head.base_id)
    with DeltaReader(volunteer.store.path(found.delta_id)) as reader:
        moved = {n for n in reader.names() if reader.read_values(n).any()}
    assert moved and all(
        n.rsplit(".", 2)[-2] in {"q_proj", "k_proj", "v_proj", "o_proj"} for n in moved
    )


def test_a_head_whose_blob_makes_another_base_is_rejected_and_counted(
    world, data, tiny_base, tiny_finetuned
):
    origin, store = world.peer("origin")
    real = genesis_head(store, tiny_base)
    origin.transfers(store).announce(real.snapshot_id)
    lie = real.model_copy(update={"base_id": base_id(tiny_finetuned)})  # names another base
    assert origin.publish(HEAD, lie, ttl=HEAD_TTL)
    volunteer = Volunteer(*world.peer("v"), VolunteerSettings(data=[str(data)], **TRAIN))
    volunteer.tick()
    with training(volunteer):
        wait_for(lambda: volunteer.status == "cannot get the head's base", "the refusal")
    rejected = volunteer.metrics.rejected.labels(reason="base")._value.get()
    assert rejected == 1 and not volunteer.ready()  # no verified base: not ready
    assert list((volunteer.root / "bases").iterdir()) == []  # nothing half-written
