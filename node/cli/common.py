"""Helpers shared by the subcommands: default paths, progress bars, argument types."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from tqdm import tqdm

ENV_DATA_DIR = "MERGESWARM_DATA_DIR"


def default_data_dir() -> Path:
    """``$MERGESWARM_DATA_DIR``, else ``~/.mergeswarm``."""
    return Path(os.environ.get(ENV_DATA_DIR) or Path.home() / ".mergeswarm")


def default_key_path() -> Path:
    return default_data_dir() / "identity.pem"


def byte_progress(desc: str) -> tqdm:
    """A byte-counting progress bar on stderr, shown only when stderr is a terminal."""
    return tqdm(desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=None, leave=False)


def drop_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"drop rate must be in [0, 1), got {value}")
    return value


def seed(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"seed must be in [0, 2**64), got {value}")
    return value


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value
