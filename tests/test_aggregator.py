"""Aggregators on a real local swarm: rounds end to end, a standby taking over, the demo."""

from __future__ import annotations

import json

import pytest

from aggregator.engine import MergeInput, merge_models
from aggregator.methods import Recipe
from node.chain.history import current_head
from node.daemon.faults import ENV as ENV_CRASH
from node.net.blobs import fetch
from node.net.blobstore import BlobStore
from node.training.tiny_model import CORPUS
from protocol.identity import Identity
from protocol.ids import base_id
from protocol.model_dir import ModelDir
from protocol.records import Heartbeat
from protocol.swarm_config import load_swarm_config
from tests.swarm import run_cli, start_all, start_peer, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
TRAIN = ("--round-steps", "8", "--seq-len", "32", "--batch-size", "4", "--eval-blocks", "4")
TRAIN += ("--lr", "2e-3", "--warmup-steps", "2", "--heartbeat-every", "1", "--rounds-per-head", "1")
STYLES = (str, str.upper, lambda t: " ".join(reversed(t.split())))


def _swarm_config(tmp_path, genesis, *extra: str):
    path = tmp_path / "swarm.toml"
    args = ("init", "--genesis", str(genesis), "-o", str(path), "--drop-rate", "0.5")
    args += ("--aggregator-dir", str(tmp_path / "agg1"), "--aggregator-dir", str(tmp_path / "agg2"))
    out = run_cli(*args, "--staleness", "0", "--on-new-head", "restart", *extra, timeout=120)
    assert out.returncode == 0, out.stderr
    return path, load_swarm_config(path)


def _data(tmp_path, i: int):
    path = tmp_path / f"data{i}.jsonl"
    style = STYLES[i % len(STYLES)]
    path.write_text("".join(json.dumps({"text": style(t)}) + "\n" for t in CORPUS * 3))
    return path


def _aggregator(tmp_path, name, config, join, *extra, env=None):
    args = ("--config", str(config), "--join", join, "--heartbeat-every", "1", *extra)
    return start_peer(tmp_path / name, *args, command="aggregator", env=env)


def _volunteer(tmp_path, i, join, *extra):
    args = ("--join", join, "--data", str(_data(tmp_path, i)), *TRAIN, *extra)
    return start_peer(tmp_path / f"v{i}", *args, command="node")


def test_three_rounds_leave_every_peer_on_one_head_that_the_merge_reproduces(
    tmp_path, local_peer, tiny_base
):
    config_path, config = _swarm_config(  # the outer step's replay: the test below
        tmp_path, tiny_base, "--round-period", "3", "--min-deltas", "3", "--outer-optimizer", "none"
    )
    seed = start_peer(tmp_path / "seed", "--swarm-id", config.swarm_id)
    join = seed.maddrs[0]
    start_all(
        lambda: _aggregator(tmp_path, "agg1", config_path, join, "--genesis", str(tiny_base)),
        lambda: _aggregator(tmp_path, "agg2", config_path, join),
        lambda: _volunteer(tmp_path, 0, join, "--swarm-config", str(config_path)),  # pinned
        lambda: _volunteer(tmp_path, 1, join),  # the others adopt the swarm's config
        lambda: _volunteer(tmp_path, 2, join),
    )
    observer = local_peer("observer", join=[join], swarm_id=config.swarm_id)
    trusted = set(config.aggregators)

    def agreed_head():
        head = current_head(observer, trusted)
        if head is None or head.round < 3:
            return None
        beats = [r.body for r in observer.read("heartbeat") if isinstance(r.body, Heartbeat)]
        working = [b for b in beats if b.role in ("aggregator", "volunteer")]
        if len(working) == 5 and all(b.head_id == head.base_id for b in working):
            return head
        return None

    head = wait_for(agreed_head, 420, "every peer on one head of round >= 3")
    for i in (1, 2):  # the others learned the swarm's config from the swarm, and kept it
        assert load_swarm_config(tmp_path / f"v{i}" / "swarm.toml") == config
    assert head.deltas == len(head.merged) == 3 and head.parent != base_id(tiny_base)

    # Anyone can get it out, and transformers loads it.
    out = run_cli("export", "--join", join, "--host-maddr", "/ip4/127.0.0.1/tcp/0",
                  "--base", head.base_id, "-o", str(tmp_path / "head"), timeout=240)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert base_id(ModelDir(tmp_path / "head")) == head.base_id
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "head")

    # The head is exactly the swarm's recipe applied to its parent and the deltas it names.
    parent = tmp_path / "parent"
    out = run_cli("export", "--join", join, "--host-maddr", "/ip4/127.0.0.1/tcp/0",
                  "--base", head.parent, "-o", str(parent), timeout=240)  # fmt: skip
    assert out.returncode == 0, out.stderr
    store = BlobStore(tmp_path / "observer" / "blobs")
    for delta in head.merged:
        fetch(observer, store, delta, timeout=60, serve_while_fetching=False)
    recipe = Recipe.for_swarm(config)
    inputs = [MergeInput(store.path(d)) for d in head.merged]
    report = merge_models(parent, inputs, recipe, tmp_path / "redo", density=config.density)
    assert report.child_id == head.base_id != head.parent


def test_a_standby_finishes_the_round_of_a_killed_lease_holder(tmp_path, local_peer, tiny_base):
    config_path, config = _swarm_config(
        tmp_path, tiny_base, "--round-period", "2", "--min-deltas", "1"
    )
    seed = start_peer(tmp_path / "seed", "--swarm-id", config.swarm_id)
    join = seed.maddrs[0]
    lease = ("--lease-seconds", "5")
    holder = _aggregator(
        tmp_path, "agg1", config_path, join, "--genesis", str(tiny_base), *lease,
        env={ENV_CRASH: "aggregator:fetched"},
    )  # fmt: skip
    volunteer = _volunteer(tmp_path, 0, join)
    assert holder.proc.wait(timeout=300) == -9, holder.log_tail()  # killed mid-round
    standby = _aggregator(tmp_path, "agg2", config_path, join, *lease)
    observer = local_peer("observer", join=[join], swarm_id=config.swarm_id)
    standby_author = Identity.load(standby.data_dir / "identity.pem").author

    def round_one():
        heads = [r for r in observer.read("head") if r.body.round >= 1]
        return heads[0] if heads else None

    record = wait_for(round_one, 180, "the standby to publish round 1")
    assert record.author == standby_author and record.body.deltas >= 1
    made = set(BlobStore(volunteer.data_dir / "blobs").ids())  # every delta it ever made
    assert set(record.body.merged) <= made

    # The killed one comes back, follows the head and left nothing half-written behind.
    again = _aggregator(tmp_path, "agg1", config_path, join, *lease)

    def follows():
        beats = [r.body for r in observer.read("heartbeat") if r.body.peer_id == again.peer_id]
        return beats and beats[0].head_round is not None and beats[0].head_round >= 1

    wait_for(follows, 120, "the restarted aggregator to follow the head")
    bases = again.data_dir / "bases"

    def settled():  # it may be writing the newest head's base right now
        return not [p for p in bases.iterdir() if p.name.startswith(".")]

    wait_for(settled, 60, "the restarted aggregator to finish writing its bases")
    # and it did not publish the genesis head again over its own record (once, in its first life)
    assert again.log.read_text().count("published head: round 0,") == 1


def test_the_demo_runs_one_round(tmp_path):
    out = run_cli(
        "demo", "--workdir", str(tmp_path / "demo"), "--rounds", "1", "--volunteers", "2",
        "--pretrain-steps", "30", "--round-steps", "8", "--json", str(tmp_path / "demo.json"),
        timeout=480,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    figures = json.loads((tmp_path / "demo.json").read_text())
    assert set(figures["genesis"]["loss"]) == {"manual", "code"}
    (row,) = figures["rounds"]
    assert row["round"] == 1 and row["deltas_merged"] == 2 and row["bytes_moved"] > 0
    assert row["base_id"] != figures["genesis"]["base_id"]
    assert "genesis" in out.stdout and row["base_id"][:16] in out.stdout


def test_demo_prepare_writes_what_the_compose_swarm_starts_from(tmp_path):
    where = tmp_path / "swarm"
    out = run_cli("demo", "--prepare", str(where), "--pretrain-steps", "5", timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    config = load_swarm_config(where / "swarm.toml")
    assert config.genesis_id == base_id(ModelDir(where / "genesis"))
    assert config.round_period == 30 and len(config.aggregators) == 2
    keys = {
        Identity.load(where / d / "identity.pem").author for d in ("aggregator-1", "aggregator-2")
    }
    assert keys == set(config.aggregators)
    assert {p.name for p in (where / "data").iterdir()} == {
        "manual.jsonl",
        "code.jsonl",
        "docs.jsonl",
    }
    again = run_cli("demo", "--prepare", str(where), timeout=120)  # a restarted setup keeps it
    assert again.returncode == 0 and "keeping" in again.stdout
    assert load_swarm_config(where / "swarm.toml") == config
