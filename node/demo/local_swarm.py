"""The embedded main job: a whole swarm on 127.0.0.1 that trains, merges and reports.

1. Make the genesis base: pretrain a small causal LM briefly on text shipped with
   Python (``tiny``), or write SmolLM2-135M from its offline package (``smollm2-135m``).
2. ``mergeswarm init`` a swarm; start a bootstrap aggregator (holding the genesis), a
   standby aggregator and one volunteer per domain, each a real process with its own
   libp2p daemon, each volunteer training on a different kind of text.
3. Watch the heads from a peer of its own: at every new head, fetch it the way any
   peer would (patch or snapshot, id checked) and measure each domain's held-out loss.
4. Stop every process it started.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from node.config import TrainOptions
from node.daemon.launch import (
    LOOPBACK,
    SHARED_CORES_ENV,
    PeerStartError,
    kill_group,
    launch_peer,
)
from node.data_dir import DataDir
from node.demo.domains import DOMAINS, domain_texts
from protocol.constants import DEFAULT_DROP_RATE
from protocol.records import HEARTBEAT

logger = logging.getLogger(__name__)

SEQ_LEN = 64  # tokens per training and held-out block, for every demo model


@dataclass(frozen=True)
class DemoModel:
    """A model the demo (and scripts/bench_quality.py) runs: its genesis and how volunteers
    train on it (the benchmark's experts and joint training train the same way).

    :param drop_rate: the volunteers' DARE drop rate (a tiny model has far less redundancy
        than a pretrained one, so it drops less).
    """

    name: str
    train: TrainOptions
    round_steps: int
    drop_rate: float


DEMO_MODELS = {
    # lr: where the tiny genesis's schedule ended (3e-3 decayed to a tenth): no jolt
    "tiny": DemoModel(
        "tiny",
        TrainOptions(seq_len=SEQ_LEN, batch_size=8, lr=3e-4, warmup_steps=5, eval_blocks=8),
        round_steps=30,
        drop_rate=0.5,
    ),
    # full fine-tuning at a pretrained model's usual fine-tuning lr; about 2 s a step here
    "smollm2-135m": DemoModel(
        "smollm2-135m",
        TrainOptions(seq_len=SEQ_LEN, batch_size=4, lr=1e-4, warmup_steps=1, eval_blocks=4),
        round_steps=6,
        drop_rate=DEFAULT_DROP_RATE,
    ),
}


def volunteer_flags(options: TrainOptions) -> tuple[str, ...]:
    """``mergeswarm node`` flags that train as ``options`` says."""
    flags = ("--seq-len", str(options.seq_len), "--batch-size", str(options.batch_size))
    flags += ("--lr", str(options.lr), "--warmup-steps", str(options.warmup_steps))
    flags += ("--eval-blocks", str(options.eval_blocks), "--device", options.device)
    return flags + (("--lora", "--lora-rank", str(options.lora_rank)) if options.lora else ())


HEARTBEAT_EVERY = 1.0  # seconds: the per-round byte counts come from heartbeats


@dataclass
class RoundRow:
    round: int
    base_id: str
    deltas_merged: int
    bytes_moved: int
    loss: dict[str, float]


@dataclass
class DemoResult:
    genesis_id: str
    genesis_loss: dict[str, float]
    rounds: list[RoundRow] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {
            "genesis": {"base_id": self.genesis_id, "loss": self.genesis_loss},
            "rounds": [vars(r) for r in self.rounds],
            "seconds": round(self.seconds, 2),
        }


def write_domain_data(workdir: Path, domains: list[str]) -> dict[str, Path]:
    out = {}
    for name in domains:
        path = workdir / "data" / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in domain_texts(name)))
        out[name] = path
    return out


def make_genesis(
    model: DemoModel, out: Path, data: dict[str, Path], pretrain_steps: int, log: Callable
) -> Path:
    """The genesis of ``model`` in ``out`` (kept when already there)."""
    if (out / "config.json").is_file():
        return out
    if model.name == "tiny":
        log(f"[1/4] pretraining a small genesis model on Python's own text ({', '.join(data)})")
        return pretrain_genesis(out, data, pretrain_steps, log)
    from node.training.genesis import write_genesis

    log(f"[1/4] writing the genesis: {model.name} from its offline package (about 30 s)")
    write_genesis(out, model=model.name, dtype="float32")
    return out


def pretrain_genesis(out: Path, data: dict[str, Path], steps: int, log: Callable) -> Path:
    """A small Llama-architecture model, its tokenizer trained on every domain, pretrained
    ``steps`` steps on a mix of them (the volunteers then specialise it)."""
    from node.training.data import load_mixture
    from node.training.tiny_model import build_tiny_model
    from node.training.trainer import Trainer

    texts = [t for name in data for t in domain_texts(name)]
    raw = out.with_name(out.name + "-init")
    build_tiny_model(
        raw, hidden_size=128, layers=4, intermediate_size=256, corpus=texts, vocab_size=1024
    )
    from transformers import AutoTokenizer

    dataset = load_mixture(list(data.values()), AutoTokenizer.from_pretrained(raw), seq_len=SEQ_LEN)
    options = TrainOptions(
        seq_len=SEQ_LEN, batch_size=16, lr=3e-3, warmup_steps=10, decay_steps=steps
    )
    trainer = Trainer(raw, dataset, options)
    stats = trainer.train_round(max_steps=steps, max_seconds=None)
    log(
        f"  pretrained {stats.steps} steps in {stats.seconds:.0f} s; held-out loss {trainer.evaluate():.3f}"
    )
    return save_trained(trainer, raw, out)


def save_trained(trainer, template: Path, out: Path) -> Path:
    """The trainer's weights as a model directory shaped like ``template`` (its dtypes)."""
    from protocol.model_dir import ModelDir, write_model_dir

    weights = trainer.trained_weights()
    with ModelDir(template) as md:
        write_model_dir(out, md, ((n, weights[n].to(md.tensor(n).dtype)) for n in md.names()))
    return out


class Processes:
    """The swarm's daemons: started with their logs in ``logs/``, all killed by :meth:`stop`."""

    def __init__(self, workdir: Path) -> None:
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.running: list[subprocess.Popen] = []
        self.env = os.environ | SHARED_CORES_ENV | {"MERGESWARM_LOG_FORMAT": "json"}

    def start(self, name: str, *args: str, data_dir: Path) -> list[str]:
        """Start ``mergeswarm ARGS`` and return its multiaddrs once it is up."""
        cmd = [sys.executable, "-m", "node.cli", *args, "--data-dir", str(data_dir)]
        cmd += ["--host-maddr", LOOPBACK, "--heartbeat-every", str(HEARTBEAT_EVERY)]
        try:
            peer = launch_peer(
                name, cmd, data_dir=data_dir, log=self.logs / f"{name}.log", env=self.env,
                started=self.running.append,
            )  # fmt: skip
        except PeerStartError as exc:
            raise RuntimeError(f"{name} did not start: {exc}") from None
        return peer.maddrs

    def start_all(self, peers: Sequence[tuple[str, Sequence[str], Path]]) -> None:
        """Start ``(name, args, data_dir)`` daemons side by side; return once all are up."""
        with ThreadPoolExecutor(len(peers)) as pool:
            waits = [pool.submit(self.start, name, *args, data_dir=d) for name, args, d in peers]
            for wait in waits:
                wait.result()

    def stop(self) -> None:
        for proc in self.running:
            if proc.poll() is None:
                kill_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc in self.running:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                kill_group(proc, signal.SIGKILL)
                proc.wait(timeout=10)
        self.running.clear()


@dataclass(frozen=True)
class SwarmSetup:
    genesis: Path
    data: dict[str, Path]  # domain -> JSONL file
    config: Path  # swarm.toml
    aggregators: list[Path]  # their data directories (keys made, trusted by the config)


def prepare_swarm(
    workdir: Path,
    *,
    model: DemoModel = DEMO_MODELS["tiny"],
    volunteers: int = 3,
    pretrain_steps: int = 400,
    drop_rate: float | None = None,
    genesis: Path | None = None,
    merge_method: str = "linear",
    lam: float = 1.0,
    round_period: float = 3.0,
    rules: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> SwarmSetup:
    """The demo swarm's files: domain data, the genesis, the aggregators' keys and swarm.toml
    (also what ``mergeswarm demo --prepare DIR`` writes for docker/compose.yaml).

    :param rules: more ``mergeswarm init`` flags (they win over the demo's own).
    """
    if not 1 <= volunteers <= len(DOMAINS):
        raise ValueError(f"--volunteers must be 1 to {len(DOMAINS)} (one per domain)")
    workdir.mkdir(parents=True, exist_ok=True)
    domains = list(DOMAINS)[:volunteers]
    data = write_domain_data(workdir, domains)
    if genesis is None:
        genesis = make_genesis(model, workdir / "genesis", data, pretrain_steps, log)
    drop_rate = model.drop_rate if drop_rate is None else drop_rate
    log("[2/4] writing the swarm config (mergeswarm init)")
    agg_dirs = [workdir / "aggregator-1", workdir / "aggregator-2"]
    config = workdir / "swarm.toml"
    _cli(
        "init", "--genesis", str(genesis), "-o", str(config), "--force",
        "--round-period", str(round_period), "--min-deltas", str(volunteers), "--staleness", "0",
        "--on-new-head", "restart", "--drop-rate", str(drop_rate), "--merge-method", merge_method,
        "--lambda", str(lam), "--density", "0.5", "--snapshot-every", "1000",
        *(a for d in agg_dirs for a in ("--aggregator-dir", str(d))), *rules,
    )  # fmt: skip
    return SwarmSetup(genesis, data, config, agg_dirs)


def run_swarm_demo(
    workdir: Path,
    *,
    model: DemoModel = DEMO_MODELS["tiny"],
    rounds: int = 3,
    volunteers: int = 3,
    round_steps: int | None = None,
    pretrain_steps: int = 400,
    drop_rate: float | None = None,
    genesis: Path | None = None,
    merge_method: str = "linear",
    lam: float = 1.0,
    rules: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Run the demo in ``workdir``; ``genesis`` skips making one and starts from that model.

    :param round_steps: each volunteer's steps per head (default: the model's).
    :param rules: more ``mergeswarm init`` flags, e.g. ``("--outer-optimizer", "nesterov")``.
    """
    from node.chain.bases import Bases
    from node.chain.history import chain_back, current_head
    from node.config import SwarmOptions
    from node.net.blobs import fetch
    from node.net.blobstore import BlobStore
    from node.net.swarm import Swarm
    from protocol.ids import base_id
    from protocol.model_dir import ModelDir

    started = time.monotonic()
    # SIGTERM unwinds like Ctrl-C, so that the finally below stops every daemon started here.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    round_steps = round_steps or model.round_steps
    setup = prepare_swarm(
        workdir,
        model=model,
        volunteers=volunteers,
        pretrain_steps=pretrain_steps,
        drop_rate=drop_rate,
        genesis=genesis,
        merge_method=merge_method,
        lam=lam,
        rules=rules,
        log=log,
    )
    genesis, data, config, agg_dirs = setup.genesis, setup.data, setup.config, setup.aggregators
    domains = list(data)
    evals = eval_sets(genesis, data)
    result = DemoResult(base_id(ModelDir(genesis)), domain_losses(genesis, evals))
    genesis_id = result.genesis_id
    procs = Processes(workdir)
    observer = None
    try:
        log(f"[3/4] starting 2 aggregators and {volunteers} volunteers on 127.0.0.1")
        agg = ("aggregator", "--config", str(config), "--lease-seconds", "10")
        bootstrap = procs.start(
            "aggregator-1", *agg, "--genesis", str(genesis), data_dir=agg_dirs[0]
        )[0]
        # The standby holds the genesis too: it need not download a real model's 538 MB
        # snapshot from volunteers that are busy training.
        peers = [
            ("aggregator-2", (*agg, "--join", bootstrap, "--genesis", str(genesis)), agg_dirs[1])
        ]
        train = ("--round-steps", str(round_steps), *volunteer_flags(model.train))
        train += ("--rounds-per-head", "1")  # one round per head: the rounds stay in step
        for name, path in data.items():
            args = ("node", "--join", bootstrap, "--data", str(path), *train)
            peers.append((f"volunteer-{name}", args, workdir / f"volunteer-{name}"))
        procs.start_all(peers)
        observer = Swarm(
            SwarmOptions(workdir / "observer", join=[bootstrap], host_maddrs=[LOOPBACK])
        )
        store = BlobStore(DataDir(workdir / "observer").blobs)
        bases = Bases(
            workdir / "observer" / "bases", store, lambda b: fetch(observer, store, b, timeout=300)
        )
        trusted = {author_of(d) for d in agg_dirs}
        log(f"[4/4] running {rounds} rounds (each: train {round_steps} steps, publish, merge)")
        _print_header(domains, log)
        _print_row("genesis", genesis_id, 0, 0, result.genesis_loss, domains, log)
        moved_before = _bytes_moved(observer)
        last_round = 0
        deadline = time.monotonic() + 600 * rounds
        while last_round < rounds:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"no round {last_round + 1} after {600 * rounds} s; see {procs.logs}"
                )
            head = current_head(observer, trusted)
            if head is None or head.round <= last_round:
                time.sleep(0.5)
                continue
            time.sleep(HEARTBEAT_EVERY * 1.5)  # the peers' byte counts catch up with the round
            moved = _bytes_moved(observer)
            for step in chain_back(observer, head, trusted, bases.has):  # rounds missed, too
                path = bases.sync(step)
                if step.round <= last_round or step.round > rounds:
                    continue
                loss = domain_losses(path, evals)
                row = RoundRow(step.round, step.base_id, step.deltas, moved - moved_before, loss)
                moved_before = moved
                result.rounds.append(row)
                _print_row(str(row.round), row.base_id, row.deltas_merged, row.bytes_moved,
                           row.loss, domains, log)  # fmt: skip
                last_round = step.round
    finally:
        if observer is not None:
            observer.shutdown()
        procs.stop()
    result.seconds = time.monotonic() - started
    return result


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "node.cli", *args], check=True, capture_output=True)


def author_of(data_dir: Path) -> str:
    from protocol.identity import Identity

    return Identity.load(DataDir(data_dir).identity).author


def eval_sets(genesis: Path, data: dict[str, Path]) -> dict:
    from transformers import AutoTokenizer

    from node.training.data import load_dataset

    tokenizer = AutoTokenizer.from_pretrained(genesis)
    return {name: load_dataset([path], tokenizer, seq_len=SEQ_LEN) for name, path in data.items()}


def domain_losses(model_dir: Path, evals: dict) -> dict[str, float]:
    from node.training.trainer import heldout_loss

    return {name: round(heldout_loss(model_dir, d, blocks=32), 4) for name, d in evals.items()}


def _bytes_moved(observer) -> int:
    """Blob bytes all peers have received, by their latest heartbeats."""
    return sum(r.body.bytes_in for r in observer.read(HEARTBEAT))


def _print_header(domains: list[str], log: Callable) -> None:
    cols = "".join(f"{'loss ' + d:>14}" for d in domains)
    log(f"{'round':>7}  {'head':<16} {'deltas':>6} {'bytes moved':>12}{cols}")


def _print_row(label, base, deltas, moved, loss, domains, log) -> None:
    cols = "".join(f"{loss[d]:>14.4f}" for d in domains)
    log(f"{label:>7}  {base[:16]:<16} {deltas:>6} {moved:>12,}{cols}")
