"""A network of hosts in Linux network namespaces, for tests and benchmarks of real networks
(needs root: ip netns, veth, a bridge, iptables; tests/test_lab.py, scripts/bench_lab.py).

    public bridge 10.77.0.0/24 ── pubN hosts (seeds, aggregators): reachable by everyone
        │                     └── lossy: a slow, lossy link (shaped on its side)
        └── nat (10.77.0.254) ── MASQUERADE ── home bridge 192.168.77.0/24 ── homeN hosts

Home hosts reach the public ones through the NAT router; nothing on the public side can
open a connection to them (no route, and the router only forwards replies). Every name is
prefixed with a tag of this process, so two labs do not meet, and :meth:`Lab.close` kills
every process inside and deletes every namespace, whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from node.daemon.launch import SHARED_CORES_ENV, PeerProcess, launch_peer

PUBLIC_NET, HOME_NET = "10.77.0", "192.168.77"
MERGESWARM = str(Path(sys.executable).with_name("mergeswarm"))
PORT = 31337  # every host listens here: each namespace has its own ports
NAT_PUBLIC_IP = f"{PUBLIC_NET}.254"
LOSSY = {"delay_ms": 80, "loss": 0.01, "rate_mbit": 20}
# a volunteer's flags for short rounds on the tiny model
TRAIN = ("--round-steps", "8", "--seq-len", "32", "--batch-size", "4", "--eval-blocks", "4",
         "--lr", "2e-3", "--warmup-steps", "2", "--heartbeat-every", "1")  # fmt: skip


def lab_unavailable() -> str | None:
    """Why a lab cannot be built here (None: it can)."""
    if os.geteuid() != 0:
        return "the network lab needs root (ip netns, veth, iptables)"
    for tool in ("ip", "iptables", "tc"):
        if shutil.which(tool) is None:
            return f"the network lab needs {tool} (scripts/install_system.sh installs it)"
    return None


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip() or out.stdout.strip()}")
    return out


class Lab:
    """The namespaces of one lab; hosts are made by :meth:`public`, :meth:`home` and
    :meth:`lossy`, commands run in one with :meth:`cmd`."""

    def __init__(self) -> None:
        self.tag = f"ms{os.getpid() % 100000}"
        self.namespaces: list[str] = []
        self.addresses: dict[str, str] = {}  # host -> its IP
        self.shaping = ""  # how the lossy link was made (netem may be missing in the kernel)
        self._links = 0
        self._homes = 0
        self._publics = 0
        self._netns("pub")
        self.sh("pub", "ip", "link", "add", "br0", "type", "bridge")
        self.sh("pub", "ip", "link", "set", "br0", "up")
        self._netns("nat")
        self._plug("nat", "pub", NAT_PUBLIC_IP, iface="wan")
        self.sh("nat", "ip", "link", "add", "br1", "type", "bridge")
        self.sh("nat", "ip", "addr", "add", f"{HOME_NET}.1/24", "dev", "br1")
        self.sh("nat", "ip", "link", "set", "br1", "up")
        self.sh("nat", "sysctl", "-qw", "net.ipv4.ip_forward=1")
        self.sh("nat", "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "wan",
                "-j", "MASQUERADE")  # fmt: skip
        # a home router: replies come back in, nothing new does
        self.sh("nat", "iptables", "-A", "FORWARD", "-i", "wan", "-m", "conntrack",
                "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")  # fmt: skip
        self.sh("nat", "iptables", "-A", "FORWARD", "-i", "wan", "-j", "DROP")

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def sh(self, host: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run("ip", "netns", "exec", self.ns(host), *cmd, check=check)

    def cmd(self, host: str, *cmd: str) -> list[str]:
        """``cmd`` to run in ``host``'s namespace (for Popen)."""
        return ["ip", "netns", "exec", self.ns(host), *cmd]

    def _netns(self, host: str) -> None:
        _run("ip", "netns", "add", self.ns(host))
        self.namespaces.append(host)
        self.sh(host, "ip", "link", "set", "lo", "up")

    def _plug(self, host: str, bridge_host: str, ip: str, iface: str = "eth0") -> str:
        """A veth from ``host`` (as ``iface``, with ``ip``/24) into ``bridge_host``'s bridge;
        the name of the bridge side."""
        self._links += 1
        side = f"v{self._links}"
        bridge = "br0" if bridge_host == "pub" else "br1"
        _run("ip", "-n", self.ns(bridge_host), "link", "add", side, "type", "veth",
             "peer", "name", iface, "netns", self.ns(host))  # fmt: skip
        _run("ip", "-n", self.ns(bridge_host), "link", "set", side, "master", bridge, "up")
        self.sh(host, "ip", "addr", "add", f"{ip}/24", "dev", iface)
        self.sh(host, "ip", "link", "set", iface, "up")
        self.addresses[host] = ip
        return side

    def public(self) -> str:
        """A new host on the public bridge; its name."""
        self._publics += 1
        host = f"pub{self._publics}"
        self._netns(host)
        self._plug(host, "pub", f"{PUBLIC_NET}.{self._publics + 1}")
        return host

    def home(self) -> str:
        """A new host behind the NAT router; its name."""
        self._homes += 1
        host = f"home{self._homes}"
        self._netns(host)
        self._plug(host, "nat", f"{HOME_NET}.{self._homes + 1}")
        self.sh(host, "ip", "route", "add", "default", "via", f"{HOME_NET}.1")
        return host

    def lossy(self) -> str:
        """A public host on a slow, lossy link (LOSSY, shaped both ways: on the host's side
        for what it sends, on the bridge's side for what it receives): netem where the
        kernel has it (half the delay each way), else a token bucket for the rate and random
        drops for the loss, with no added delay."""
        self._publics += 1
        host = f"pub{self._publics}"
        self._netns(host)
        side = self._plug(host, "pub", f"{PUBLIC_NET}.{self._publics + 1}")
        d, loss, rate = LOSSY["delay_ms"], LOSSY["loss"], LOSSY["rate_mbit"]
        ends = ((self.ns(host), "eth0"), (self.ns("pub"), side))
        netem = (
            "netem",
            "delay",
            f"{d / 2:g}ms",
            "loss",
            f"{loss * 100:g}%",
            "rate",
            f"{rate}mbit",
        )
        if all(
            _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", *netem,
                 check=False).returncode == 0
            for ns, dev in ends
        ):  # fmt: skip
            self.shaping = f"{d} ms round trip, {loss:.0%} loss and {rate} Mbit/s each way (netem)"
            return host
        for ns, dev in ends:
            _run("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
                 "rate", f"{rate}mbit", "burst", "64kbit", "latency", "400ms")  # fmt: skip
        for chain in ("INPUT", "OUTPUT"):
            self.sh(host, "iptables", "-A", chain, "-m", "statistic", "--mode", "random",
                    "--probability", f"{loss}", "-j", "DROP")  # fmt: skip
        self.shaping = f"{rate} Mbit/s and {loss:.0%} loss each way (no netem here: no delay)"
        return host

    def cut(self, host: str) -> None:
        """Take ``host`` off the network (its link down); :meth:`heal` puts it back."""
        self.sh(host, "ip", "link", "set", "eth0", "down")

    def heal(self, host: str) -> None:
        self.sh(host, "ip", "link", "set", "eth0", "up")
        if host.startswith("home"):
            self.sh(host, "ip", "route", "replace", "default", "via", f"{HOME_NET}.1")

    def maddr(self, host: str, peer_id: str) -> str:
        return f"/ip4/{self.addresses[host]}/tcp/{PORT}/p2p/{peer_id}"

    def launch(
        self,
        host: str,
        data_dir: Path,
        command: str,
        *args: str,
        env: dict[str, str] | None = None,
        started: Callable[[subprocess.Popen], object] = lambda proc: None,
    ) -> PeerProcess:
        """``mergeswarm command`` in ``host``'s namespace, listening on PORT there (public
        hosts announce their address), logging to ``data_dir``.log; returns once it is up."""
        listen = ("--host-maddr", f"/ip4/0.0.0.0/tcp/{PORT}")
        if not host.startswith("home"):
            listen += ("--announce-maddr", f"/ip4/{self.addresses[host]}/tcp/{PORT}")
        argv = self.cmd(host, MERGESWARM, command, "--data-dir", str(data_dir), *listen, *args)
        return launch_peer(
            f"{command} on {host}",
            argv,
            data_dir=data_dir,
            log=data_dir.with_suffix(".log"),
            env=os.environ | SHARED_CORES_ENV | (env or {}),  # added to this process's
            timeout=120,
            started=started,
        )

    def close(self) -> None:
        """Kill what runs in the lab and delete its namespaces (errors ignored: best effort)."""
        for host in reversed(self.namespaces):
            pids = _run("ip", "netns", "pids", self.ns(host), check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        for host in reversed(self.namespaces):
            _run("ip", "netns", "del", self.ns(host), check=False)
        self.namespaces.clear()


def leftovers(tag: str) -> list[str]:
    """Namespaces of a lab tagged ``tag`` that still exist."""
    names = _run("ip", "netns", "list", check=False).stdout.split("\n")
    return [n.split()[0] for n in names if n.startswith(f"{tag}-")]


def log_records(log: Path, message: str) -> list[dict]:
    """The JSON log lines of a daemon (its ``log`` file) whose message starts with
    ``message``, each with the call's fields beside "msg" (node.daemon.logs)."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and str(entry.get("msg", "")).startswith(message):
            found.append(entry)
    return found
