"""A DHT node's storage that caps the authors under one key (protocol.records.key_admits).

hivemind keeps every subkey a valid record arrives with, and evicts by expiration when a
dictionary is full, so a crowd of throwaway keys under one shared key either hides every
entry (the answer outgrows p2pd's message cap) or, given long expirations, evicts the honest
ones. The validator cannot help: it sees one record at a time. This storage refuses a new
author once a key is full, counting ``key_full`` with the validator's rejections.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from hivemind.dht.routing import DHTID
from hivemind.dht.storage import DHTLocalStorage, DictionaryDHTValue

from protocol.record_validator import find_validator
from protocol.records import key_admits


class CappedStorage(DHTLocalStorage):
    """DHTLocalStorage whose dictionaries take a new subkey only while key_admits says so."""

    refused: Counter[str]  # the validator's rejection counter, set by cap_keys

    def store_subkey(self, key: DHTID, subkey: Any, value: bytes, expiration_time: float) -> bool:
        found = self.get(key)
        dictionary = found.value if found is not None else None
        if isinstance(dictionary, DictionaryDHTValue) and subkey not in dictionary:
            # subkeys are the authors' hex keys; items() yields unexpired entries only
            held = {str(sub): len(item.value) for sub, item in dictionary.items()}
            if not key_admits(held, str(subkey), len(value)):
                self.refused["key_full"] += 1
                return False
        return super().store_subkey(key, subkey, value, expiration_time)


async def cap_keys(_dht: object, node: Any) -> None:
    """For ``DHT.run_coroutine``: cap the keys of this DHT node's storage and cache. The
    storages are re-classed in place: they hold no state a subclass would need to copy."""
    validator = find_validator(node.protocol.record_validator)
    counter = validator.rejected if validator is not None else Counter()
    for storage in (node.protocol.storage, node.protocol.cache):
        storage.__class__ = CappedStorage
        storage.refused = counter
