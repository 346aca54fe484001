"""Signed DHT records: schemas, keys, envelopes.

Every record lives under a key namespaced by the swarm id,
``mergeswarm/<swarm>/<kind>[/<topic>]``, with the author's public key (64 hex
digits) as its subkey, so each author owns one entry per key and a second
swarm on the same DHT never reads the first one's keys.

Keys are open: anyone may add an entry under a shared key, so a crowd of throwaway keys can
crowd a key (every DHT node caps the authors it keeps under one key, node.net.key_cap). What a
reader needs from known authors therefore stands where a crowd cannot reach it:

- an *owned* topic, ``[<subject>]~<author>`` (:func:`owned_topic`), holds only that author's
  record: heads, bases and leases of the aggregators a config names are read there;
- a ``config`` record counts only from an aggregator it names itself, and in a swarm whose id
  carries a trust anchor only the anchored aggregators can be named (protocol.swarm_config);
- a ``handover`` record carries the config it follows and stands only under that config's
  digest, endorsed by most of its aggregators (protocol.handover).

All three are checked by every DHT node on store, so a flood there is refused, not kept.

A blob's provider records stand under its first key while that holds few, and then spill
over PROVIDER_SHARDS more keys, each peer's under the one its peer id picks
(:func:`provider_topic`): one key would let a reader find only the first
MAX_AUTHORS_PER_KEY holders of a blob that ten thousand peers hold (README, "Scale").

The stored value is an envelope, canonical JSON (sorted keys, no spaces)::

    {"v": 1, "swarm": ..., "kind": ..., "key": <the plain DHT key>,
     "author": <hex>, "expires": <float>, "body": {...}, "sig": <hex>}

The Ed25519 signature covers the envelope without ``sig``, and so binds the
body to its key (hivemind hashes keys: a validator checks that the plain key
hashes to the stored one), its swarm, its author and its expiration: a record
replayed under another key, swarm or author, or kept alive past the
expiration its author chose, fails verification.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from protocol.errors import MergeswarmError, one_line
from protocol.handover import Handover, HandoverError, check_handover, config_digest
from protocol.identity import Identity, verify
from protocol.peer_binding import PeerBinding, bound
from protocol.schema import SWARM_ID_PATTERN, Body, Hex64, Maddr, ShortText, SwarmId
from protocol.swarm_config import SwarmConfig

RECORD_VERSION = 1
MAX_RECORD_BYTES = 4096  # well under hivemind's ~16 KiB host-pipe limit
# a handover carries a whole config and up to 16 endorsements (and is one record an epoch)
MAX_HANDOVER_BYTES = 8192
MAX_MERGED = 32  # delta ids a head names (a round merges at most this many)
MAX_TTL_SECONDS = 24 * 3600  # how far in the future an expiration may lie
# What one DHT node keeps under one key: a crowd of throwaway authors under a shared key gets
# no further, and a reader's answer stays far under p2pd's 4 MiB message cap (1,800 records
# hid a head before). An author already there may always refresh its entry.
MAX_AUTHORS_PER_KEY = 1024
MAX_KEY_BYTES = 2 << 20
# Keys a blob's provider records spill over once its first key is crowded: 16,384 more holders
# can be found before they fill, and a reader of two sees an eighth (node.net.blobs.providers)
PROVIDER_SHARDS = 16
_KEY_PREFIX = "mergeswarm/"


REJECT_REASONS = (  # every RecordError reason: a bounded metric label set
    "malformed",
    "oversized",
    "bad_key",
    "wrong_swarm",
    "wrong_key",
    "forged_author",
    "bad_expiration",
    "expired",
    "bad_signature",
    "unbound_peer",
    "untrusted",
    "key_full",  # counted by the DHT's storage (node.net.key_cap), not by open_record
)


class RecordError(MergeswarmError):
    """A record is malformed, forged, expired, oversized or for another swarm/key."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # a short label, used as a bounded metric label


class DeltaAnnouncement(Body):
    """A volunteer offers a delta trained on ``base_id``."""

    base_id: Hex64
    delta_id: Hex64  # blob id of the .msd file (protocol.ids)
    size: int = Field(ge=0, le=1 << 40)  # bytes of the .msd file
    round: int = Field(ge=0)  # the head round the delta was trained from
    tags: tuple[ShortText, ...] = Field(default=(), max_length=16)
    samples: int = Field(default=0, ge=0)  # samples trained on
    steps: int = Field(default=0, ge=0)
    loss_before: float | None = None  # held-out loss on the base
    loss_after: float | None = None  # held-out loss after training


class Provider(Body):
    """The author's peer serves blob ``blob_id`` (``complete`` False: still fetching it). Only
    the author's own peer: the record is refused unless ``binding`` shows that peer vouching
    for the author (protocol.peer_binding)."""

    blob_id: Hex64
    peer_id: Annotated[str, StringConstraints(pattern=r"^[1-9A-HJ-NP-Za-km-z]{20,80}$")]
    maddrs: tuple[Maddr, ...] = Field(default=(), max_length=8)
    complete: bool = True
    binding: PeerBinding  # the peer's libp2p key vouches for the record's author


class Head(Body):
    """An aggregator's current head base."""

    base_id: Hex64
    round: int = Field(ge=0)
    parent: Hex64 | None = None
    deltas: int = Field(ge=0)  # number of deltas merged into it
    patch_id: Hex64 | None = None  # blob turning the parent into this base
    snapshot_id: Hex64 | None = None  # blob holding the whole base
    merged: tuple[Hex64, ...] = Field(default=(), max_length=MAX_MERGED)  # the delta ids
    momentum_id: Hex64 | None = None  # blob of the outer optimizer's momentum after this round
    recipe: ShortText = ""  # how they were merged, e.g. "ties density=0.5 lambda=1"
    created: float | None = None  # DHT time it was published (for the time since the last head)
    # authors whose deltas weighed enough in the merge to earn reputation (aggregator.reputation):
    # every aggregator that follows the head counts them, so a standby knows whom the swarm knows
    credited: tuple[Hex64, ...] = Field(default=(), max_length=MAX_MERGED)


Reason = Annotated[str, StringConstraints(pattern=r"^[a-z_]{1,32}$")]


class Heartbeat(Body):
    """A peer is alive; what it does and sees."""

    role: Literal["volunteer", "aggregator", "seed", "monitor"]
    version: ShortText
    peer_id: ShortText
    head_round: int | None = Field(default=None, ge=0)
    head_id: Hex64 | None = None
    samples_per_second: float = Field(default=0.0, ge=0)
    bytes_in: int = Field(default=0, ge=0)
    bytes_out: int = Field(default=0, ge=0)
    uptime_seconds: float = Field(default=0.0, ge=0)
    deltas_published: int = Field(default=0, ge=0)  # volunteers: since start
    # aggregators: since start
    deltas_accepted: int = Field(default=0, ge=0)
    deltas_rejected: dict[Reason, Annotated[int, Field(ge=0)]] = Field(
        default_factory=dict, max_length=16
    )
    merge_seconds: float | None = Field(default=None, ge=0)  # of the last round merged here
    lease: bool = False  # holds the current round's lease


class Lease(Body):
    """An aggregator holds (or claims) the merge of round ``round`` on ``parent``.

    The earliest live claim wins (then the smaller author); the holder names the deltas
    it merges, so that a standby taking over a lapsed lease merges the same ones.
    """

    round: int = Field(ge=0)
    parent: Hex64
    claimed_at: float
    deltas: tuple[Hex64, ...] = Field(default=(), max_length=64)


B = TypeVar("B", bound=Body)


@dataclass(frozen=True)
class Kind(Generic[B]):
    """A kind of record: its name in DHT keys and the schema of its body. Peers read and
    publish by kind (``swarm.read(HEAD)`` gives records whose bodies are Heads)."""

    name: str
    body: type[B]

    def __str__(self) -> str:
        return self.name


ANNOUNCE = Kind("announce", DeltaAnnouncement)  # under topic <base id>
PROVIDER = Kind("provider", Provider)  # under topic <blob id>[.<shard>] (provider_topic)
HEAD = Kind("head", Head)
BASE = Kind("base", Head)  # under topic <base id>: a past head, for walking the chain back
HEARTBEAT = Kind("heartbeat", Heartbeat)
LEASE = Kind("lease", Lease)
CONFIG = Kind("config", SwarmConfig)  # epoch 0: the config the swarm id's anchor commits to
HANDOVER = Kind("handover", Handover)  # under topic <digest of the config it follows>
KINDS: dict[str, Kind] = {
    k.name: k for k in (ANNOUNCE, PROVIDER, HEAD, BASE, HEARTBEAT, LEASE, CONFIG, HANDOVER)
}
BODIES: dict[str, type[Body]] = {name: kind.body for name, kind in KINDS.items()}


OWNER_MARK = "~"  # a topic ``<subject>~<author>`` holds only that author's record


def owned_topic(author: str, subject: str = "") -> str:
    """The topic under which only ``author`` can store a record (about ``subject``)."""
    return f"{subject}{OWNER_MARK}{author}"


def key_admits(held: Mapping[str, int], author: str, size: int) -> bool:
    """Whether a DHT node that holds entries of these sizes (by author) under one key takes
    one of ``size`` bytes from ``author``: a refresh always, a new author while there is room
    (first come: honest records under their owned topics are out of a crowd's reach)."""
    if author in held:
        return True
    return len(held) < MAX_AUTHORS_PER_KEY and sum(held.values()) + size <= MAX_KEY_BYTES


def provider_shard(peer_id: str) -> int:
    """Which of a blob's PROVIDER_SHARDS overflow keys may hold ``peer_id``'s provider
    record: its id picks it, so holders spread evenly and nobody files under a key of their
    choosing without making up peer ids (each needs a libp2p key that vouches for its
    author)."""
    return hashlib.sha256(peer_id.encode()).digest()[0] % PROVIDER_SHARDS


def provider_topic(blob_id: str, shard: int | None = None) -> str:
    """The topic of ``blob_id``'s provider records: its first key (``shard`` None), or
    overflow shard ``shard``."""
    return blob_id if shard is None else f"{blob_id}.{shard}"


def record_key(swarm_id: str, kind: Kind | str, topic: str = "") -> str:
    """The plain DHT key of records of ``kind`` (and ``topic``, e.g. a base or blob id)."""
    kind = str(kind)
    if kind not in BODIES:
        raise ValueError(f"unknown record kind {kind!r}")
    return f"{_KEY_PREFIX}{swarm_id}/{kind}" + (f"/{topic}" if topic else "")


def _parse_key(key: str) -> tuple[str, str, str]:
    """(swarm id, kind, topic) of a plain key made by record_key."""
    if not key.startswith(_KEY_PREFIX):
        raise RecordError("bad_key", f"key {key[:80]!r} is not a mergeswarm key")
    parts = key[len(_KEY_PREFIX) :].split("/")
    if len(parts) not in (2, 3) or parts[1] not in BODIES:
        raise RecordError("bad_key", f"key {key[:80]!r} is not <swarm>/<kind>[/<topic>]")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else ""


class Envelope(BaseModel):
    """A signed record as stored in the DHT."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    v: Literal[1]
    swarm: SwarmId
    kind: str
    key: Annotated[str, StringConstraints(max_length=256)]
    author: Hex64
    expires: float
    body: dict
    sig: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{128}$")]

    def signed_bytes(self) -> bytes:
        return _canonical(self.model_dump(exclude={"sig"}))

    def to_bytes(self) -> bytes:
        return _canonical(self.model_dump())


def _cap(kind: str) -> int:
    return MAX_HANDOVER_BYTES if kind == HANDOVER.name else MAX_RECORD_BYTES


def _canonical(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def sign_record(
    identity: Identity, swarm_id: str, kind: str, topic: str, body: Body, expires: float
) -> tuple[str, bytes]:
    """(plain key, envelope bytes) of ``body`` signed by ``identity``."""
    if not isinstance(body, BODIES[kind]):
        raise TypeError(f"a {kind} record holds a {BODIES[kind].__name__}")
    key = record_key(swarm_id, kind, topic)
    unsigned = {
        "v": RECORD_VERSION,
        "swarm": swarm_id,
        "kind": kind,
        "key": key,
        "author": identity.author,
        "expires": float(expires),
        "body": body.model_dump(mode="json"),
    }
    sig = identity.sign(_canonical(unsigned)).hex()
    data = _canonical(unsigned | {"sig": sig})
    if len(data) > _cap(kind):
        raise RecordError("oversized", f"a {kind} record of {len(data)} bytes is over the cap")
    return key, data


def open_record(
    data: bytes,
    *,
    subkey: str | None,
    expiration: float,
    now: float,
    key: str | None = None,
    swarm_id: str | None = None,
) -> tuple[Envelope, Body]:
    """Check an envelope and return it with its typed body, or raise RecordError.

    :param subkey: the DHT subkey it was stored under (must be its author).
    :param expiration: the DHT expiration it was stored with (must be the signed one).
    :param key: the plain key it was read from, when the caller knows it.
    :param swarm_id: the caller's swarm, when it has one.
    """
    if len(data) > MAX_HANDOVER_BYTES:
        raise RecordError("oversized", f"record of {len(data)} bytes (cap {MAX_HANDOVER_BYTES})")
    try:
        env = Envelope.model_validate_json(data)
    except ValidationError as exc:
        raise RecordError("malformed", f"malformed record: {one_line(exc)}") from None
    swarm, kind, topic = _parse_key(env.key)
    if len(data) > _cap(kind):
        raise RecordError("oversized", f"a {kind} record of {len(data)} bytes (cap {_cap(kind)})")
    if swarm != env.swarm or (swarm_id is not None and env.swarm != swarm_id):
        raise RecordError("wrong_swarm", f"record for swarm {env.swarm!r} under {env.key!r}")
    if kind != env.kind or (key is not None and key != env.key):
        raise RecordError("wrong_key", f"a {env.kind} record stored under another key")
    if subkey != env.author:
        raise RecordError("forged_author", "record stored under a subkey that is not its author")
    if OWNER_MARK in topic and topic.rpartition(OWNER_MARK)[2] != env.author:
        raise RecordError("wrong_key", f"a {kind} record under another author's key")
    if not math.isfinite(env.expires) or env.expires != expiration:
        raise RecordError("bad_expiration", "record's expiration is not the one its author signed")
    if env.expires <= now:
        raise RecordError("expired", "record has expired")
    if env.expires > now + MAX_TTL_SECONDS:
        raise RecordError("bad_expiration", "record expires too far in the future")
    try:
        signed = env.signed_bytes()
    except ValueError:  # NaN or Infinity inside the body: not canonical JSON
        raise RecordError("malformed", "record body holds a non-finite number") from None
    if not verify(env.author, bytes.fromhex(env.sig), signed):
        raise RecordError("bad_signature", f"signature of a {kind} record does not verify")
    try:
        body = BODIES[kind].model_validate_json(_canonical(env.body))
    except (ValidationError, ValueError) as exc:
        raise RecordError("malformed", f"malformed {kind} record: {one_line(exc)}") from None
    if isinstance(body, Provider) and not bound(body.binding, body.peer_id, env.author):
        raise RecordError("unbound_peer", "a provider record names a peer not bound to its author")
    if isinstance(body, Provider) and topic not in (
        provider_topic(body.blob_id),
        provider_topic(body.blob_id, provider_shard(body.peer_id)),
    ):
        raise RecordError("wrong_key", "a provider record filed under another blob or shard")
    if isinstance(body, SwarmConfig):
        _check_config(env, body)
    elif isinstance(body, Handover):
        _check_handover(env, topic, body)
    return env, body


def _check_config(env: Envelope, config: SwarmConfig) -> None:
    """A config record stands only from an aggregator it names (anyone's, for an open swarm)."""
    if config.swarm_id != env.swarm or config.epoch != 0:
        raise RecordError("wrong_key", "a config record of another swarm or epoch (epoch 0 only)")
    if not config.trusts(env.author):
        raise RecordError("untrusted", "a config record from an author it does not name")


def _check_handover(env: Envelope, topic: str, handover: Handover) -> None:
    """A handover stands only under the digest of the config it follows, endorsed by it."""
    if handover.previous.swarm_id != env.swarm or topic != config_digest(handover.previous):
        raise RecordError("wrong_key", "a handover stored under another config's digest")
    try:
        check_handover(handover.previous, handover)
    except HandoverError as exc:
        raise RecordError("untrusted", f"a handover that does not follow: {exc}") from None


def is_swarm_id(value: str) -> bool:
    return re.fullmatch(SWARM_ID_PATTERN, value) is not None
