#!/usr/bin/env python
"""Benchmark the swarm across the network lab (node/demo/lab.py; needs root), with its
baseline measured in the same run.

1. A volunteer behind the NAT router (it finds out it cannot be reached and runs in client
   mode by itself): seconds from its start to the first head that merges one of its deltas
   (a seed and an aggregator on the public side, the tiny demo model).
2. A blob of ``--mb`` MB (default 100) from a seed on the public side to a peer on the
   slow, lossy link (`mergeswarm blob get`), against a plain TCP socket copy of as many
   bytes between the same two namespaces.

    .venv/bin/python scripts/bench_lab.py [--mb 100] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from node.demo.lab import (  # noqa: E402
    MERGESWARM,
    PORT,
    TRAIN,
    Lab,
    lab_unavailable,
    log_records,
)

COPY_PORT = PORT + 2


def _wait(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.5)
    raise SystemExit(f"bench_lab: timed out waiting for {what}")


def nat_to_first_merge(lab: Lab, work: Path) -> float:
    """Seconds from a NATed volunteer's start to the first head merging one of its deltas."""
    from node.training.tiny_model import build_tiny_model

    genesis = build_tiny_model(work / "genesis", seed=0)
    config = work / "swarm.toml"
    subprocess.run([MERGESWARM, "init", "--genesis", str(genesis), "-o", str(config),
                    "--aggregator-dir", str(work / "agg"), "--round-period", "3",
                    "--min-deltas", "1", "--staleness", "0", "--drop-rate", "0.5"],
                   check=True, capture_output=True)  # fmt: skip
    swarm_id = _config_swarm_id(config)
    seed_host, agg_host, home = lab.public(), lab.public(), lab.home()
    seed = lab.launch(seed_host, work / "seed", "seed", "--swarm-id", swarm_id)
    join = lab.maddr(seed_host, seed.peer_id)
    agg = lab.launch(agg_host, work / "agg", "aggregator", "--config", str(config),
                     "--genesis", str(genesis), "--join", join)  # fmt: skip
    _wait(lambda: log_records(agg.log, "published head: round 0"), 120, "the genesis head")
    data = work / "data.jsonl"
    from node.training.tiny_model import CORPUS

    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS * 2))
    started = time.monotonic()
    volunteer = lab.launch(home, work / "home", "node", "--join", join, "--data", str(data),
                           *TRAIN)  # fmt: skip

    def merged():
        mine = {a.get("delta_id") for a in log_records(volunteer.log, "round ")}
        return any(set(h.get("merged", [])) & mine for h in log_records(agg.log, "published"))

    _wait(merged, 600, "the NATed volunteer's first merged delta")
    took = time.monotonic() - started
    if "restarting in client mode" not in volunteer.log.read_text():
        raise SystemExit("bench_lab: the NATed volunteer did not switch to client mode")
    return took


def _config_swarm_id(config: Path) -> str:
    from protocol.swarm_config import load_swarm_config

    return load_swarm_config(config).swarm_id


def blob_over_lossy_link(lab: Lab, work: Path, mb: int) -> tuple[float, float]:
    """(seconds for `blob get`, seconds for a plain TCP copy) of ``mb`` MB from a public seed
    to the lossy host."""
    blob = work / "blob"
    blob.write_bytes(os.urandom(mb << 20))
    origin, lossy = lab.public(), lab.lossy()
    out = subprocess.run([MERGESWARM, "blob", "add", str(blob), "--data-dir",
                          str(work / "origin")], check=True, capture_output=True, text=True)  # fmt: skip
    blob_id = out.stdout.strip()
    seed = lab.launch(origin, work / "origin", "seed", "--no-mirror")
    join = lab.maddr(origin, seed.peer_id)
    started = time.monotonic()
    subprocess.run(lab.cmd(lossy, MERGESWARM, "blob", "get", blob_id, "--join", join,
                           "-o", str(work / "got"), "--timeout", "1800",
                           "--host-maddr", f"/ip4/0.0.0.0/tcp/{PORT}"),
                   check=True, capture_output=True)  # fmt: skip
    fetched = time.monotonic() - started
    server = subprocess.Popen(lab.cmd(origin, sys.executable, "-c", _SEND, str(blob),
                                      str(COPY_PORT)))  # fmt: skip
    time.sleep(1.0)
    started = time.monotonic()
    subprocess.run(lab.cmd(lossy, sys.executable, "-c", _RECEIVE, lab.addresses[origin],
                           str(COPY_PORT), str(mb << 20)), check=True)  # fmt: skip
    copied = time.monotonic() - started
    server.wait(timeout=60)
    return fetched, copied


_SEND = """
import socket, sys
s = socket.create_server(("0.0.0.0", int(sys.argv[2])))
c, _ = s.accept()
with open(sys.argv[1], "rb") as f:
    c.sendfile(f)
c.close()
"""
_RECEIVE = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
left = int(sys.argv[3])
while left > 0:
    got = c.recv(1 << 20)
    if not got:
        raise SystemExit("short copy")
    left -= len(got)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100, help="blob size in MB (default 100)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the figures here")
    args = parser.parse_args()
    why = lab_unavailable()
    if why:
        raise SystemExit(f"bench_lab: {why}")
    with tempfile.TemporaryDirectory(prefix="bench-lab-") as tmp:
        work = Path(tmp)
        (work / "nat").mkdir()
        (work / "blob").mkdir()
        lab = Lab()
        try:  # the lab's processes end before their directories go
            first_merge = nat_to_first_merge(lab, work / "nat")
            fetched, copied = blob_over_lossy_link(lab, work / "blob", args.mb)
        finally:
            lab.close()
    figures = {
        "nat_volunteer_seconds_to_first_merge": round(first_merge, 1),
        "lossy_link": lab.shaping,
        "blob_mb": args.mb,
        "blob_get_seconds": round(fetched, 1),
        "tcp_copy_seconds": round(copied, 1),
        "blob_get_over_tcp": round(fetched / copied, 2),
    }
    print(f"NATed volunteer, start to first merged delta: {first_merge:.1f} s")
    print(f"{args.mb} MB over the lossy link ({lab.shaping}):")
    print(f"  mergeswarm blob get  {fetched:7.1f} s")
    print(f"  plain TCP copy       {copied:7.1f} s   (blob get / TCP = {fetched / copied:.2f})")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
