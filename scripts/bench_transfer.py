#!/usr/bin/env python
"""Benchmark blob transfer over loopback, with its baselines measured in the same run.

1. Two peers (the server in its own process): fetching a blob with the blob
   protocol (manifest checked against the id, every piece hashed as it
   lands, written to the store and fsynced) against a raw hivemind binary
   stream of the same bytes between the same two p2pd daemons (read and
   dropped), and against a plain TCP socket copy. ``--rounds`` of each,
   interleaved, after a warm-up round; the best and the median are reported.
2. Distribution to N peers (``mergeswarm seed`` daemons mirroring a head):
   every peer pulling from the origin only (``--no-upload``: nobody re-serves)
   against swarm distribution (peers serve the pieces they have). Reports
   the time until every peer holds the blob and how many copies the origin
   sent.

    .venv/bin/python scripts/bench_transfer.py              # 200 MB, 8 peers
    .venv/bin/python scripts/bench_transfer.py --mb 20 --peers 3   # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MERGESWARM = str(Path(sys.executable).with_name("mergeswarm"))

from bench_common import start_daemon  # noqa: E402 - after the path setup

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
RAW = "bench.raw"


# -- the server process of part 1 -------------------------------------------------------


def serve(args: argparse.Namespace) -> int:
    from node.config import SwarmOptions
    from node.net.blobs import BlobService, announce
    from node.net.blobstore import BlobStore
    from node.net.swarm import Swarm

    data_dir = Path(args.data_dir)
    swarm = Swarm(SwarmOptions(data_dir, host_maddrs=[LOOPBACK]))
    store = BlobStore(data_dir / "blobs")
    blob_id = store.add_file(args.blob)
    BlobService(swarm, store).register()
    announce(swarm, blob_id)
    data = Path(args.blob).read_bytes()

    async def raw(_info, _reader, writer: asyncio.StreamWriter) -> None:
        view = memoryview(data)
        for start in range(0, len(view), 1 << 20):
            writer.write(view[start : start + (1 << 20)])
            await writer.drain()
        writer.close()

    swarm.run(swarm.p2p.add_binary_stream_handler(RAW, raw))
    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=_tcp_server, args=(listener, data), daemon=True).start()
    info = {
        "maddrs": swarm.maddrs,
        "peer_id": swarm.peer_id.to_base58(),
        "blob_id": blob_id,
        "tcp_port": listener.getsockname()[1],
    }
    print(json.dumps(info), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    swarm.shutdown()
    return 0


def _tcp_server(listener: socket.socket, data: bytes) -> None:
    while True:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(data)


# -- part 1: two peers --------------------------------------------------------------------


def two_peers(root: Path, blob: Path, size: int, rounds: int) -> dict:
    """Seconds per transfer of each kind, ``rounds`` of each, interleaved, after one warm-up.

    Each fetched copy is deleted just before the next fetch rather than right after it:
    this machine is a VM whose host backs guest pages lazily, and page cache freed a
    second earlier is handed back to the host, so a fetch into it pays a host fault per
    4 KiB page (measured: +0.3-0.5 s of system time per 200 MB, in every other round).
    The raw stream and the TCP copy write nothing, so they never pay it.
    """
    from hivemind.p2p import PeerID

    from node.config import SwarmOptions
    from node.net.blobs import fetch
    from node.net.blobstore import BlobStore
    from node.net.swarm import Swarm

    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--blob", str(blob), "--data-dir", str(root / "srv")],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        info = json.loads(server.stdout.readline())
        client = Swarm(SwarmOptions(root / "cli", join=info["maddrs"], host_maddrs=[LOOPBACK]))
        try:
            peer = PeerID.from_base58(info["peer_id"])
            results: dict[str, list[float]] = {"blob": [], "raw": [], "tcp": []}
            previous = None
            for n in range(rounds + 1):  # the first round warms the connection up, unmeasured
                if previous is not None:
                    shutil.rmtree(previous)
                store = BlobStore(root / "cli" / f"blobs-{n}")
                start = time.perf_counter()
                fetch(client, store, info["blob_id"], timeout=600, serve_while_fetching=False)
                seconds = {"blob": time.perf_counter() - start}
                previous = store.root
                seconds["raw"] = client.run(_raw_read(client, peer, size))
                seconds["tcp"] = _tcp_read(info["tcp_port"], size)
                if n:
                    for kind, value in seconds.items():
                        results[kind].append(value)
        finally:
            client.shutdown()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    return results


async def _raw_read(client, peer, size: int) -> float:
    start = time.perf_counter()
    _, reader, writer = await client.p2p.call_binary_stream_handler(peer, RAW)
    got = 0
    while chunk := await reader.read(1 << 20):
        got += len(chunk)
    writer.close()
    if got != size:
        raise SystemExit(f"raw stream delivered {got} of {size} bytes")
    return time.perf_counter() - start


def _tcp_read(port: int, size: int) -> float:
    start = time.perf_counter()
    buf = bytearray(1 << 20)
    got = 0
    with socket.create_connection(("127.0.0.1", port)) as conn:
        while n := conn.recv_into(buf):
            got += n
    if got != size:
        raise SystemExit(f"TCP delivered {got} of {size} bytes")
    return time.perf_counter() - start


def piece_hashing(blob: Path) -> dict[str, float]:
    """Seconds for one core to hash the blob piece by piece: the piece hash blob ids use
    (BLAKE3) against SHA-256, which they used before (best of 3 passes each)."""
    import hashlib

    from protocol.ids import BLOB_PIECE, piece_digest

    data = memoryview(blob.read_bytes())
    pieces = [data[at : at + BLOB_PIECE] for at in range(0, len(data), BLOB_PIECE)]
    kinds = {"blake3": piece_digest, "sha256": lambda piece: hashlib.sha256(piece).digest()}
    seconds = {}
    for name, digest in kinds.items():
        passes = []
        for _ in range(3):
            start = time.perf_counter()
            for piece in pieces:
                digest(piece)
            passes.append(time.perf_counter() - start)
        seconds[name] = min(passes)
    return seconds


# -- part 2: distribution ---------------------------------------------------------------


def distribute(root: Path, blob: Path, peers: int, upload: bool) -> dict:
    from node.config import SwarmOptions
    from node.net.blobs import providers
    from node.net.swarm import Swarm
    from protocol.ids import file_id
    from protocol.records import HEAD, HEARTBEAT, Head

    procs = []
    try:
        origin, maddrs = start_daemon(
            root / "origin", "seed", "--heartbeat-every", "1", "--no-mirror"
        )
        procs.append(origin)
        subprocess.run(
            [MERGESWARM, "blob", "add", str(blob), "--data-dir", str(root / "origin")],
            check=True,
            capture_output=True,
        )
        blob_id = file_id(blob)
        extra = [] if upload else ["--no-upload"]
        dirs = [root / f"peer{i}" for i in range(peers)]
        for d in dirs:
            procs.append(
                start_daemon(d, "seed", "--join", maddrs[0], "--heartbeat-every", "1", *extra)[0]
            )
        observer = Swarm(SwarmOptions(root / "observer", join=maddrs, host_maddrs=[LOOPBACK]))
        try:
            origin_peer = maddrs[0].rsplit("/p2p/", 1)[1]
            while not any(p.peer_id == origin_peer for p in providers(observer, blob_id)):
                time.sleep(0.2)
            start = time.perf_counter()
            observer.publish(HEAD, Head(base_id="ab" * 32, round=0, deltas=0, snapshot_id=blob_id))
            while not all((d / "blobs" / blob_id).is_file() for d in dirs):
                if time.perf_counter() - start > 600:
                    raise SystemExit(f"{root}: the peers did not all get the blob in 10 minutes")
                time.sleep(0.05)
            seconds = time.perf_counter() - start
            time.sleep(2.5)  # one more heartbeat from the origin
            sent = next(
                r.body.bytes_out for r in observer.read(HEARTBEAT) if r.body.peer_id == origin_peer
            )
        finally:
            observer.shutdown()
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    return {"seconds": seconds, "origin_copies": sent / blob.stat().st_size}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=int, default=200, help="blob size in MB (default 200)")
    parser.add_argument(
        "--peers", type=int, default=8, help="peers that must all hold it, the origin included"
    )
    parser.add_argument(
        "--rounds", type=int, default=9, help="transfers of each kind between two peers (default 9)"
    )
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--blob", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args)
    os.environ.setdefault("HIVEMIND_LOGLEVEL", "WARNING")
    size = args.mb * 10**6
    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as tmp:
        root = Path(tmp)
        blob = root / "blob"
        blob.write_bytes(os.urandom(size))
        print(f"two peers, {args.mb} MB ...", file=sys.stderr)
        pair = two_peers(root / "pair", blob, size, args.rounds)
        hashing = piece_hashing(blob)
        print(f"{args.peers} peers, pulling from the origin ...", file=sys.stderr)
        pull = distribute(root / "pull", blob, args.peers - 1, upload=False)
        print(f"{args.peers} peers, swarm distribution ...", file=sys.stderr)
        swarm = distribute(root / "swarm", blob, args.peers - 1, upload=True)
    best = {k: min(v) for k, v in pair.items()}
    median = {k: statistics.median(v) for k, v in pair.items()}
    mbps = {k: size / v / 1e6 for k, v in best.items()}
    # Each round's blob and raw transfers ran back to back: their ratio cancels slow spells.
    ratios = [r / b for b, r in zip(pair["blob"], pair["raw"], strict=True)]
    lines = [
        "# bench_transfer: loopback, this machine",
        f"command: {' '.join(sys.argv)}",
        "",
        f"| transfer of one blob (best of {args.rounds}) | seconds | MB/s | ratio | median s |",
        "|---|---|---|---|---|",
        f"| blob protocol (pieces verified, stored) | {best['blob']:.2f} | {mbps['blob']:.0f} | "
        f"{best['raw'] / best['blob']:.2f} of raw stream | {median['blob']:.2f} |",
        f"| raw hivemind binary stream | {best['raw']:.2f} | {mbps['raw']:.0f} | 1.00 | "
        f"{median['raw']:.2f} |",
        f"| plain TCP socket | {best['tcp']:.2f} | {mbps['tcp']:.0f} | "
        f"{best['raw'] / best['tcp']:.1f}x raw stream | {median['tcp']:.2f} |",
        "",
        f"blob protocol / raw stream: {statistics.median(ratios):.2f} (median of the rounds), "
        f"{median['raw'] / median['blob']:.2f} (ratio of the medians); per round: "
        + " ".join(f"{r:.2f}" for r in ratios),
        "",
        f"piece hashes on one core: BLAKE3 {size / hashing['blake3'] / 1e6:.0f} MB/s "
        f"({hashing['blake3']:.3f} s), SHA-256 {size / hashing['sha256'] / 1e6:.0f} MB/s "
        f"({hashing['sha256']:.3f} s): {hashing['sha256'] / hashing['blake3']:.1f}x",
        "",
        f"| {args.peers} peers all hold it | seconds | copies sent by the origin |",
        "|---|---|---|",
        f"| everyone pulls from the origin | {pull['seconds']:.1f} | {pull['origin_copies']:.2f} |",
        f"| swarm distribution | {swarm['seconds']:.1f} | {swarm['origin_copies']:.2f} |",
    ]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "pair": pair,
                    "ratios": ratios,
                    "hashing": hashing,
                    "pull": pull,
                    "swarm": swarm,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
