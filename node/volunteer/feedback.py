"""Error feedback: what a volunteer's deltas leave out (dropped entries, codec rounding) is
kept on disk and added to its next delta, so what it learned is delayed, never lost.

Two files under ``<data dir>/residual/``, each a safetensors file whose metadata names the
base it belongs to, written atomically (a kill -9 leaves the old or the new one):

    carried.safetensors   added to every delta made on base ``base_id`` (the head trained on):
                          what the deltas on earlier heads left out
    left.safetensors      what the last delta, made on ``base_id`` in round ``round``, left out

A second delta on the same base replaces the first (one delta per author and base), and the
trainer's weights went on from where the first was made: it adds ``carried`` again, not what
the first left out. On the next head, what the last delta left out becomes ``carried``, if
that head descends from its base; otherwise (a fork won, or the volunteer was away for long)
it is dropped with a log line.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from protocol.durable import fsync_dir
from protocol.records import Head

logger = logging.getLogger(__name__)

CARRIED = "carried.safetensors"
LEFT = "left.safetensors"

Tensors = dict[str, torch.Tensor]


class Feedback:
    """The residual files of one volunteer (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def carry_for(
        self,
        head: Head,
        shapes: Mapping[str, tuple[int, ...]],
        descends: Callable[[str], bool],
    ) -> Tensors:
        """What to add to a delta made on ``head``: tensors named as in ``shapes`` (the base's),
        shaped like them. ``descends(base_id)`` says whether ``head`` was merged from that
        base, rounds back."""
        carried = self._read(CARRIED, shapes)
        if carried is not None and carried[0].get("base_id") == head.base_id:
            return carried[1]
        left = self._read(LEFT, shapes)
        tensors: Tensors = {}
        if left is not None:
            meta, found = left
            if meta.get("base_id") == head.base_id:
                pass  # made on this base with nothing carried in: it already counts here
            elif descends(meta.get("base_id", "")):
                tensors = found
            else:
                logger.warning(
                    "error feedback: dropping what the deltas on base %s (round %s) left out: "
                    "the head of round %d does not descend from it",
                    meta.get("base_id", "?")[:16],
                    meta.get("round", "?"),
                    head.round,
                )
        self._write(CARRIED, tensors, {"base_id": head.base_id})
        return tensors

    def record(self, head: Head, left: Tensors) -> None:
        """What the delta just made on ``head`` left out."""
        self._write(LEFT, left, {"base_id": head.base_id, "round": str(head.round)})

    def _read(
        self, name: str, shapes: Mapping[str, tuple[int, ...]]
    ) -> tuple[dict[str, str], Tensors] | None:
        path = self.root / name
        if not path.is_file():
            return None
        try:
            with safe_open(path, "pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(path)
        except (OSError, SafetensorError, ValueError) as exc:
            logger.warning("error feedback: %s is unreadable (%s); starting without it", path, exc)
            return None
        wrong = [n for n, t in tensors.items() if shapes.get(n) != tuple(t.shape)]
        if wrong:
            logger.warning(
                "error feedback: %s holds %d tensor(s) the base does not have in that shape "
                "(%s); starting without it",
                path,
                len(wrong),
                wrong[0],
            )
            return None
        return meta, tensors

    def _write(self, name: str, tensors: Tensors, meta: dict[str, str]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{name}.tmp-{os.getpid()}"
        save_file({n: t.contiguous() for n, t in tensors.items()}, tmp, metadata=meta)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.root / name)
        fsync_dir(self.root)
