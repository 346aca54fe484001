"""The volunteer role: sync the head, train a round, publish the DARE delta, follow new heads.

Two threads: the daemon's housekeeping loop (records, heartbeats, head
following; :meth:`Volunteer.tick`) and the training loop
(:meth:`Volunteer.train_forever`). Everything lives in the data directory:

    bases/<base id>/     model directories, each checked against its id
    checkpoint/          trainer state (weights, optimizer moments, step, data position)
    residual/            error feedback: what the deltas left out (node.volunteer.feedback)
    node.json            the head trained on and the deltas announced (re-announced on restart)
    blobs/               the blob store (own deltas pinned until merged or expired)
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path

from tqdm import tqdm

from node.chain.bases import Bases
from node.chain.history import (
    ConfigWatch,
    current_head,
    descends,
    head_blobs,
    publish_both,
    sync_head,
    trusted_authors,
    withdraw_both,
)
from node.config import VolunteerSettings
from node.daemon.faults import crash_point
from node.daemon.metrics import NodeMetrics
from node.daemon.peer import PeerDaemon
from node.net.blobstore import OWN_DELTA_PIN, BlobStore
from node.net.member import SwarmMember
from node.training.data import Dataset, load_dataset
from node.training.trainer import Trainer
from node.volunteer.feedback import Feedback
from protocol.delta import TensorMap, create_delta
from protocol.durable import write_atomic
from protocol.errors import MergeswarmError
from protocol.forkchoice import head_order
from protocol.model_dir import ModelDir
from protocol.records import ANNOUNCE, DeltaAnnouncement, Head, Heartbeat
from protocol.swarm_config import SwarmConfig, load_swarm_config

logger = logging.getLogger(__name__)

ANNOUNCE_TTL = 6 * 3600.0  # refreshed while the daemon runs; well under the 24 h cap
STATE_FILE = "node.json"
CONFIG_FILE = "swarm.toml"  # the swarm's config, as adopted (or pinned)
LOG_EVERY = 10  # steps between training log lines when no progress bar is shown
FEEDBACK_ROUNDS = 8  # what a delta left out is carried to heads at most this many rounds on


class Volunteer(PeerDaemon):
    role = "volunteer"

    def __init__(self, swarm: SwarmMember, store: BlobStore, settings: VolunteerSettings) -> None:
        super().__init__(swarm, store, settings)
        self.settings = settings
        self.root = swarm.data_dir
        self.config = self._pinned_config()
        self.configs = ConfigWatch(swarm)
        self.configs.read_at = time.monotonic()  # the pinned or adopted one is fresh
        self.bases = Bases(self.root / "bases", store, lambda blob: self.fetch(blob, timeout=600))
        self.scratch = self.root / "tmp"  # half-written files of a killed run are dropped here
        shutil.rmtree(self.scratch, ignore_errors=True)
        self.scratch.mkdir()
        self.head: Head | None = None  # the head being trained on
        self.latest: Head | None = None  # the newest head seen
        self.new_head = threading.Event()
        self.paused = threading.Event()  # set: training waits between steps
        self.publish_now = threading.Event()  # set: end the round after the current step
        self.status = "waiting for a head"
        self.rounds_done = 0
        self.state = self._load_state()
        self.feedback = Feedback(self.root / "residual")
        self._data: Dataset | None = None
        self.samples_per_second = 0.0
        self.published = 0  # deltas announced since start

    def new_metrics(self) -> NodeMetrics:
        return NodeMetrics()

    # -- the swarm's config --------------------------------------------------------------------

    def _pinned_config(self) -> SwarmConfig | None:
        """--swarm-config, else the config adopted on an earlier run (trust on first use)."""
        path = self.settings.swarm_config or self.root / CONFIG_FILE
        if self.settings.swarm_config is None and not path.is_file():
            return None
        config = load_swarm_config(path)
        if config.swarm_id != self.swarm.swarm_id:
            raise MergeswarmError(
                f"{path} is the config of swarm {config.swarm_id!r}, not {self.swarm.swarm_id!r}"
            )
        return config

    def adopt_config(self) -> None:
        """Take the swarm's config once it is in sight, and each handover of it after that
        (node.chain.history.ConfigWatch; never with a pinned --swarm-config)."""
        if self.settings.swarm_config is not None:
            return
        chain = self.configs.newer(self.config)
        if chain is None:
            return
        config = chain.latest
        write_atomic(self.root / CONFIG_FILE, config.to_toml().encode())
        if self.config is None:
            logger.info("adopted the config of swarm %s", config.swarm_id)
        else:
            logger.warning(
                "the swarm was handed over: config epoch %d, %d aggregators",
                config.epoch,
                len(config.aggregators),
            )
        self.config = config

    @property
    def trusted(self) -> set[str] | None:
        """Whose heads count (None: nobody's until the swarm's config is in sight)."""
        return trusted_authors(self.swarm, self.config, self.settings.trusted_aggregators)

    def rule(self, name: str):
        """A swarm-wide rule (drop rate, codec, rebase policy): the swarm's config wins."""
        return getattr(self.config if self.config else self.settings, name)

    # -- state that survives restarts ---------------------------------------------------------

    def _load_state(self) -> dict:
        path = self.root / STATE_FILE
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except ValueError:
                logger.warning("%s is unreadable; starting with empty state", path)
        return {"announced": []}

    def _announce(self, announcement: DeltaAnnouncement) -> None:
        """Announce (and keep refreshing) a delta under its base's shared key, and under this
        author's owned topic, where aggregators look for established authors when a crowd
        of throwaway keys fills the shared one."""
        publish_both(self.swarm, ANNOUNCE, announcement, ANNOUNCE_TTL, announcement.base_id)

    def _save_state(self) -> None:
        write_atomic(self.root / STATE_FILE, json.dumps(self.state, indent=2).encode())

    def reannounce(self) -> None:
        """After a restart: announce again every delta that is still pinned (not yet merged).

        A delta stored but never recorded as announced (killed in between) is unpinned: it
        was never offered, and the resumed training makes a fresh one.
        """
        recorded = {item.get("delta_id") for item in self.state["announced"]}
        for blob_id in self.store.ids():
            if blob_id not in recorded and OWN_DELTA_PIN in self.store.pins(blob_id):
                self.store.unpin(blob_id, OWN_DELTA_PIN)
        for item in self.state["announced"]:
            try:
                announcement = DeltaAnnouncement.model_validate_json(json.dumps(item))
            except ValueError as exc:
                logger.warning("%s: skipping an unreadable announcement (%s)", STATE_FILE, exc)
                continue
            delta = announcement.delta_id
            if self.store.has(delta) and OWN_DELTA_PIN in self.store.pins(delta):
                self._announce(announcement)

    # -- housekeeping thread -------------------------------------------------------------------

    def tick(self) -> None:
        super().tick()
        self.follow_head()
        m = self.metrics
        if self.latest is not None:
            m.head_round.set(self.latest.round)
            if self.head is not None:
                m.head_lag.set(self.latest.round - self.head.round)

    def heartbeat(self) -> Heartbeat:
        beat = super().heartbeat()
        return beat.model_copy(
            update={
                "samples_per_second": round(self.samples_per_second, 3),
                "deltas_published": self.published,
            }
        )

    def health(self) -> dict:
        return super().health() | {"rounds_done": self.rounds_done}

    def ready(self) -> bool:
        return self.head is not None and self.bases.has(self.head.base_id)

    def follow_head(self) -> None:
        self.adopt_config()
        head = current_head(self.swarm, self.trusted)
        if head is None:
            return
        if self.latest is None or head_order(head) > head_order(self.latest):
            self.latest = head
            if self.head is None or head.base_id != self.head.base_id:
                logger.info("new head: round %d, base %s", head.round, head.base_id[:16])
                self.new_head.set()

    # -- base sync -------------------------------------------------------------------------------

    def sync(self, head: Head) -> Path:
        if not self.bases.has(head.base_id):
            self.status = f"fetching base {head.base_id[:16]}"
        trusted = self.trusted
        if trusted is None:  # a head is followed only once the config is in sight
            raise MergeswarmError("no config of the swarm in sight to check the head against")
        return sync_head(self.swarm, self.bases, head, trusted)

    # -- training thread ---------------------------------------------------------------------------

    def dataset(self, tokenizer_dir: Path) -> Dataset:
        if self._data is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
            self._data = load_dataset(self.settings.data, tokenizer, seq_len=self.settings.seq_len)
        return self._data

    def _wait_for_head(self) -> None:
        if self.trusted is None:
            self.waiting(
                "waiting for the swarm's config",
                "no config from the aggregators this swarm was made with is in sight: check "
                "that an aggregator runs and that --join reaches the swarm",
            )
        else:
            who = f"{len(self.trusted)} aggregator(s)" if self.trusted else "any aggregator"
            self.waiting(
                "waiting for a head",
                f"no head from {who} yet: the swarm's first aggregator publishes round 0 once "
                "started with --genesis",
            )

    def train_forever(self, stop: threading.Event) -> None:
        """Train round after round on the newest head until ``stop`` is set."""
        while not stop.is_set():
            if self.latest is None:
                self._wait_for_head()
                stop.wait(1.0)
                continue
            self.new_head.clear()
            head = self.latest
            try:
                base = self.sync(head)
            except MergeswarmError as exc:  # a bad or unreachable base: keep the old one, retry
                self.metrics.rejected.labels(reason="base").inc()
                logger.warning("%s; retrying in 30 s", exc)
                self.status = "cannot get the head's base"
                stop.wait(30.0)
                continue
            self.head = head
            self.bases.keep_only({head.base_id})  # the next patch needs this base only
            self.bases.release(head_blobs([head]))  # older patches: retention collects them
            self._train_on(head, base, stop)

    def _train_on(self, head: Head, base: Path, stop: threading.Event) -> None:
        s = self.settings
        trainer = Trainer(base, self.dataset(base), s)
        checkpoint = self.root / "checkpoint"
        found = Trainer.latest(checkpoint)
        if found is not None:  # on an older base: its optimizer state and data position only
            trainer.load(found, weights=self._checkpoint_base(found) == head.base_id)
        restart = self.rule("on_new_head") == "restart"
        rounds_here = 0
        while not stop.is_set():
            if s.rounds_per_head is not None and rounds_here >= s.rounds_per_head:
                self.status = f"round {head.round} done; waiting for a new head"
                while not (stop.is_set() or self.new_head.wait(0.5)):
                    pass
                return
            self.status = f"training on round {head.round}"
            loss_before = trainer.evaluate()

            bar = tqdm(total=s.round_steps, desc=f"round {head.round}", unit="step", disable=None)

            def on_step(step: int, loss: float, trainer=trainer, bar=bar) -> None:
                self.metrics.loss.set(loss)
                self.metrics.steps.inc()
                self.metrics.samples.inc(s.batch_size * s.grad_accum)
                if trainer.step % s.checkpoint_every == 0:
                    trainer.save(checkpoint, {"base_id": head.base_id})
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                bar.update()
                if bar.disable and trainer.step % LOG_EVERY == 0:  # no terminal: a log line instead
                    fields = {"round": head.round, "step": trainer.step, "loss": round(loss, 5)}
                    logger.info(
                        "round %d, step %d: loss %.4f",
                        head.round,
                        trainer.step,
                        loss,
                        extra={"fields": fields},
                    )

            def should_stop(head=head) -> bool:
                while self.paused.is_set() and not stop.is_set():
                    self.status = "paused"
                    stop.wait(0.5)
                self.status = f"training on round {head.round}"
                return stop.is_set() or (restart and self.new_head.is_set())

            stats = trainer.train_round(
                max_steps=s.round_steps,
                max_seconds=s.round_minutes * 60 if s.round_minutes else None,
                should_stop=should_stop,
                should_finish=self.publish_now.is_set,
                on_step=on_step,
            )
            bar.close()
            self.publish_now.clear()
            trainer.save(checkpoint, {"base_id": head.base_id})
            if stop.is_set() or stats.stopped == "interrupted" or stats.steps == 0:
                return  # stopping, or restarting on the new head
            self.samples_per_second = stats.samples / max(stats.seconds, 1e-9)
            self.metrics.samples_per_second.set(self.samples_per_second)
            loss_after = trainer.evaluate()
            self.metrics.heldout_loss.set(loss_after)
            self.status = "publishing a delta"
            self.publish_delta(head, base, trainer, stats, loss_before, loss_after)
            self.rounds_done += 1
            rounds_here += 1
            if self.new_head.is_set():
                return  # move to the new head

    @staticmethod
    def _checkpoint_base(found: Path) -> str | None:
        try:
            return json.loads((found / "state.json").read_text()).get("base_id")
        except (OSError, ValueError):
            return None

    def _carry(self, head: Head, base: Path) -> dict:
        """What earlier deltas left out, to add to this one (error feedback)."""
        shapes = {n: tuple(info.shape) for n, info in ModelDir(base).tensors.items()}
        trusted = self.trusted or set()

        def merged_from(ancestor: str) -> bool:
            return descends(self.swarm, head, ancestor, trusted, within=FEEDBACK_ROUNDS)

        return self.feedback.carry_for(head, shapes, merged_from)

    def publish_delta(self, head, base, trainer, stats, loss_before, loss_after) -> str:
        """Delta = trained - base, DARE-sparsified, signed, stored, announced and served."""
        started = time.monotonic()
        with tempfile.TemporaryDirectory(dir=self.scratch) as tmp:
            out = Path(tmp) / "delta.msd"
            metadata = {
                "round": head.round,
                "steps": stats.steps,
                "samples": stats.samples,
                "loss_before": round(loss_before, 6),
                "loss_after": round(loss_after, 6),
            }
            feedback = self.rule("error_feedback")
            carry = self._carry(head, base) if feedback else None
            left = {} if feedback else None
            delta_id, header = create_delta(
                base,
                TensorMap(trainer.trained_weights()),
                out,
                identity=self.swarm.identity,
                drop_rate=self.rule("drop_rate"),
                codec=self.rule("codec"),
                metadata=metadata,
                carry=carry,
                left=left,
            )
            if left is not None:
                self.feedback.record(head, left)
            self.store.add_file(out, pin=OWN_DELTA_PIN)
            crash_point("publish:stored")  # the temporary copy is still on disk here
        announcement = DeltaAnnouncement(
            base_id=head.base_id,
            delta_id=delta_id,
            size=self.store.size(delta_id),
            round=head.round,
            samples=stats.samples,
            steps=stats.steps,
            loss_before=metadata["loss_before"],
            loss_after=metadata["loss_after"],
        )
        # One delta per author and base: this one replaces; and a delta on a base further
        # behind than the staleness window will never be merged: it is no longer offered.
        oldest = head.round - (self.config.staleness if self.config else 0)
        kept, dropped = [], []
        for old in self.state["announced"]:
            gone = old["base_id"] == head.base_id or old.get("round", 0) < oldest
            (dropped if gone else kept).append(old)
        for old in dropped:
            if old["delta_id"] != delta_id:
                self.store.unpin(old["delta_id"], OWN_DELTA_PIN)
            if old["base_id"] != head.base_id:
                withdraw_both(self.swarm, ANNOUNCE, old["base_id"])
        self.state["announced"] = [*kept, announcement.model_dump(mode="json")]
        self.state["head"] = head.base_id
        self._save_state()  # before announcing: a crash after it re-announces on restart
        crash_point("publish:saved")
        self._announce(announcement)
        crash_point("publish:announced")
        self.share_new_blobs()  # provider record, or a push when others cannot dial us
        self.metrics.deltas.inc()
        self.published += 1
        self.metrics.publish_seconds.observe(time.monotonic() - started)
        seconds = time.monotonic() - started
        logger.info(
            "round %d: delta %s (%d bytes) announced %.1f s after training; loss %.4f -> %.4f",
            head.round,
            delta_id[:16],
            announcement.size,
            seconds,
            loss_before,
            loss_after,
            extra={"fields": announcement.model_dump(mode="json") | {"seconds": round(seconds, 3)}},
        )
        return delta_id
