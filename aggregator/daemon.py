"""The aggregator role: each round, merge the announced deltas into the head and publish the child.

Two threads, as for the volunteer: housekeeping (:meth:`Aggregator.tick`:
records, heartbeats, following the head, keeping a held lease alive) and the
round loop (:meth:`Aggregator.run_rounds`). One round:

1. wait ``round_period`` seconds after the head appeared, and for ``min_deltas``;
2. take the round's lease (earliest live claim wins) naming the deltas it will
   merge: at most one per author, trained on the head or on an ancestor within
   the staleness window;
3. fetch and inspect each one (signature, author, base, layout, finite values),
   screen their norms against the round's median, discount stale ones;
4. merge them into the head with the swarm's recipe (streaming, deterministic) and
   apply the merged delta with the swarm's outer optimizer, stepping from the
   momentum the head names (aggregator.outer);
5. optionally refuse a child whose loss on an evaluation set rose too far;
6. store the patch (and a snapshot every ``snapshot_every`` rounds) and the new
   momentum, then announce the head.

A standby that sees the lease lapse before a head appears takes the round
over with the deltas the lapsed lease named, so the round publishes the same
base whichever aggregator finishes it. Every aggregator holds the momentum of
the head it follows (and seeds mirror it), so the chain continues exactly after
any one of them dies. Nothing is announced before the blobs
it names are stored, so a kill -9 at any instant publishes nothing half-made.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hivemind.utils import get_dht_time

from aggregator.engine import REPORT_FILE, MergeInput, merge_models
from aggregator.gate import EvalGate
from aggregator.methods import Recipe
from aggregator.outer import OuterStep, outer_lr
from aggregator.reputation import Reputation
from aggregator.screening import (
    Admitted,
    Candidate,
    Rejected,
    admit_scored,
    fill_slots,
    inspect_delta,
    rank_candidates,
    weigh_admitted,
)
from node.chain.bases import Bases
from node.chain.history import (
    ConfigWatch,
    base_record,
    current_head,
    head_blobs,
    publish_both,
    publish_head,
    read_owned,
    sync_head,
    withdraw_bases_but,
    withdraw_both,
)
from node.config import AggregatorSettings
from node.daemon.backoff import Backoff
from node.daemon.faults import crash_point
from node.daemon.metrics import AggregatorMetrics
from node.daemon.peer import PeerDaemon
from node.net.blobs import ServeLimits
from node.net.blobstore import HEAD_PIN, MOMENTUM_PIN, BlobStore
from node.net.member import Record, SwarmMember
from node.net.swarm import HEAD_TTL
from protocol.errors import MergeswarmError
from protocol.forkchoice import head_order
from protocol.handover import Handover, config_digest, follow_handovers
from protocol.ids import base_id
from protocol.model_dir import ModelDir, write_model_dir
from protocol.momentum import momentum_size
from protocol.patch import write_patch
from protocol.records import (
    ANNOUNCE,
    CONFIG,
    HANDOVER,
    LEASE,
    MAX_AUTHORS_PER_KEY,
    DeltaAnnouncement,
    Head,
    Lease,
)
from protocol.swarm_config import SwarmConfig

logger = logging.getLogger(__name__)

CONFIG_TTL = 3600.0
CROWDED = MAX_AUTHORS_PER_KEY // 2  # announcers under one base past which a crowd may hide some
OWNED_ANNOUNCE_READS = 64  # established authors whose owned announcements are read then
LEASE_SETTLE = 2.0  # seconds between claiming a lease and trusting that it won
FETCH_TIMEOUT = 300.0
ADMIT_TIMEOUT = 60.0  # seconds a candidate delta has to arrive before its slot goes on
MANIFEST_TIMEOUT = 5.0  # seconds to find one provider of it (a made-up id has none)
ADMIT_PARALLEL = 16  # candidates fetched at once (at least; max_deltas when that is more)
ADMIT_THREADS = 32  # the most a batch can hold: SwarmConfig caps max_deltas at 32
CLOCK_SLACK = 5.0  # seconds two peers' clocks may differ (hivemind refuses more than 3)
MAX_ROUND_SECONDS = 6 * 3600.0  # a lease claimed longer ago than this is no live round's
BACKOFF_MAX = 3600.0  # seconds an unavailable delta is skipped at most before another try
REPUTATION_FILE = "reputation.json"
REPUTATION_WALK = 64  # rounds walked back from a head to count the reputation its chain gives
# a delta merged at this weight or more (before staleness) establishes its author: one that a
# cap or its small gain weighed down bought no influence (else a near-empty delta would)
CREDIT_WEIGHT = 0.5
KEEP_BASES = 3  # the head and its recent ancestors stay on disk (patches need the parent)
MOMENTUM_FILE = "momentum.safetensors"  # in scratch, from the merge until it is published


class Aggregator(PeerDaemon):
    role = "aggregator"

    def __init__(
        self,
        swarm: SwarmMember,
        store: BlobStore,
        config: SwarmConfig,
        settings: AggregatorSettings | None = None,
        handovers: Sequence[Handover] = (),
    ) -> None:
        """``config``: the swarm's first config (epoch 0); ``handovers``: those that follow it,
        in order (protocol.handover). The last config is the one the aggregator runs by."""
        settings = settings or AggregatorSettings()
        super().__init__(
            swarm, store, settings, ServeLimits(max_upload_bytes=config.max_delta_bytes)
        )
        if swarm.swarm_id != config.swarm_id:
            raise MergeswarmError(
                f"the config is for swarm {config.swarm_id!r}, but this peer is in "
                f"{swarm.swarm_id!r}; use another --data-dir"
            )
        if config.epoch != 0:
            raise MergeswarmError(
                f"the config is epoch {config.epoch}: give the swarm's first config (epoch 0) "
                "with --config and each handover after it with --handover, in order"
            )
        self.root_config = config
        self.handovers = list(handovers)
        self.config = follow_handovers(config, self.handovers)[-1]
        self.configs = ConfigWatch(swarm)
        self.configs.read_at = time.monotonic()  # the one it was started with is fresh
        self.settings = settings
        self.lease_seconds = settings.lease_seconds
        self.lease_settle = LEASE_SETTLE
        self.gate = (
            EvalGate(list(settings.eval_data), settings.eval_max_increase)
            if settings.eval_data
            else None
        )
        self.root = swarm.data_dir
        self.scratch = self.root / "tmp"
        shutil.rmtree(self.scratch, ignore_errors=True)
        self.scratch.mkdir()
        self.bases = Bases(
            self.root / "bases", store, lambda blob: self.fetch(blob, timeout=FETCH_TIMEOUT)
        )
        self.head: Head | None = None
        self.head_seen_at = time.monotonic()
        self.chain: dict[str, Head] = {}  # base id -> its head record, for staleness ancestry
        self.holding: Lease | None = None
        self.seen_leases: dict[tuple[int, str], Lease] = {}  # (round, parent) -> last lease seen
        self.refused: set[tuple[str, str]] = set()  # (author, delta id) rejected: never again
        self.admitted: dict[tuple[str, str], float] = {}  # arrived and inspected: its norm
        self.gains: dict[tuple[str, str, str], float] = {}  # (author, delta, head): loss gain
        self.volunteers = settings.allowed_volunteers()  # None: an open swarm
        self.reputation = Reputation(self.root / REPUTATION_FILE)
        # (author, delta id) that did not arrive: skipped from a round period up
        self.unavailable = Backoff(first=config.round_period, cap=BACKOFF_MAX)
        self.status = "starting"
        self.accepted = 0  # deltas merged since start (heart-beaten for the swarm monitor)
        self.rejected: dict[str, int] = {}
        self._counting = threading.Lock()
        self._inspecting = threading.Lock()
        # one pool for the daemon's life (threads start as a batch needs them): a pool per
        # batch came and went with every round, and the soak read its threads as growth
        self._admit_pool = ThreadPoolExecutor(ADMIT_THREADS, thread_name_prefix="admit")
        self.merge_seconds: float | None = None
        if settings.genesis is not None:
            self._adopt_genesis(settings.genesis)
        self._publish_config()

    def new_metrics(self) -> AggregatorMetrics:
        return AggregatorMetrics()

    def _adopt_genesis(self, genesis: Path) -> None:
        gid = self.config.genesis_id
        if self.bases.has(gid):
            return
        found = base_id(ModelDir(genesis))
        if found != gid:
            raise MergeswarmError(
                f"{genesis} is base {found[:16]}, but the swarm config's genesis is {gid[:16]}"
            )
        with ModelDir(genesis) as md:
            write_model_dir(self.bases.path(gid), md, ((n, md.tensor(n)) for n in md.names()))

    # -- housekeeping thread -------------------------------------------------------------------

    def tick(self) -> None:
        super().tick()
        self.follow_handovers()
        self.follow_head()
        if self.holding is not None:  # keep the lease alive while the round runs
            self._claim(self.holding)
        self.metrics.lease_held.set(1 if self.holding else 0)
        if self.head is not None:
            self.metrics.head_round.set(self.head.round)

    def _publish_config(self) -> None:
        """Keep the first config and every handover after it in the DHT (a handover signed by
        aggregators that have since retired lives on in the records of those still here)."""
        if self.root_config.trusts(self.swarm.identity.author):  # the only ones DHT nodes keep
            self.swarm.publish(CONFIG, self.root_config, ttl=CONFIG_TTL)
        previous = self.root_config
        for handover in self.handovers:
            self.swarm.publish(HANDOVER, handover, topic=config_digest(previous), ttl=CONFIG_TTL)
            previous = handover.config

    def follow_handovers(self) -> None:
        """Take up a handover of the swarm that the aggregators endorsed since this one
        started (node.chain.history.ConfigWatch)."""
        chain = self.configs.newer(self.config)
        if chain is None or chain.root != self.root_config:
            return
        self.handovers = chain.handovers
        self.config = chain.latest
        self._publish_config()
        logger.warning(
            "the swarm was handed over: epoch %d, %d aggregators%s",
            self.config.epoch,
            len(self.config.aggregators),
            "" if self.merges else "; this one is not among them and merges no more",
        )

    def _carry_over(self) -> Head | None:
        """The newest head of the epoch before, signed again by this aggregator: the swarm was
        just handed over and no aggregator of this epoch has published a head yet (heads of
        retired aggregators count no more, so one of this epoch must take the chain up)."""
        before = self.root_config if len(self.handovers) == 1 else self.handovers[-2].config
        head = current_head(self.swarm, before.aggregators)
        if head is not None:
            logger.info("taking up round %d from the aggregators of the epoch before", head.round)
            publish_head(self.swarm, head, HEAD_TTL)
        return head

    @property
    def merges(self) -> bool:
        """Whether this aggregator is one of the swarm's (config's) aggregators."""
        return not self.config.aggregators or self.swarm.identity.author in self.config.aggregators

    def follow_head(self) -> None:
        head = current_head(self.swarm, self.config.aggregators)
        if head is None and self.head is None and self.handovers and self.merges:
            head = self._carry_over()
        if head is None:
            return
        if self.head is None or head_order(head) > head_order(self.head):
            self._set_head(head)

    def _set_head(self, head: Head) -> None:
        logger.info("head: round %d, base %s", head.round, head.base_id[:16])
        self.head = head
        self.head_seen_at = time.monotonic()
        self.chain[head.base_id] = head
        self._credit_chain(head)
        # What this aggregator remembers and keeps publishing of the chain stays bounded:
        # the rounds a reputation walk covers, and back to the nearest snapshot.
        kept = self._back_to(head, REPUTATION_WALK)
        self.chain = {h.base_id: h for h in kept}
        withdraw_bases_but(self.swarm, self.chain)

    def _credit_chain(self, head: Head) -> None:
        """Count the reputation that ``head`` gives and that its ancestors not counted yet
        gave (whoever merged them: a standby, or an aggregator that was down, learns whom the
        swarm knows), walking back REPUTATION_WALK rounds at most."""
        h: Head | None = head
        for _ in range(REPUTATION_WALK):
            if h is None or not self.reputation.credit(h.base_id, h.credited) or not h.parent:
                return
            parent = self.chain.get(h.parent) or base_record(
                self.swarm, h.parent, set(self.config.aggregators)
            )
            h = parent if parent is not None and parent.round == h.round - 1 else None

    def heartbeat(self):
        beat = super().heartbeat()
        return beat.model_copy(
            update={
                "deltas_accepted": self.accepted,
                "deltas_rejected": dict(self.rejected),
                "merge_seconds": self.merge_seconds,
                "lease": self.holding is not None,
            }
        )

    def health(self) -> dict:
        return super().health() | {"lease": self.holding is not None}

    def ready(self) -> bool:
        return self.head is not None and self.bases.has(self.head.base_id)

    # -- round thread ----------------------------------------------------------------------------

    def run_rounds(self, stop: threading.Event, interval: float = 1.0) -> None:
        while not stop.is_set():
            try:
                self.step()
            except Exception:  # noqa: BLE001 - a failed round is retried, never fatal
                logger.exception("the round failed; retrying")
                self._release()
                stop.wait(5.0)
            stop.wait(interval)

    def step(self) -> None:
        """One look at the swarm: publish genesis, wait, lease, or run the round."""
        if self.head is None:
            # Read the swarm first: this thread may come before the first housekeeping tick,
            # and a restarted aggregator holding the genesis must not republish round 0 over
            # its own newer head record.
            self.follow_head()
        if not self.merges:
            self.status = (
                f"not an aggregator of epoch {self.config.epoch} of the swarm's config: "
                "waiting for a handover that names this key"
            )
            return
        if self.head is None:
            if self.bases.has(self.config.genesis_id):
                self._publish_genesis()
            else:
                self.waiting(
                    "waiting for a head",
                    "this swarm has no head in sight and this aggregator no genesis: start the "
                    "swarm's first aggregator with --genesis MODEL_DIR (the model given to "
                    "`mergeswarm init --genesis`), or check that --join reaches a running swarm",
                )
            return
        head = self.head
        if not self.bases.has(head.base_id):
            self.status = f"fetching base {head.base_id[:16]}"
            sync_head(self.swarm, self.bases, head, set(self.config.aggregators))
        self._hold_momentum(head)
        waited = time.monotonic() - self.head_seen_at
        if waited < self.config.round_period:
            self.status = (
                f"round {head.round + 1} opens in {self.config.round_period - waited:.0f} s"
            )
            return
        deltas = self._lease(head)
        if deltas is None:
            return
        started = time.monotonic()
        try:
            child = self.run_round(head, deltas)
        finally:
            self._release()
        if child is not None:
            self.metrics.round_seconds.observe(time.monotonic() - started)

    def _hold_momentum(self, head: Head) -> None:
        """Fetch the head's momentum (the next outer step starts from it), checked by its id."""
        blob = head.momentum_id
        if blob is None or self.store.has(blob):
            return
        self.status = f"fetching the momentum of round {head.round}"
        with ModelDir(self.bases.path(head.base_id)) as base:
            size = momentum_size(base)
        self.fetch(blob, timeout=FETCH_TIMEOUT, expected_size=size)
        self.store.pin(blob, MOMENTUM_PIN)
        self._keep_momentum(self._recent(head))

    def _publish_genesis(self) -> None:
        self.status = "publishing the genesis head"
        gid = self.config.genesis_id
        with tempfile.TemporaryDirectory(dir=self.scratch) as tmp:
            path = Path(tmp) / "snapshot.msp"
            write_patch(ModelDir(self.bases.path(gid)), path)
            snapshot = self.store.add_file(path, pin=HEAD_PIN)
        head = Head(
            base_id=gid, round=0, deltas=0, snapshot_id=snapshot, created=round(get_dht_time(), 3)
        )
        self._announce_head(head)

    def candidates(self, head: Head) -> list[Candidate]:
        """Deltas announced against the head and its ancestors within the staleness window,
        ranked (:func:`rank_candidates`); refused ones, those backing off and those a head
        since merged left out."""
        found: list[Candidate] = []
        merged: set[str] = set()  # by the heads since: a stale delta is merged once, not again
        base: str | None = head.base_id
        for age in range(self.config.staleness + 1):
            if base is None:
                break
            at = self.chain.get(base)  # the head that made this base: what it merged came before
            merged.update(at.merged if at else ())
            for record in self._announcements(base):
                key = (record.author, record.body.delta_id)
                if record.body.base_id != base or record.body.delta_id in merged:
                    continue  # filed under another base than it names, or merged already
                if key in self.refused or not self.unavailable.ready(key):
                    continue
                if self.volunteers is not None and record.author not in self.volunteers:
                    continue  # a closed swarm: not one of the keys it takes deltas from
                found.append(Candidate(record.author, record.body, age))
            base = at.parent if at else None
        known = {c.author for c in found if self.reputation.established(c.author)}
        return rank_candidates(found, head.base_id, known)

    def _announcements(self, base: str) -> list[Record[DeltaAnnouncement]]:
        """The announcements against ``base``: the shared key's, and when a crowd fills it
        (DHT nodes keep MAX_AUTHORS_PER_KEY authors there, first come), the owned topics of
        the authors with the most rounds merged, which no crowd can fill."""
        found = self.swarm.read(ANNOUNCE, topic=base)
        if len(found) >= CROWDED:
            seen = {r.author for r in found}
            known = self.reputation.most_merged(OWNED_ANNOUNCE_READS)
            found += [
                r for r in read_owned(self.swarm, ANNOUNCE, known, base) if r.author not in seen
            ]
        return found

    def _lease(self, head: Head) -> list[Admitted] | None:
        """The deltas to merge (with their norms) once this aggregator holds the round's
        lease; None: not ours, or not enough deltas have arrived."""
        round_ = head.round + 1
        live = self._live_leases(head)
        if live and live[0][0] != self.swarm.identity.author:
            self.seen_leases[(round_, head.base_id)] = live[0][1]  # to finish, should it lapse
            self.status = f"standby: round {round_} is leased to {live[0][0][:16]}"
            return None
        read_at = time.time()  # announcements after this wait for the next round
        candidates = self.candidates(head)
        lapsed = self.seen_leases.get((round_, head.base_id))
        if lapsed is not None and lapsed.deltas:  # a holder died: finish its round as it began
            by_id = {c.delta_id: c for c in candidates}
            kept = [by_id[d] for d in lapsed.deltas if d in by_id]
            if len(kept) < len(lapsed.deltas):
                logger.warning(
                    "taking over round %d: %d of its deltas were replaced since",
                    round_,
                    len(lapsed.deltas) - len(kept),
                )
            candidates = kept or candidates  # all replaced: the round starts afresh
        if len(candidates) < self.config.min_deltas:
            self.status = f"round {round_}: {len(candidates)} of {self.config.min_deltas} deltas"
            return None
        admitted = self._admit(head, candidates)
        if len(admitted) < self.config.min_deltas:
            self.status = (
                f"round {round_}: {len(admitted)} of {self.config.min_deltas} deltas arrived"
            )
            return None
        claim = Lease(
            round=round_,
            parent=head.base_id,
            claimed_at=get_dht_time(),
            deltas=tuple(a.candidate.delta_id for a in admitted),
        )
        self._claim(claim)
        time.sleep(self.lease_settle)
        live = self._live_leases(head)
        if not live or live[0][0] != self.swarm.identity.author:
            self._withdraw_claim()
            return None
        self.holding = claim
        self.metrics.lease_held.set(1)
        logger.info(
            "holding the lease of round %d with %d deltas",
            round_,
            len(admitted),
            extra={"fields": {"round": round_, "announcements_read_at": round(read_at, 3)}},
        )
        return admitted

    def _admit(self, head: Head, ranked: list[Candidate]) -> list[Admitted]:
        """Fetch and inspect candidates in rank order until ``max_deltas`` have passed: a slot
        goes only to a delta that arrived (within ADMIT_TIMEOUT), is what it claims and, where
        there is evaluation data, lowers the parent's held-out loss. One that does not arrive
        is skipped for a while, longer each time; one that fails a check is refused for good.
        """
        self.status = f"round {head.round + 1}: fetching deltas"
        parent_dir = self.bases.path(head.base_id)
        with ModelDir(parent_dir) as parent:

            def check(batch: list[Candidate]) -> list[Admitted | None]:
                norms = list(self._admit_pool.map(lambda c: self._check(c, parent), batch))
                passed = [(c, n) for c, n in zip(batch, norms, strict=True) if n is not None]
                gains = self._score(head, [c for c, _ in passed])

                def no_gain(c: Candidate, gain: float) -> None:
                    self._reject(c, "no_gain", f"held-out loss gain {gain:.4g} on the head")

                out = admit_scored(passed, gains, no_gain)
                return [out.get(c.delta_id) for c in batch]

            def copied(c: Candidate) -> None:
                self._reject(c, "bad_signature", "a copy of another author's announcement")

            admitted = fill_slots(ranked, check, self.config.max_deltas, ADMIT_PARALLEL, copied)
        live = {(c.author, c.delta_id) for c in ranked}
        self.admitted = {k: v for k, v in self.admitted.items() if k in live}
        self.gains = {k: v for k, v in self.gains.items() if k[:2] in live}
        return admitted

    def _score(self, head: Head, batch: list[Candidate]) -> dict[str, float]:
        """Delta id -> held-out loss gain of the delta applied alone to the head (none without
        evaluation data); measured once per delta and head."""
        if self.gate is None:
            return {}
        todo = [c for c in batch if (c.author, c.delta_id, head.base_id) not in self.gains]
        if todo:
            self.status = f"round {head.round + 1}: scoring {len(todo)} deltas"
            paths = [self.store.path(c.delta_id) for c in todo]
            scored = self.gate.contributions(self.bases.path(head.base_id), paths)
            for c, gain in zip(todo, scored.gains, strict=True):
                self.gains[(c.author, c.delta_id, head.base_id)] = gain
        return {c.delta_id: self.gains[(c.author, c.delta_id, head.base_id)] for c in batch}

    def _check(self, c: Candidate, parent: ModelDir) -> float | None:
        """The candidate's norm once it arrived and passed inspection; None otherwise."""
        key = (c.author, c.delta_id)
        if key in self.admitted:
            return self.admitted[key]
        if c.announcement.size > self.config.max_delta_bytes:  # refused before a byte moves
            self._reject(c, "size", f"announced {c.announcement.size:,} bytes")
            return None
        try:
            self.fetch(
                c.delta_id,
                timeout=ADMIT_TIMEOUT,
                manifest_timeout=MANIFEST_TIMEOUT,
                expected_size=c.announcement.size,
            )
        except (MergeswarmError, OSError, TimeoutError) as exc:
            wait = self.unavailable.failed(key)
            logger.warning(
                "delta %s from %s unavailable (skipped for %.0f s): %s",
                c.delta_id[:16],
                c.author[:16],
                wait,
                exc,
            )
            return None
        self.unavailable.forget(key)
        self.metrics.deltas_received.inc()
        try:
            with self._inspecting:  # fetches overlap; inspections share the parent's files
                _, norm = inspect_delta(
                    self.store.path(c.delta_id),
                    c,
                    parent,
                    max_bytes=self.config.max_delta_bytes,
                    drop_rate=self.config.drop_rate,
                )
        except Rejected as exc:
            self._reject(c, exc.reason, str(exc))
            return None
        self.admitted[key] = norm
        return norm

    def _live_leases(self, head: Head) -> list[tuple[str, Lease]]:
        """Claims on the round after ``head``, earliest first. A claim dated before the head
        appeared, in the future, or older than any round takes is nobody's: ignored (else
        one claim dated 0 would put every aggregator on standby for ever)."""
        now = get_dht_time()
        earliest = max(now - MAX_ROUND_SECONDS, (head.created or 0.0) - CLOCK_SLACK)
        leases = [
            (r.author, r.body)
            for r in read_owned(self.swarm, LEASE, self.config.aggregators)
            if r.body.round == head.round + 1
            and r.body.parent == head.base_id
            and earliest <= r.body.claimed_at <= now + CLOCK_SLACK
        ]
        return sorted(leases, key=lambda item: (item[1].claimed_at, item[0]))

    def _release(self) -> None:
        if self.holding is not None:
            self.holding = None
            self.metrics.lease_held.set(0)
            self._withdraw_claim()

    def _claim(self, lease: Lease) -> None:
        """Publish (or keep alive) a lease claim: where the config names the aggregators, under
        this one's owned topic, which they read (a crowd of claims cannot hide it there)."""
        publish_both(self.swarm, LEASE, lease, ttl=self.lease_seconds)

    def _withdraw_claim(self) -> None:
        withdraw_both(self.swarm, LEASE)

    def run_round(self, head: Head, admitted: list[Admitted]) -> Head | None:
        """Weigh the admitted deltas (norms, and gains where there is evaluation data), merge,
        gate and publish the child head."""
        round_ = head.round + 1
        parent_dir = self.bases.path(head.base_id)
        cfg = self.config
        verdicts = weigh_admitted(
            admitted,
            cfg,
            scored=self.gate is not None,
            newcomers={
                a.candidate.delta_id
                for a in admitted
                if not self.reputation.established(a.candidate.author)
            },
        )
        inputs = []
        earned = []  # authors whose delta weighs enough in this round to count (reputation)
        for a in admitted:
            c, verdict = a.candidate, verdicts[a.candidate.delta_id]
            if verdict.weight is None:  # this round's verdict: it may fit another round's deltas
                self._count_rejection(c, verdict.reason or "norm", verdict.note)
                continue
            if verdict.weight < 1.0:
                logger.info(
                    "round %d: delta %s weighs %.3g", round_, c.delta_id[:16], verdict.weight
                )
            if verdict.weight >= CREDIT_WEIGHT:
                earned.append(c.author)
            inputs.append(
                MergeInput(
                    self.store.path(c.delta_id),
                    weight=verdict.weight * cfg.staleness_discount**c.age,
                    trained_on=c.announcement.base_id if c.age else None,
                )
            )
        if not inputs:
            logger.warning("round %d: no delta passed; waiting for more", round_)
            return None
        crash_point("aggregator:fetched")
        crash_point(f"aggregator:fetched:{round_}")  # mid-chain: the round's number
        child_dir = self._merge(head, inputs)
        crash_point("aggregator:merged")
        if self.gate is not None and not self._gate_passes(parent_dir, child_dir):
            return None
        merged = tuple(sorted(str(i.path.name) for i in inputs))
        new = self._publish_child(head, child_dir, merged, tuple(sorted(set(earned))))
        self.metrics.deltas_accepted.inc(len(inputs))
        self.accepted += len(inputs)
        return new

    def _reject(self, c: Candidate, reason: str, message: str) -> None:
        """Refuse a delta for good (it is what it is: no later round takes it)."""
        self.refused.add((c.author, c.delta_id))
        self.admitted.pop((c.author, c.delta_id), None)
        self._count_rejection(c, reason, message)

    def _count_rejection(self, c: Candidate, reason: str, message: str) -> None:
        self.metrics.deltas_rejected.labels(reason=reason).inc()
        with self._counting:  # admission checks candidates on several threads
            self.rejected[reason] = self.rejected.get(reason, 0) + 1
        logger.warning("rejected delta %s from %s: %s", c.delta_id[:16], c.author[:16], message)

    def _merge(self, head: Head, inputs: list[MergeInput]) -> Path:
        cfg = self.config
        self.status = f"round {head.round + 1}: merging {len(inputs)} deltas"
        started = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix=".merge.tmp-", dir=self.bases.root))
        shutil.rmtree(work)
        report = merge_models(
            self.bases.path(head.base_id),
            inputs,
            Recipe.for_swarm(cfg),
            work,
            density=cfg.density,
            outer=self._outer_step(head),
        )
        (work / REPORT_FILE).unlink(missing_ok=True)  # local paths and timings: not the swarm's
        out = self.bases.path(report.child_id)
        if out.exists():
            shutil.rmtree(work)
        else:
            work.rename(out)
        seconds = time.monotonic() - started
        self.merge_seconds = round(seconds, 3)
        self.metrics.merge_seconds.observe(seconds)
        self.metrics.merge_bytes_per_second.set(ModelDir(out).nbytes / max(seconds, 1e-9))
        logger.info(
            "merged %d deltas into %s in %.1f s", len(inputs), report.child_id[:16], seconds
        )
        return out

    def _outer_step(self, head: Head) -> OuterStep | None:
        cfg = self.config
        (self.scratch / MOMENTUM_FILE).unlink(missing_ok=True)
        if cfg.outer_optimizer == "none":
            return None
        return OuterStep(
            lr=outer_lr(cfg.outer_lr, cfg.outer_warmup, head.round + 1),
            momentum=cfg.outer_momentum,
            previous=self.store.path(head.momentum_id) if head.momentum_id else None,
            out=self.scratch / MOMENTUM_FILE,
        )

    def _gate_passes(self, parent: Path, child: Path) -> bool:
        verdict = self.gate.judge(parent, child)
        if not verdict.passed:
            self.metrics.deltas_rejected.labels(reason="eval_gate").inc()
            self.rejected["eval_gate"] = self.rejected.get("eval_gate", 0) + 1
            logger.warning("round refused: evaluation loss %.4f -> %.4f", *verdict.losses)
        return verdict.passed

    def _publish_child(
        self, head: Head, child_dir: Path, merged: tuple[str, ...], credited: tuple[str, ...]
    ) -> Head:
        round_ = head.round + 1
        self.status = f"round {round_}: publishing"
        child = ModelDir(child_dir)
        with tempfile.TemporaryDirectory(dir=self.scratch) as tmp:
            patch_path = Path(tmp) / "patch.msp"
            write_patch(child, patch_path, ModelDir(self.bases.path(head.base_id)))
            patch = self.store.add_file(patch_path, pin=HEAD_PIN)
            snapshot = None
            if round_ % self.config.snapshot_every == 0:
                snap_path = Path(tmp) / "snapshot.msp"
                write_patch(child, snap_path)
                snapshot = self.store.add_file(snap_path, pin=HEAD_PIN)
        momentum = None
        if (self.scratch / MOMENTUM_FILE).is_file():
            momentum = self.store.add_file(self.scratch / MOMENTUM_FILE, pin=MOMENTUM_PIN)
            (self.scratch / MOMENTUM_FILE).unlink()
        for blob in (patch, snapshot, momentum):
            if blob:
                self.metrics.published_bytes.inc(self.store.size(blob))
        new = Head(
            base_id=child_dir.name,
            round=round_,
            parent=head.base_id,
            deltas=len(merged),
            patch_id=patch,
            snapshot_id=snapshot,
            merged=merged,
            momentum_id=momentum,
            recipe=self.recipe_text(),
            created=round(get_dht_time(), 3),
            credited=credited,
        )
        self._announce_head(new)
        self.metrics.round.set(round_)
        return new

    def recipe_text(self) -> str:
        c = self.config
        text = f"{c.merge_method} density={c.density:g} lambda={c.lam:g} sign={c.sign_method}"
        text += f" staleness={c.staleness}x{c.staleness_discount:g}"
        if c.outer_optimizer == "nesterov":
            text += f" outer=nesterov lr={c.outer_lr:g} mu={c.outer_momentum:g}"
            text += f" warmup={c.outer_warmup}"
        return text

    def _announce_head(self, head: Head) -> None:
        self.share_new_blobs()  # provider records before the head that names the blobs
        publish_head(self.swarm, head, HEAD_TTL)
        self.metrics.heads_published.inc()
        self._set_head(head)
        recent = self._recent(head)
        self.bases.keep_only({h.base_id for h in recent} | {recent[-1].parent or ""})
        self.bases.release(head_blobs(recent + self._back_to_snapshot(head)))
        self._keep_momentum(recent)
        logger.info(
            "published head: round %d, base %s, %d deltas",
            head.round,
            head.base_id[:16],
            head.deltas,
            extra={"fields": head.model_dump(mode="json")},
        )

    def _recent(self, head: Head) -> list[Head]:
        """The head and its known ancestors whose bases stay on disk, newest first."""
        recent = [head]
        while len(recent) < KEEP_BASES - 1 and (h := self.chain.get(recent[-1].parent or "")):
            recent.append(h)
        return recent

    def _back_to_snapshot(self, head: Head) -> list[Head]:
        """The head and its ancestors back to the nearest one with a snapshot (as far as this
        aggregator knows them): what a newcomer needs to rebuild the head."""
        return self._back_to(head, 1)

    def _back_to(self, head: Head, rounds: int) -> list[Head]:
        """The head and its known ancestors, newest first: ``rounds`` heads at least, and on
        back to the nearest one with a snapshot."""
        chain = [head]
        while (len(chain) < rounds or chain[-1].snapshot_id is None) and (
            h := self.chain.get(chain[-1].parent or "")
        ):
            chain.append(h)
        return chain

    def _keep_momentum(self, recent: list[Head]) -> None:
        """Delete the momentum of older heads (4 bytes a parameter each): only aggregators
        need it, and only the head's (its ancestors' for a fork choice switch back)."""
        keep = {h.momentum_id for h in recent}
        for blob in self.store.ids():
            if blob not in keep and MOMENTUM_PIN in self.store.pins(blob):
                self.store.unpin(blob, MOMENTUM_PIN)
                if not self.store.pins(blob):
                    self.store.delete(blob)
