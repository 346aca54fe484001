"""How the swarm sees a peer (node.net.reach): which addresses may be dialed back, the
dial-back itself on loopback, and the lines the operator reads."""

from __future__ import annotations

import asyncio
import socket

from node.net.reach import (
    CLOCK_TOLERANCE,
    Reachability,
    clock_verdict,
    dial_back,
    dialable,
    refused_clock,
    tcp_address,
    verdict,
)

OBSERVED = "/ip4/203.0.113.7/tcp/51234"


def test_tcp_multiaddrs_are_read_and_others_are_not():
    assert tcp_address("/ip4/10.0.0.2/tcp/31337/p2p/QmPeer") == ("10.0.0.2", 31337)
    assert tcp_address("/ip6/::1/tcp/8080") == ("::1", 8080)
    for other in ("/ip4/10.0.0.2/udp/31337/quic", "/ip4/10.0.0.2/tcp/0", "/ip4/::1/tcp/80",
                  "/dns4/example/tcp/80", "/ip4/999.0.0.1/tcp/80", "garbage", ""):  # fmt: skip
        assert tcp_address(other) is None, other


def test_only_addresses_on_the_askers_own_ip_are_dialed_and_at_most_eight():
    asked = ["/ip4/203.0.113.7/tcp/4001", "/ip4/198.51.100.1/tcp/4001",  # a third party
             "/ip4/10.0.0.2/tcp/4001", "/ip4/203.0.113.7/udp/4001/quic"]  # fmt: skip
    assert dialable(asked, OBSERVED) == [("/ip4/203.0.113.7/tcp/4001", "203.0.113.7", 4001)]
    many = [f"/ip4/203.0.113.7/tcp/{4000 + i}" for i in range(20)]
    assert len(dialable(many, OBSERVED)) == 8
    assert dialable(asked, "") == [] and dialable(asked, "/p2p-circuit") == []


def test_dial_back_finds_the_listening_port_and_not_the_closed_one():
    listening = socket.create_server(("127.0.0.1", 0))
    closed = socket.create_server(("127.0.0.1", 0))
    open_port, closed_port = listening.getsockname()[1], closed.getsockname()[1]
    closed.close()
    try:
        asked = [f"/ip4/127.0.0.1/tcp/{open_port}", f"/ip4/127.0.0.1/tcp/{closed_port}"]
        found = asyncio.run(dial_back(asked, "/ip4/127.0.0.1/tcp/40000"))
    finally:
        listening.close()
    assert found == [asked[0]]


def test_the_operator_is_told_what_the_swarm_sees_and_what_to_do():
    seen = Reachability("/ip4/198.51.100.1/tcp/4001/p2p/QmSeed", ["/ip4/10.0.0.2/tcp/4001"])
    ok, line = verdict(seen)
    assert not ok and "could not open a connection to any of /ip4/10.0.0.2/tcp/4001" in line
    assert "--announce-maddr" in line
    ok, line = verdict(Reachability("seed", ["/ip4/1.2.3.4/tcp/1"], ["/ip4/1.2.3.4/tcp/1"]))
    assert ok and line.startswith("reachable: seed opened a connection to /ip4/1.2.3.4/tcp/1")


def test_a_clock_off_by_more_than_the_dht_allows_is_named_with_the_fix():
    assert clock_verdict(Reachability("seed", [], skew=CLOCK_TOLERANCE - 0.5))[0]
    ok, line = clock_verdict(Reachability("seed", [], skew=-42.0))
    assert not ok and line.startswith("clock: 42 s ahead of seed's") and "NTP" in line
    ok, line = clock_verdict(Reachability("seed", [], skew=42.0))
    assert not ok and line.startswith("clock: 42 s behind seed's")


def test_hiveminds_refusal_of_a_wrong_clock_becomes_the_operators_line():
    refusal = ("local time must be within 3 seconds  of others(local: 1796425273.24145, "
               "peer: 1796425213.24585)")  # fmt: skip
    line = refused_clock(refusal)
    assert line is not None and line.startswith("clock: 60 s ahead of the swarm's peers' clocks")
    assert refused_clock("could not connect to any initial peer") is None
