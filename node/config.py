"""Settings models of the daemons: what each role takes, with defaults in one place.

Pydantic models (and one dataclass) only, so that building the command line
imports neither torch nor hivemind. Flags, ``MERGESWARM_*`` variables and
TOML keys derive from these fields (see node.settings).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from protocol.constants import DEFAULT_CODEC, DEFAULT_DROP_RATE, CodecName


@dataclass
class SwarmOptions:
    """How a peer joins.

    :param data_dir: where identity, swarm id and blobs live.
    :param join: multiaddrs of peers already in the swarm; empty starts a new swarm.
    :param swarm_id: pin the swarm id (else learned from the swarm, or generated).
    :param host_maddrs: where to listen (``/ip4/0.0.0.0/tcp/PORT`` for all interfaces).
    :param announce_maddrs: addresses to advertise instead of the listening ones.
    :param client_mode: do not serve DHT requests (for peers others cannot dial).
    :param use_relay: dial peers behind NAT through relays.
    :param use_auto_relay: look for relays that make this peer reachable behind NAT.
    """

    data_dir: Path
    join: list[str] = field(default_factory=list)
    swarm_id: str | None = None
    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"])
    announce_maddrs: list[str] = field(default_factory=list)
    client_mode: bool = False
    use_relay: bool = True
    use_auto_relay: bool = False
    startup_timeout: float = 30.0
    p2p_metrics_addr: str | None = None


TRUSTED_AGGREGATORS: dict = {  # a field of every role that follows heads by itself
    "default_factory": list,
    "json_schema_extra": {"metavar": "AUTHOR"},
    "description": "follow heads only from these authors (64-hex keys); none: any",
}


PORT: dict = {"ge": 0, "le": 65535, "json_schema_extra": {"metavar": "PORT"}}


class JoinSettings(BaseModel):
    """How a daemon joins its swarm (flags, ``MERGESWARM_*`` env and TOML keys of every role)."""

    model_config = ConfigDict(extra="forbid")

    join: list[str] = Field(
        json_schema_extra={"metavar": "MULTIADDR"},
        default_factory=list,
        description="multiaddr of a peer in the swarm, e.g. /ip4/1.2.3.4/tcp/31337/p2p/Qm...; "
        "none starts a new swarm",
    )
    swarm_id: str | None = Field(
        None, description="pin the swarm id (default: learned from the --join peer, or new)"
    )
    host_maddr: list[str] = Field(
        json_schema_extra={"metavar": "MULTIADDR"},
        default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"],
        description="where to listen (all interfaces, any port by default)",
    )
    announce_maddr: list[str] = Field(
        json_schema_extra={"metavar": "MULTIADDR"},
        default_factory=list,
        description="address others should dial when it differs from the listening one "
        "(public IP or forwarded port; not port 0)",
    )
    client_mode: bool | None = Field(
        None,
        description="for peers others cannot reach (behind NAT): serve no DHT requests; "
        "blobs are pushed to a reachable seed or aggregator (unset: volunteers take it up "
        "when the peer they join through cannot open a connection to them)",
    )
    relay: bool = Field(True, description="dial peers behind NAT through relays")
    auto_relay: bool = Field(
        False, description="behind NAT: find relays through which others can reach this peer"
    )

    p2p_metrics: str | None = Field(
        None,
        json_schema_extra={"metavar": "HOST:PORT"},
        pattern=r"^[0-9A-Za-z.\-\[\]:]+:[0-9]{1,5}$",
        description="serve the libp2p daemon's own Prometheus metrics (reachability, "
        "connections, relays) on this address, e.g. 127.0.0.1:9101",
    )

    def options(self, data_dir: Path) -> SwarmOptions:
        return SwarmOptions(
            data_dir=data_dir,
            join=list(self.join),
            swarm_id=self.swarm_id,
            host_maddrs=list(self.host_maddr),
            announce_maddrs=list(self.announce_maddr),
            client_mode=bool(self.client_mode),
            use_relay=self.relay,
            use_auto_relay=self.auto_relay,
            p2p_metrics_addr=self.p2p_metrics,
        )


class TrainOptions(BaseModel):
    """How a volunteer trains (every field is also a node flag, env variable and TOML key)."""

    model_config = ConfigDict(extra="forbid")

    seq_len: int = Field(128, ge=8, le=1 << 16, description="tokens per packed training block")
    batch_size: int = Field(8, ge=1, description="blocks per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(3e-4, gt=0, description="peak AdamW learning rate")
    warmup_steps: int = Field(10, ge=0, description="linear warm-up steps")
    decay_steps: int = Field(
        1000, ge=1, description="cosine decay to 10% of --lr over this many steps, then flat"
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    lora: bool = Field(False, description="train LoRA adapters instead of every weight")
    lora_rank: int = Field(8, ge=1, description="LoRA rank")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA alpha (scale = alpha / rank)")
    lora_targets: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="module names LoRA adapts",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA (bf16 autocast where supported) when present, else CPU"
    )
    seed: int = Field(0, ge=0, description="seed of the data order and LoRA init")
    eval_blocks: int = Field(
        64, ge=1, description="held-out blocks measured before and after each round"
    )


class NodeSettings(TrainOptions):
    """A volunteer's settings beyond joining (flags, ``MERGESWARM_*`` env, TOML keys)."""

    swarm_config: Path | None = Field(
        None,
        json_schema_extra={"metavar": "swarm.toml"},
        description="the swarm's config (default: as published by its aggregators, then kept "
        "in the data dir)",
    )
    data: list[str] = Field(
        default_factory=list,
        json_schema_extra={"metavar": "FILE"},
        description="training data: JSONL ({'text'} or {'prompt','completion'}) or text files",
    )
    round_steps: int | None = Field(50, ge=1, description="optimizer steps per round")
    round_minutes: float | None = Field(
        None, gt=0, description="minutes per round (with --round-steps: whichever comes first)"
    )
    rounds_per_head: int | None = Field(
        None,
        ge=1,
        description="rounds to train on one head, then wait for the next (default: no limit; "
        "each round's delta replaces the last)",
    )
    on_new_head: Literal["finish", "restart"] = Field(
        "finish",
        description="a new head during a round: finish it (the delta is one round stale) "
        "or restart on the new base",
    )
    drop_rate: float = Field(
        DEFAULT_DROP_RATE, ge=0, lt=1, description="DARE drop rate of published deltas"
    )
    codec: CodecName = Field(DEFAULT_CODEC, description="delta value codec")
    error_feedback: bool = Field(
        False, description="keep what a delta leaves out and add it to the next (error feedback)"
    )
    checkpoint_every: int = Field(25, ge=1, description="save training state every N steps")
    trusted_aggregators: list[str] = Field(**TRUSTED_AGGREGATORS)


class DaemonSettings(JoinSettings):
    """What every long-running role takes besides joining: heart-beats and a metrics endpoint."""

    heartbeat_every: float = Field(
        15.0,
        gt=0,
        json_schema_extra={"metavar": "SECONDS"},
        description="publish this peer's heartbeat record this often",
    )
    metrics_port: int | None = Field(
        None,
        description="serve Prometheus /metrics and /healthz on this port (0: any free one)",
        **PORT,
    )
    metrics_host: str = Field(
        "127.0.0.1", json_schema_extra={"metavar": "HOST"}, description="address for --metrics-port"
    )
    retention_hours: float = Field(
        24.0,
        ge=0,
        json_schema_extra={"metavar": "HOURS"},
        description="delete blobs that nothing pins (old deltas, mirrored copies) once unused "
        "this long (0: keep them)",
    )


class VolunteerSettings(DaemonSettings, NodeSettings):
    """Everything ``mergeswarm node`` takes."""


class SeedSettings(DaemonSettings):
    """Everything ``mergeswarm seed`` takes."""

    quota_gb: float = Field(
        0.0,
        ge=0,
        json_schema_extra={"metavar": "GB"},
        description="blob store size limit (0: none)",
    )
    mirror: bool = Field(
        True,
        description="mirror the head's blobs and its unmerged deltas (--no-mirror: serve only "
        "what is added locally)",
    )
    publish_head: Path | None = Field(
        None,
        json_schema_extra={"metavar": "MODEL_DIR"},
        description="snapshot this model directory and publish it as the swarm's head (round "
        "0) until an aggregator publishes newer ones: how a swarm starts before aggregators "
        "exist",
    )
    trusted_aggregators: list[str] = Field(**TRUSTED_AGGREGATORS)
    upload: bool = Field(
        True,
        description="offer blobs to others (--no-upload: fetch what the swarm needs but offer "
        "nothing, for metered links)",
    )


class AggregatorSettings(DaemonSettings):
    """Everything ``mergeswarm aggregator`` takes besides the swarm's config."""

    genesis: Path | None = Field(
        None,
        json_schema_extra={"metavar": "MODEL_DIR"},
        description="the genesis model (needed by the first aggregator of a swarm only)",
    )
    lease_seconds: float = Field(
        30.0,
        gt=0,
        json_schema_extra={"metavar": "SECONDS"},
        description="a round's lease lapses this long after its holder stops renewing it",
    )
    eval_data: list[str] = Field(
        default_factory=list,
        json_schema_extra={"metavar": "FILE"},
        description="gate each merge on the loss over this data (JSONL or text)",
    )
    eval_max_increase: float = Field(
        0.05,
        ge=0,
        json_schema_extra={"metavar": "FRACTION"},
        description="with --eval-data: refuse a head whose loss rose by more than this fraction",
    )
    volunteers: list[str] = Field(
        default_factory=list,
        json_schema_extra={"metavar": "AUTHOR|FILE"},
        description="a closed swarm: take deltas only from these volunteer keys (as each "
        "daemon prints at start), or from the keys in FILE, one per line",
    )

    def allowed_volunteers(self) -> frozenset[str] | None:
        """The volunteer keys named (files read), or None: any volunteer."""
        if not self.volunteers:
            return None
        keys: set[str] = set()
        for item in self.volunteers:
            lines = Path(item).read_text().split() if not _is_key(item) else [item]
            for key in lines:
                if not _is_key(key):
                    raise ValueError(f"--volunteers {item}: {key[:80]!r} is not a volunteer key")
                keys.add(key)
        return frozenset(keys)


def _is_key(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


class MonitorSettings(DaemonSettings):
    """Everything ``mergeswarm monitor`` takes: its metrics endpoint is the point of it."""

    metrics_port: int | None = Field(
        9400, description="Prometheus port for the whole swarm's metrics (0: any free one)", **PORT
    )
