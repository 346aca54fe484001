"""``mergeswarm doctor --join MULTIADDR``: the checks a peer would need to pass to take part,
one line each with a verdict and, where one fails, what to do, without joining for good."""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .daemon import add_join_args


@dataclass(frozen=True)
class Check:
    name: str
    verdict: str  # "ok", "warn" (works, but see the line) or "FAIL"
    line: str


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "doctor",
        help="check that this machine can take part in a swarm, and say what to fix",
        description="Start a short-lived peer, join through --join, and check: the join, the "
        "clock, whether the swarm can open connections to this machine (with the --host-maddr "
        "and --announce-maddr you would run with), the swarm's config, its head, its "
        "aggregators and who offers the head's blobs. One line per check; exits 1 if any "
        "fails.",
    )
    add_join_args(p, data_dir=False)
    p.set_defaults(run=run_doctor)


def run_doctor(args: argparse.Namespace) -> int:
    from node.config import JoinSettings
    from node.net.swarm import Swarm, SwarmError
    from node.settings import load_settings
    from protocol.errors import MergeswarmError

    join = load_settings(JoinSettings, args)
    if not join.join:
        raise MergeswarmError("give a peer of the swarm: --join MULTIADDR")
    with tempfile.TemporaryDirectory(prefix="mergeswarm-doctor-") as tmp:
        options = join.options(Path(tmp))
        try:
            swarm = Swarm(options)
        except SwarmError as exc:
            if str(exc).startswith("clock: "):  # hivemind refuses to start beside them
                _show(Check("clock", "FAIL", str(exc)))
            else:
                _show(Check("join", "FAIL", f"{exc}; check the multiaddr (it ends with "
                            "/p2p/<peer id>), that the peer runs, and that its port is open"))  # fmt: skip
            return 1
        try:
            checks = diagnose(swarm)
        finally:
            swarm.shutdown()
    for check in checks:
        _show(check)
    return 1 if any(c.verdict == "FAIL" for c in checks) else 0


def _show(check: Check) -> None:
    print(f"{check.verdict:<4}  {check.name:<12} {check.line}", flush=True)


def diagnose(swarm) -> list[Check]:
    """The checks, in order, for a peer that joined ``swarm`` (its reachability asked)."""
    from node.chain.history import current_head, find_config, trusted_authors
    from node.net.blobs import providers
    from node.net.reach import clock_verdict, verdict
    from protocol.constants import PROTOCOL_VERSION
    from protocol.records import HEARTBEAT

    r = swarm.reachability
    checks = [Check("join", "ok", f"swarm {swarm.swarm_id}, protocol {PROTOCOL_VERSION}")]
    if r is None:
        checks.append(Check("reachable", "warn", "no --join peer said how it sees this one"))
    else:
        clock_ok, clock_line = clock_verdict(r)
        checks.append(Check("clock", "ok" if clock_ok else "FAIL", clock_line))
        reachable, line = verdict(r)
        if not reachable:  # volunteers manage: they switch to client mode on their own
            line += " (a volunteer then runs in client mode by itself; seeds and aggregators "
            line += "must be reachable)"
        checks.append(Check("reachable", "ok" if reachable else "warn", line))
    config = find_config(swarm)
    if config is None:
        checks.append(Check("config", "FAIL", "no config from the swarm's aggregators in sight: "
                            "is an aggregator of this swarm running?"))  # fmt: skip
        return checks
    who = f"{len(config.aggregators)} aggregator(s)" if config.aggregators else "open swarm"
    checks.append(Check("config", "ok", f"epoch {config.epoch}, {who}"))
    trusted = trusted_authors(swarm, config)
    beats = [r for r in swarm.read(HEARTBEAT) if r.body.role == "aggregator"]
    alive = {b.author for b in beats if not trusted or b.author in trusted}  # unexpired ones
    if alive:
        checks.append(Check("aggregators", "ok", f"{len(alive)} heard from"))
    else:
        checks.append(Check("aggregators", "FAIL", "none of the swarm's aggregators is heard "
                            "from (heartbeats): no round will be merged"))  # fmt: skip
    head = current_head(swarm, trusted)
    if head is None:
        checks.append(Check("head", "FAIL", "no head yet: the swarm's first aggregator "
                            "publishes round 0 once started with --genesis"))  # fmt: skip
        return checks
    age = f", published {time.time() - head.created:.0f} s ago" if head.created else ""
    checks.append(Check("head", "ok", f"round {head.round}, base {head.base_id[:16]}{age}"))
    blob = head.patch_id or head.snapshot_id
    if blob is not None:
        offered = providers(swarm, blob, everyone=True)
        if offered:
            checks.append(Check("blobs", "ok", f"the head's newest blob is offered by "
                                f"{len(offered)} peer(s)"))  # fmt: skip
        else:
            checks.append(Check("blobs", "FAIL", f"nobody offers the head's blob {blob[:16]}: "
                                "start a seed (mergeswarm seed --join ...)"))  # fmt: skip
    return checks
