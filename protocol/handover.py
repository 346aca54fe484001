"""Handing a swarm over to another set of aggregators: configs after the first, each endorsed
by most of the aggregators of the one before.

The swarm id commits to the genesis and to the aggregators the swarm was made with (the trust
anchor, protocol.swarm_config), so their config, epoch 0, is the root nobody else can replace.
To add or retire an aggregator, or to change a rule, the operators write the next config
(``epoch`` one higher, same swarm id and genesis) and more than half of the current
aggregators each sign it with their keys (:func:`endorse`). A :class:`Handover` carries the
next config and those endorsements; anyone may store it (record kind ``handover``, under the
previous config's digest, carrying that config so that every DHT node checks it on store), and a reader that trusts the previous config takes the next one
only if the endorsements check out (:func:`check_handover`). Walking from the root, every
reader arrives at the same config (:func:`follow_handovers`), whoever published what.

An endorsement signs the two configs' digests under its own domain string, so it cannot be
mistaken for, or replayed as, a record signature.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated

from pydantic import Field, StringConstraints, ValidationError

from protocol.errors import MergeswarmError, one_line
from protocol.identity import Identity, verify
from protocol.schema import Body, Hex64
from protocol.swarm_config import SwarmConfig

MAX_EPOCHS = 64  # handovers a reader walks at most from the root
_DOMAIN = b"mergeswarm-handover-v1\n"


class HandoverError(MergeswarmError):
    """A handover does not follow from the config before it; the message says why."""


def config_digest(config: SwarmConfig) -> str:
    """SHA-256 of the config's canonical JSON: what endorsements sign and handovers are filed
    under."""
    text = json.dumps(config.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _message(previous: SwarmConfig, successor: SwarmConfig) -> bytes:
    return _DOMAIN + f"{config_digest(previous)}\n{config_digest(successor)}".encode()


class Endorsement(Body):
    """One aggregator of the previous config agrees to the next one."""

    author: Hex64
    sig: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{128}$")]


class Handover(Body):
    """The config that follows ``previous`` (filed under its digest), and its endorsements.
    Carrying ``previous`` lets every DHT node check the endorsements before storing it."""

    previous: SwarmConfig
    config: SwarmConfig
    endorsements: tuple[Endorsement, ...] = Field(default=(), max_length=16)


def endorse(identity: Identity, previous: SwarmConfig, successor: SwarmConfig) -> Endorsement:
    """``identity``'s signature of the step from ``previous`` to ``successor``."""
    sig = identity.sign(_message(previous, successor)).hex()
    return Endorsement(author=identity.author, sig=sig)


def endorsers(previous: SwarmConfig, handover: Handover) -> set[str]:
    """The aggregators of ``previous`` whose endorsement of the handover verifies."""
    message = _message(previous, handover.config)
    return {
        e.author
        for e in handover.endorsements
        if e.author in previous.aggregators and verify(e.author, bytes.fromhex(e.sig), message)
    }


def check_successor(previous: SwarmConfig, nxt: SwarmConfig) -> None:
    """HandoverError unless ``nxt`` may follow ``previous`` (endorsements aside)."""
    if not previous.aggregators:
        raise HandoverError("a swarm that names no aggregators cannot be handed over")
    if nxt.swarm_id != previous.swarm_id or nxt.genesis_id != previous.genesis_id:
        raise HandoverError("the next config names another swarm id or genesis")
    if nxt.epoch != previous.epoch + 1:
        raise HandoverError(f"the next config is epoch {nxt.epoch}, not {previous.epoch + 1}")
    if not nxt.aggregators:
        raise HandoverError("the next config names no aggregators (an open swarm)")


def enough(previous: SwarmConfig, signed: set[str]) -> bool:
    """Whether ``signed`` is more than half of the aggregators of ``previous``."""
    return 2 * len(signed & set(previous.aggregators)) > len(previous.aggregators)


def check_handover(previous: SwarmConfig, handover: Handover) -> SwarmConfig:
    """The next config, if ``handover`` may follow ``previous``; HandoverError otherwise."""
    nxt = handover.config
    if handover.previous != previous:
        raise HandoverError(f"the handover follows another config than epoch {previous.epoch}")
    check_successor(previous, nxt)
    signed = endorsers(previous, handover)
    if not enough(previous, signed):
        raise HandoverError(
            f"endorsed by {len(signed)} of the {len(previous.aggregators)} aggregators of "
            f"epoch {previous.epoch}; more than half must sign"
        )
    return nxt


def next_config(previous: SwarmConfig, handovers: Iterable[Handover]) -> Handover | None:
    """Of the handovers offered after ``previous``, the one that follows it (the smallest
    digest, should a majority have signed two), or None."""
    valid: dict[str, Handover] = {}
    for handover in handovers:
        try:
            check_handover(previous, handover)
        except HandoverError:
            continue
        valid.setdefault(config_digest(handover.config), handover)
    return valid[min(valid)] if valid else None


def follow_handovers(root: SwarmConfig, handovers: Iterable[Handover]) -> list[SwarmConfig]:
    """The configs from ``root`` on, each handover checked against the one before (in order);
    HandoverError for one that does not follow."""
    chain = [root]
    for handover in handovers:
        chain.append(check_handover(chain[-1], handover))
    if len(chain) > MAX_EPOCHS + 1:
        raise HandoverError(f"more than {MAX_EPOCHS} handovers")
    return chain


def load_handover(path: str | os.PathLike[str]) -> Handover:
    """A handover file (JSON, as ``mergeswarm handover sign`` writes it)."""
    path = Path(path)
    try:
        return Handover.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise HandoverError(f"{path}: no such handover file") from None
    except (OSError, ValidationError) as exc:
        raise HandoverError(f"{path}: not a handover file ({one_line(exc)})") from None


def handover_json(handover: Handover) -> str:
    return handover.model_dump_json(indent=2) + "\n"
