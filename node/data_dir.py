"""A peer's data directory, and every file a daemon keeps in it, named once.

Each peer has its own (``--data-dir``; default ``$MERGESWARM_DATA_DIR``, else
``~/.mergeswarm``). Some of its files are read by other processes: the demo, the tests and
the benchmarks wait for ``multiaddrs``; ``mergeswarm node status|pause|resume`` reads
``control_port``; a scrape setup can read ``metrics_port``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ENV_DATA_DIR = "MERGESWARM_DATA_DIR"


def default_data_dir() -> Path:
    """``$MERGESWARM_DATA_DIR``, else ``~/.mergeswarm``."""
    return Path(os.environ.get(ENV_DATA_DIR) or Path.home() / ".mergeswarm")


@dataclass(frozen=True)
class DataDir:
    root: Path

    @property
    def identity(self) -> Path:
        """Ed25519 key: signs records and deltas (``delta create --key`` takes the same)."""
        return self.root / "identity.pem"

    @property
    def p2p_key(self) -> Path:
        """libp2p key: fixes the peer id across restarts."""
        return self.root / "p2p.key"

    @property
    def swarm_id(self) -> Path:
        """The swarm this directory joined: a restart refuses another one."""
        return self.root / "swarm_id"

    @property
    def multiaddrs(self) -> Path:
        """Where the peer listens, one multiaddr a line, written once it is up."""
        return self.root / "multiaddrs"

    @property
    def metrics_port(self) -> Path:
        return self.root / "metrics_port"

    @property
    def control_port(self) -> Path:
        return self.root / "control_port"

    @property
    def control_token(self) -> Path:
        """The secret a caller of the control service shows (0600: this user only)."""
        return self.root / "control_token"

    @property
    def blobs(self) -> Path:
        """The blob store: deltas, snapshots, patches, momentum."""
        return self.root / "blobs"
