"""The hivemind record validator every peer of a swarm installs.

hivemind calls it on every record another peer asks this one to store and on
every record a lookup returns; a record that fails is neither stored nor
returned. Rejections are counted by reason in the validator (in the DHT's own
process: read them with :func:`rejection_counts`).
"""

from __future__ import annotations

import logging
from collections import Counter

from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer, get_dht_time

from protocol.records import MAX_HANDOVER_BYTES, RecordError, open_record

logger = logging.getLogger(__name__)


class SwarmRecordValidator(RecordValidatorBase):
    """Accepts only well-formed, correctly signed mergeswarm records (of any swarm).

    A peer serves the whole DHT, so it stores other swarms' records too as
    long as they are internally consistent; its own lookups are namespaced
    by its swarm id and check it again when reading.
    """

    def __init__(self) -> None:
        self.rejected: Counter[str] = Counter()
        self.accepted = 0

    def validate(self, record: DHTRecord) -> bool:
        try:
            self._check(record)
        except RecordError as exc:
            self.rejected[exc.reason] += 1
            logger.debug("rejected a DHT record: %s", exc)
            return False
        self.accepted += 1
        return True

    def _check(self, record: DHTRecord) -> None:
        if len(record.value) > MAX_HANDOVER_BYTES + 64:  # msgpack framing; open_record caps by kind
            raise RecordError("oversized", f"record value of {len(record.value)} bytes")
        try:
            value = MSGPackSerializer.loads(record.value)
            subkey = MSGPackSerializer.loads(record.subkey) if record.subkey else None
        except Exception as exc:  # noqa: BLE001 - msgpack raises many types on garbage
            raise RecordError("malformed", f"undecodable record ({type(exc).__name__})") from None
        if not isinstance(value, bytes) or not isinstance(subkey, str | None):
            raise RecordError("malformed", "record value is not an envelope")
        env, _ = open_record(
            value, subkey=subkey, expiration=record.expiration_time, now=get_dht_time()
        )
        if DHTID.generate(source=env.key).to_bytes() != record.key:
            raise RecordError("wrong_key", f"record for {env.key[:80]!r} stored under another key")

    @property
    def priority(self) -> int:
        return 10  # before any other validator strips anything

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, SwarmRecordValidator)  # one instance per DHT is enough


async def rejection_counts(_dht: object, node: object) -> dict[str, int]:
    """For ``DHT.run_coroutine``: rejected records by reason, and the accepted count."""
    validator = find_validator(node.protocol.record_validator)  # type: ignore[attr-defined]
    if validator is None:
        return {}
    return dict(validator.rejected) | {"accepted": validator.accepted}


def find_validator(validator: RecordValidatorBase | None) -> SwarmRecordValidator | None:
    if isinstance(validator, SwarmRecordValidator):
        return validator
    for inner in getattr(validator, "_validators", ()):
        if isinstance(inner, SwarmRecordValidator):
            return inner
    return None
