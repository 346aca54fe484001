"""A swarm's config: what every peer of one swarm must agree on, written by ``mergeswarm init``.

It names the genesis base, the merge recipe and outer optimizer, the volunteers' DARE drop rate and
codec, the round policy, how aggregators screen deltas, and the aggregators
volunteers trust. Aggregators publish it in the DHT (record kind ``config``),
so a volunteer needs only a multiaddr; one that pins ``--swarm-config`` or
already adopted a config keeps its own.

The swarm id commits to who is trusted: ``mergeswarm init`` ends it with
``-t`` and a hash of the genesis id and the aggregators' keys (the trust
anchor). A config whose genesis or aggregators do not hash to its swarm id's
anchor does not validate, so no config record a stranger publishes can name
other aggregators: a peer that joins with nothing but the swarm id (learned
from the peer it joins through, and checked by every record's key) follows
only the aggregators the swarm was made with. Ids without an anchor (older
swarms) keep the old rule: the config of the smallest trusted author. Later configs (epochs
1, 2, ...) are handed over by the aggregators of the one before (protocol.handover).
"""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from protocol.constants import DEFAULT_CODEC, DEFAULT_DROP_RATE, CodecName
from protocol.errors import MergeswarmError, one_line
from protocol.schema import Body, Hex64, SwarmId

CONFIG_VERSION = 1
# what a merge bounds each delta entry by, in the tensor's robust scale: far above what honest
# deltas reach (scripts/bench_robustness.py prints the largest ratio: 5.9 on the tiny demo
# model after 30 steps, 2.2 on SmolLM2-135M after 6), far below a spike's
ENTRY_CLIP = 20.0
ANCHOR_HEX = 16  # hex digits of the trust anchor at the end of a swarm id (64 bits)
_ANCHORED = re.compile(rf"-t([0-9a-f]{{{ANCHOR_HEX}}})$")


def trust_anchor(genesis_id: str, aggregators: Iterable[str]) -> str:
    """The hash a swarm id ends with: the genesis and the set of trusted aggregators."""
    text = "mergeswarm-trust-v1\n" + genesis_id + "\n" + ",".join(sorted(set(aggregators)))
    return hashlib.sha256(text.encode()).hexdigest()[:ANCHOR_HEX]


def anchored_swarm_id(name: str, genesis_id: str, aggregators: Iterable[str]) -> str:
    """``name`` with the trust anchor of the genesis and aggregators appended."""
    return f"{name}-t{trust_anchor(genesis_id, aggregators)}"


def swarm_anchor(swarm_id: str) -> str | None:
    """The trust anchor a swarm id ends with; None for an id without one."""
    found = _ANCHORED.search(swarm_id)
    return found.group(1) if found else None


class SwarmConfigError(MergeswarmError):
    """A swarm config file is unreadable or holds a wrong value."""


class SwarmConfig(Body):
    """Every field is also a flag of ``mergeswarm init`` (``round_period`` -> ``--round-period``)."""

    # inf or nan would pass the bounds below yet cannot be signed (canonical JSON has neither)
    model_config = Body.model_config | {"allow_inf_nan": False}

    version: Literal[1] = Field(CONFIG_VERSION, json_schema_extra={"cli": False})
    swarm_id: SwarmId = Field(json_schema_extra={"cli": False})
    genesis_id: Hex64 = Field(json_schema_extra={"cli": False})
    # 0: the config the swarm id's anchor commits to; each handover (protocol.handover) adds one
    epoch: int = Field(0, ge=0, le=1024, json_schema_extra={"cli": False})
    # Defaults of the recipe and outer step: the best of scripts/bench_quality.py on
    # SmolLM2-135M (docs/benchmarks.md). TIES did far worse on DARE-sparse deltas: their
    # random masks rarely overlap, and its disjoint mean keeps a lone entry whole where
    # averaging divides it by the number of deltas.
    merge_method: Literal[
        "ties", "dare_ties", "task_arithmetic", "linear", "trimmed_mean", "median", "centered_clip"
    ] = Field("linear", description="how aggregators merge the round's deltas")
    density: float = Field(
        0.5, gt=0, le=1, description="TIES: fraction of each delta's largest entries kept"
    )
    lam: float = Field(
        1.0,
        gt=0,
        le=10,
        description="lambda: scale of the merged delta",
        json_schema_extra={"flag": "lambda"},
    )
    sign_method: Literal["total", "frequency"] = Field(
        "total", description="TIES sign election: by total mass or by count"
    )
    outer_optimizer: Literal["none", "nesterov"] = Field(
        "nesterov",
        description="how a round's merged delta moves the head: added as it is, or as an outer "
        "gradient with Nesterov momentum (DiLoCo)",
    )
    outer_lr: float = Field(1.2, gt=0, le=10, description="nesterov: the outer learning rate")
    outer_momentum: float = Field(
        0.5, ge=0, lt=1, description="nesterov: the outer momentum factor"
    )
    outer_warmup: int = Field(
        0, ge=0, le=10_000, description="nesterov: rounds over which the outer lr ramps up"
    )
    drop_rate: float = Field(
        DEFAULT_DROP_RATE, ge=0, lt=1, description="volunteers' DARE drop rate"
    )
    codec: CodecName = Field(DEFAULT_CODEC, description="volunteers' delta value codec")
    error_feedback: bool = Field(
        False,
        description="volunteers keep what a delta leaves out (dropped entries, codec rounding) "
        "and add it to their next delta; kept entries are then sent as they are, not scaled up "
        "by 1 / (1 - drop rate)",
    )
    round_period: float = Field(
        300.0, ge=1, le=86400, description="seconds from one head to the next round's merge"
    )
    min_deltas: int = Field(1, ge=1, le=32, description="deltas a round waits for")
    max_deltas: int = Field(16, ge=1, le=32, description="deltas merged in one round at most")
    staleness: int = Field(
        1, ge=0, le=8, description="rounds behind the head a delta may be and still be merged"
    )
    staleness_discount: float = Field(
        0.5, gt=0, le=1, description="weight of a delta per round it is behind the head"
    )
    on_new_head: Literal["finish", "restart"] = Field(
        "finish", description="volunteers: finish the round on a new head, or restart on it"
    )
    norm_factor: float = Field(
        10.0, gt=1, description="a delta whose norm exceeds this many times the median is screened"
    )
    norm_action: Literal["reject", "clip"] = Field(
        "reject", description="what screening does to it: reject it, or scale it to the bound"
    )
    entry_clip: float = Field(
        ENTRY_CLIP,
        ge=0,
        le=1e6,
        description="bound every delta entry by this many times its tensor's robust scale "
        "(the median over the round's deltas of their RMS over kept entries; 0: no bound)",
    )
    gain_share: float = Field(
        0.25,
        gt=0,
        le=1,
        description="aggregators with evaluation data: a delta whose loss gain is at least this "
        "share of the round's best weighs fully, less below it",
    )
    newcomer_share: float = Field(
        0.25,
        gt=0,
        le=1,
        description="deltas by new keys (none of their deltas weighed at least half in a merged "
        "round) weigh together at most this share of a round that established authors take "
        "part in (1: no cap)",
    )
    max_delta_bytes: int = Field(
        1 << 32, ge=1 << 10, le=1 << 40, description="largest delta an aggregator fetches"
    )
    snapshot_every: int = Field(
        5, ge=1, description="rounds between full snapshots (patches in between)"
    )
    aggregators: tuple[Hex64, ...] = Field(
        default=(),
        max_length=16,
        description="public keys of the aggregators volunteers follow (none: any, for experiments)",
        json_schema_extra={"flag": "aggregator", "metavar": "AUTHOR"},
    )

    @model_validator(mode="after")
    def _consistent(self) -> SwarmConfig:
        if self.min_deltas > self.max_deltas:
            raise ValueError(f"min_deltas {self.min_deltas} exceeds max_deltas {self.max_deltas}")
        anchor = swarm_anchor(self.swarm_id)
        if self.epoch > 0 and anchor is None:
            raise ValueError("only a swarm whose id carries a trust anchor has epochs past 0")
        if (  # a later epoch is checked against the one before it (protocol.handover)
            anchor is not None
            and self.epoch == 0
            and anchor != trust_anchor(self.genesis_id, self.aggregators)
        ):
            raise ValueError(
                f"the genesis and aggregators do not match swarm {self.swarm_id}'s trust anchor"
            )
        return self

    def trusts(self, author: str) -> bool:
        return not self.aggregators or author in self.aggregators

    def to_toml(self) -> str:
        lines = ["# mergeswarm swarm config (mergeswarm init); every field: mergeswarm init --help"]
        for key, value in self.model_dump(mode="json").items():
            lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def parse_config(values: dict, where: str) -> SwarmConfig:
    """A config from TOML or flag values (ints for floats, strings, lists: coerced here)."""
    try:
        return SwarmConfig.model_validate(values, strict=False)
    except ValidationError as exc:
        raise SwarmConfigError(f"{where}: {one_line(exc)}") from None


def load_swarm_config(path: str | os.PathLike[str]) -> SwarmConfig:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SwarmConfigError(
            f"{path}: no such swarm config (make one with mergeswarm init)"
        ) from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SwarmConfigError(f"{path}: not a readable TOML file ({exc})") from None
    return parse_config(data, str(path))
