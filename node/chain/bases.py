"""Bases held by a peer: ``DATA_DIR/bases/<base id>/``, each got from a head's patch or snapshot.

Shared by every role that needs the head's weights (volunteers train on them,
aggregators merge into them, ``export`` writes them out). A base appears only
once its id checks out; a crash mid-write leaves a hidden directory that the
next start removes.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from node.net.blobstore import HEAD_PIN, BlobStore
from protocol.errors import MergeswarmError
from protocol.model_dir import ModelDir
from protocol.patch import apply_patch
from protocol.records import Head

logger = logging.getLogger(__name__)


class BaseError(MergeswarmError):
    """A head's base could not be got or did not check out."""


class Bases:
    """:param fetch: downloads a blob into ``store`` (raises on failure)."""

    def __init__(self, root: Path, store: BlobStore, fetch: Callable[[str], object]) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob(".*.tmp-*"):  # a base being written when killed
            shutil.rmtree(leftover, ignore_errors=True)
        self.store = store
        self.fetch = fetch

    def path(self, base: str) -> Path:
        return self.root / base

    def has(self, base: str) -> bool:
        return self.path(base).is_dir()

    def sync(self, head: Head) -> Path:
        """The head's model directory: patched from its parent when held, else from a snapshot."""
        out = self.path(head.base_id)
        if out.is_dir():
            return out
        parent = self.path(head.parent) if head.parent else None
        errors = []
        for blob, source in ((head.patch_id, parent), (head.snapshot_id, None)):
            if not blob or (blob == head.patch_id and (source is None or not source.is_dir())):
                continue
            try:
                self.fetch(blob)
                child = apply_patch(
                    self.store.path(blob), out, ModelDir(source) if source else None
                )
            except (MergeswarmError, OSError, TimeoutError) as exc:
                errors.append(str(exc))
                logger.warning("base %s from %s: %s", head.base_id[:16], blob[:16], exc)
                continue
            if child != head.base_id:  # the patch's header named another base
                shutil.rmtree(out, ignore_errors=True)
                errors.append(f"blob {blob[:16]} makes base {child[:16]}, not the head's")
                continue
            self.store.pin(blob, HEAD_PIN)
            return out
        raise BaseError(
            f"cannot get base {head.base_id[:16]}: " + ("; ".join(errors) or "no patch or snapshot")
        )

    def release(self, keep: set[str]) -> None:
        """Unpin the head blobs (patches, snapshots) not in ``keep``: retention collects them
        once unused (peers catching up may still fetch them meanwhile)."""
        for blob in self.store.ids():
            if blob not in keep and HEAD_PIN in self.store.pins(blob):
                self.store.unpin(blob, HEAD_PIN)

    def keep_only(self, keep: set[str]) -> None:
        """Delete the bases not in ``keep`` (old rounds)."""
        for path in self.root.iterdir():
            if path.is_dir() and not path.name.startswith(".") and path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)
