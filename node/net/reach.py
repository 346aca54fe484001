"""How the swarm sees a peer: can others open connections to it, and is its clock right.

A peer that joins asks the peer it joins through (in the SwarmInfo call, node.net.swarm) to
open a TCP connection to each address it announces, and to say from which address its own
connection comes and what time it is. A peer behind a NAT or a firewall learns so at start
(:func:`verdict`) instead of waiting for connections that never come; the daemons then run in
client mode (they fetch and push, and serve nobody), and ``mergeswarm doctor`` reports the
same checks. The answering peer dials only addresses on the IP the asker's connection comes
from, so nobody can make it probe a third party.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from dataclasses import dataclass, field

from hivemind.utils.timed_storage import MAX_DHT_TIME_DISCREPANCY_SECONDS

DIAL_TIMEOUT = 3.0  # seconds a dial-back connection may take
MAX_DIAL_BACK = 8  # addresses dialed for one asker
CLOCK_TOLERANCE = float(MAX_DHT_TIME_DISCREPANCY_SECONDS)  # what hivemind allows between peers


def tcp_address(maddr: str) -> tuple[str, int] | None:
    """(ip, port) of an /ip4|ip6/.../tcp/PORT multiaddr; None for any other kind."""
    parts = maddr.strip("/").split("/")
    if len(parts) < 4 or parts[0] not in ("ip4", "ip6") or parts[2] != "tcp":
        return None
    try:
        ip = ipaddress.ip_address(parts[1])
        port = int(parts[3])
    except ValueError:
        return None
    if not 0 < port < 65536 or (ip.version == 4) != (parts[0] == "ip4"):
        return None
    return str(ip), port


def dialable(maddrs: list[str], observed: str) -> list[tuple[str, str, int]]:
    """(maddr, ip, port) of those ``maddrs`` that may be dialed back for an asker whose
    connection comes from ``observed``: TCP, on the same IP, MAX_DIAL_BACK at most."""
    source = tcp_address(observed)
    if source is None:
        return []
    chosen = []
    for maddr in maddrs[:MAX_DIAL_BACK]:
        target = tcp_address(maddr)
        if target is not None and target[0] == source[0]:
            chosen.append((maddr, *target))
    return chosen


async def dial_back(maddrs: list[str], observed: str) -> list[str]:
    """Those of ``maddrs`` (limited by :func:`dialable`) that accept a TCP connection."""

    async def opens(ip: str, port: int) -> bool:
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(ip, port), timeout=DIAL_TIMEOUT
            )
        except (OSError, TimeoutError):
            return False
        writer.close()
        return True

    targets = dialable(maddrs, observed)
    results = await asyncio.gather(*(opens(ip, port) for _, ip, port in targets))
    return [maddr for (maddr, _, _), ok in zip(targets, results, strict=True) if ok]


@dataclass(frozen=True)
class Reachability:
    """What one peer of the swarm said about this one."""

    asked: str  # the peer that checked (its multiaddr)
    announced: list[str]  # the addresses this peer asked it to dial
    reachable: list[str] = field(default_factory=list)
    observed: str = ""  # where this peer's connection came from, as the other saw it
    skew: float | None = None  # the other's clock minus this one's, in seconds


def verdict(r: Reachability) -> tuple[bool, str]:
    """(reachable, one line for the operator: what the swarm sees and what to do)."""
    if r.reachable:
        return True, f"reachable: {r.asked} opened a connection to {', '.join(r.reachable)}"
    seen = f" (its connection came from {r.observed})" if r.observed else ""
    if not r.announced:
        return False, "not reachable: this peer announces no address others could dial"
    return False, (
        f"not reachable: {r.asked} could not open a connection to any of "
        f"{', '.join(r.announced)}{seen}; behind a NAT or a firewall, forward the TCP port "
        "and give --announce-maddr /ip4/PUBLIC_IP/tcp/PORT, or run in client mode"
    )


def clock_verdict(r: Reachability) -> tuple[bool, str]:
    """(clock within hivemind's tolerance, one line for the operator)."""
    if r.skew is None:
        return True, "clock: not checked (the peer did not say its time)"
    return clock_check(r.skew, f"{r.asked}'s")


def clock_check(skew: float, whose: str) -> tuple[bool, str]:
    """(within tolerance, the line) for a clock ``skew`` seconds behind ``whose`` clock
    (negative: ahead of it)."""
    if abs(skew) <= CLOCK_TOLERANCE:
        return True, f"clock: {abs(skew):.1f} s from {whose}"
    side = "behind" if skew > 0 else "ahead of"
    return False, (
        f"clock: {abs(skew):.0f} s {side} {whose}, more than the {CLOCK_TOLERANCE:g} s "
        "the DHT tolerates (records would be refused): set the clock (enable NTP, e.g. "
        "`timedatectl set-ntp true`)"
    )


_HIVEMIND_SKEW = re.compile(r"local: ([0-9.e+-]+), peer: ([0-9.e+-]+)")


def refused_clock(message: str) -> str | None:
    """The operator's line for hivemind's refusal to start beside peers whose clocks differ
    (``message``: its error), or None for another error."""
    found = _HIVEMIND_SKEW.search(message)
    if "local time must be within" not in message or found is None:
        return None
    local, peer = (float(x) for x in found.groups())
    return clock_check(peer - local, "the swarm's peers' clocks")[1]
