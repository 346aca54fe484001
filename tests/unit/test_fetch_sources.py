"""Which providers a fetch keeps as sources (node.net.blobs.fetch.Fetcher), without a network."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from node.net.blobs.fetch import ROTATE_SECONDS, Fetcher
from node.net.blobstore import BlobStore
from node.net.pieces import IDLE_SOURCE_SECONDS


def _fetcher(tmp_path, providers: list[str]) -> Fetcher:
    swarm = SimpleNamespace(options=SimpleNamespace(client_mode=False))
    fetcher = Fetcher(swarm, BlobStore(tmp_path), "0" * 64, max_sources=2)

    async def candidates() -> list[list[str]]:
        return [list(providers)]

    fetcher._candidates = candidates  # the provider records, in the order they are tried
    return fetcher


def test_a_full_fetch_swaps_sources_that_sent_nothing_for_a_while_for_untried_providers(
    tmp_path,
):
    fetcher = _fetcher(tmp_path, ["a", "b", "c", "d"])
    asyncio.run(fetcher._refresh_sources())
    assert list(fetcher.sources) == ["a", "b"]
    now = time.monotonic()
    fetcher.sources["a"].useful_at = now  # "a" just sent a piece; "b" sent nothing for long
    fetcher.sources["b"].useful_at = now - IDLE_SOURCE_SECONDS
    asyncio.run(fetcher._refresh_sources())
    assert list(fetcher.sources) == ["a", "b"]  # full: the next look is ROTATE_SECONDS away
    fetcher._rotated_at = now - ROTATE_SECONDS
    asyncio.run(fetcher._refresh_sources())
    assert list(fetcher.sources) == ["a", "c"]


def test_an_idle_source_stays_when_no_other_provider_is_known(tmp_path):
    fetcher = _fetcher(tmp_path, ["a", "b"])
    asyncio.run(fetcher._refresh_sources())
    for source in fetcher.sources.values():
        source.useful_at = time.monotonic() - IDLE_SOURCE_SECONDS
    fetcher._rotated_at = time.monotonic() - ROTATE_SECONDS
    asyncio.run(fetcher._refresh_sources())
    assert list(fetcher.sources) == ["a", "b"]
