"""Helpers shared by the subcommands: default paths, progress bars, argument types."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from node.data_dir import DataDir, default_data_dir

__all__ = ["default_data_dir"]  # the commands' --data-dir default


def default_key_path() -> Path:
    return DataDir(default_data_dir()).identity


def byte_progress(desc: str) -> tqdm:
    """A byte-counting progress bar on stderr, shown only when stderr is a terminal."""
    return tqdm(desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=None, leave=False)


def _ranged(parse: Callable[[str], float], what: str, lo: float, hi: float, hi_open: bool):
    """An argparse type: ``parse`` the text and require lo <= value <= hi (or < hi)."""
    lo_text, hi_text = (f"{v:g}" if isinstance(v, float) else str(v) for v in (lo, hi))
    interval = f"[{lo_text}, {hi_text}{')' if hi_open else ']'}"

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {what}") from None
        if not (lo <= value < hi if hi_open else lo <= value <= hi):
            raise argparse.ArgumentTypeError(f"{what} must be in {interval}, got {text}")
        return value

    return convert


drop_rate = _ranged(float, "drop rate", 0.0, 1.0, hi_open=True)
seed = _ranged(lambda t: int(t, 0), "seed", 0, 2**64, hi_open=True)
block_size = _ranged(int, "block size", 8, 65536, hi_open=False)


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value
