"""The volunteer daemon on a real swarm: sync a head, train, publish; restart; bad input."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from node.daemon.faults import ENV as ENV_CRASH
from node.net.blobs import fetch, providers
from node.net.blobstore import OWN_DELTA_PIN, BlobStore
from node.training.tiny_model import CORPUS
from protocol.container import DeltaReader
from protocol.delta import apply_deltas
from protocol.identity import Identity
from protocol.ids import base_id
from protocol.records import DeltaAnnouncement
from tests.swarm import LOOPBACK, run_cli, start_peer, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(500)]
TRAIN = ("--round-steps", "8", "--seq-len", "32", "--batch-size", "4", "--eval-blocks", "4")
TRAIN += ("--lr", "2e-3", "--warmup-steps", "2", "--drop-rate", "0.5")


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"text": t} for t in CORPUS * 3]
    rows += [{"prompt": "Q: " + t[:10], "completion": t[10:]} for t in CORPUS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _announcements(observer, base: str, author: str) -> list[DeltaAnnouncement]:
    return [
        r.body
        for r in observer.read("announce", topic=base)
        if r.author == author and isinstance(r.body, DeltaAnnouncement)
    ]


def test_a_node_syncs_the_head_trains_and_publishes_a_delta_others_can_apply(
    tmp_path, local_peer, tiny_base, corpus
):
    seed = start_peer(tmp_path / "seed", "--publish-head", str(tiny_base), "--no-mirror")
    node = start_peer(
        tmp_path / "node", *_node_args(seed, corpus), "--metrics-port", "0", command="node"
    )
    author = Identity.load(node.data_dir / "identity.pem").author
    observer = local_peer("observer", join=[seed.maddrs[0]])
    genesis = base_id(tiny_base)
    found = wait_for(lambda: _announcements(observer, genesis, author), 240, "the node's delta")
    announcement = found[0]  # the latest round's: each round's delta replaces the last
    assert announcement.loss_after < _genesis_loss(tiny_base, corpus)  # it learned something
    assert announcement.steps == 8 and announcement.round == 0

    store = BlobStore(tmp_path / "observer" / "blobs")
    fetch(observer, store, announcement.delta_id, timeout=60, serve_while_fetching=False)
    with DeltaReader(store.path(announcement.delta_id)) as reader:
        assert reader.header.author == author and reader.header.base_id == genesis
        assert reader.header.sparsifier.drop_rate == 0.5
        assert reader.header.metadata["steps"] == 8
    child = apply_deltas(tiny_base, [store.path(announcement.delta_id)], tmp_path / "child")
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(child)

    port = int((node.data_dir / "metrics_port").read_text())
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    published = [
        ln for ln in metrics.splitlines() if ln.startswith("mergeswarm_deltas_published_total ")
    ]
    assert float(published[0].split()[1]) >= 1
    health = json.loads(
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10).read()
    )
    assert health["ok"] and health["swarm"] == observer.swarm_id
    ready = urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10)
    assert ready.status == 200 and json.loads(ready.read()) == {"ready": True}

    status = _status(node)
    assert status["swarm_id"] == observer.swarm_id and status["head_round"] == 0
    assert status["rounds_done"] >= 1 and len(status["announced"]) == 1  # one per base
    assert run_cli("node", "pause", "--data-dir", str(node.data_dir)).returncode == 0
    wait_for(lambda: _status(node)["status"] == "paused", 60, "the node to pause")
    rounds = _status(node)["rounds_done"]
    assert _status(node)["rounds_done"] == rounds  # nothing moves while paused
    assert run_cli("node", "resume", "--data-dir", str(node.data_dir)).returncode == 0
    wait_for(lambda: _status(node)["rounds_done"] > rounds, 60, "training to go on")

    # kill -9 and restart: same peer, the delta is announced and served again, training resumes
    peer_id = node.peer_id
    step_before = _checkpoint_step(node.data_dir)
    node.kill9()
    again = start_peer(node.data_dir, *_node_args(seed, corpus), command="node")
    assert again.peer_id == peer_id
    wait_for(
        lambda: again.peer_id in {p.peer_id for p in providers(observer, announcement.delta_id)},
        60,
        "the restarted node to serve its delta",
    )
    wait_for(lambda: _checkpoint_step(node.data_dir) > step_before, 240, "training to resume")
    assert _checkpoint_step(node.data_dir) > step_before >= 8


def _status(node) -> dict:
    out = run_cli("node", "status", "--json", "--data-dir", str(node.data_dir), timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _genesis_loss(model, corpus) -> float:
    from node.config import TrainOptions
    from node.training.data import load_dataset
    from node.training.tiny_model import build_tokenizer
    from node.training.trainer import Trainer

    data = load_dataset([corpus], build_tokenizer(), seq_len=32)
    options = TrainOptions(seq_len=32, batch_size=4, eval_blocks=4)
    return Trainer(model, data, options).evaluate()


def _node_args(seed, corpus) -> tuple[str, ...]:
    return ("--join", seed.maddrs[0], "--data", str(corpus), *TRAIN)


def _checkpoint_step(data_dir) -> int:
    latest = data_dir / "checkpoint" / "latest"
    if not latest.is_file():
        return 0
    state = data_dir / "checkpoint" / latest.read_text().strip() / "state.json"
    return json.loads(state.read_text())["step"] if state.is_file() else 0


def _read(path) -> str | None:
    return path.read_text().strip() if path.is_file() else None


@pytest.mark.parametrize("point", ["publish:stored", "publish:saved"])
def test_kill_9_during_publication_loses_no_announced_delta(
    tmp_path, local_peer, tiny_base, corpus, point
):
    seed = start_peer(tmp_path / "seed", "--publish-head", str(tiny_base), "--no-mirror")
    args = _node_args(seed, corpus)
    node = start_peer(tmp_path / "node", *args, command="node", env={ENV_CRASH: point})
    assert node.proc.wait(timeout=240) == -9, node.log_tail()
    leftovers = set((node.data_dir / "tmp").iterdir())  # the killed run's half-written files
    assert bool(leftovers) == (point == "publish:stored")
    recorded = [
        a["delta_id"]
        for a in json.loads(_read(node.data_dir / "node.json") or "{}").get("announced", [])
    ]
    assert recorded == ([] if point == "publish:stored" else recorded[:1]) and len(recorded) < 2

    again = start_peer(node.data_dir, *args, command="node")
    assert again.peer_id == node.peer_id
    author = Identity.load(node.data_dir / "identity.pem").author
    observer = local_peer("observer", join=[seed.maddrs[0]])
    genesis = base_id(tiny_base)
    found = wait_for(lambda: _announcements(observer, genesis, author), 240, "an announcement")
    if recorded:  # recorded before the kill: announced after the restart, not lost
        assert found[0].delta_id == recorded[0]
    store = BlobStore(tmp_path / "observer" / "blobs")
    fetch(observer, store, found[0].delta_id, timeout=60, serve_while_fetching=False)
    with DeltaReader(store.path(found[0].delta_id)) as reader:
        assert reader.header.author == author and reader.header.base_id == genesis
    # the restarted node trains on: stop it (its publication in progress finishes) before
    # reading its store and its state, which a running node may be between writing
    assert again.stop() == 0, again.log_tail()
    own = BlobStore(node.data_dir / "blobs")
    pinned = {b for b in own.ids() if OWN_DELTA_PIN in own.pins(b)}
    announced = {a["delta_id"] for a in json.loads(_read(node.data_dir / "node.json"))["announced"]}
    assert pinned <= announced  # a delta stored but never announced does not stay pinned
    assert not leftovers & set((node.data_dir / "tmp").iterdir())  # the restart dropped them


def test_a_head_record_that_fails_validation_is_dropped_and_counted(tmp_path, corpus):
    import hivemind
    from hivemind.utils import get_dht_time

    from protocol.records import Head, sign_record

    seed = start_peer(tmp_path / "seed", "--no-mirror")
    node = start_peer(
        tmp_path / "node", *_node_args(seed, corpus), "--metrics-port", "0", command="node"
    )
    swarm_id = (seed.data_dir / "swarm_id").read_text().strip()
    # A peer without the swarm's validator, so that nothing stops it before the others do.
    hostile = hivemind.DHT(initial_peers=[seed.maddrs[0]], host_maddrs=[LOOPBACK], start=True)
    try:
        forger = Identity.generate()
        head = Head(base_id="ab" * 32, round=7, parent="ef" * 32, deltas=0, snapshot_id="cd" * 32)
        expires = get_dht_time() + 300
        key, data = sign_record(forger, swarm_id, "head", "", head, expires)
        tampered = json.loads(data) | {"body": head.model_dump() | {"round": 8}}
        forged = json.dumps(tampered, sort_keys=True, separators=(",", ":")).encode()
        hostile.store(key, forged, expires, subkey=forger.author)  # refused by every peer
        port = int(wait_for(lambda: _read(node.data_dir / "metrics_port"), 60, "metrics"))
        wait_for(
            lambda: _metric(port, 'mergeswarm_records_rejected_total{reason="bad_signature"}'),
            120,
            "the forged head to be counted",
        )
    finally:
        hostile.shutdown()
    assert _status(node)["status"] == "waiting for a head"
    assert list((node.data_dir / "bases").iterdir()) == []


def _metric(port: int, series: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    found = [ln for ln in text.splitlines() if ln.startswith(series + " ")]
    return float(found[0].split()[1]) if found else 0.0
