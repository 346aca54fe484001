"""Membership of a swarm over the network: a hivemind DHT node, its libp2p handle.

One :class:`Swarm` per peer process; what it does with records is
:class:`node.net.member.SwarmMember`'s. It starts (or joins) the DHT with the
swarm's record validator, keeps the libp2p identity and the record-signing
key in the data directory (a restarted peer keeps its peer id and author),
learns the swarm id from the peer it joins through, and runs an asyncio loop
in a thread for the libp2p stream handlers (see node.net.blobs).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import os
import secrets
import signal
import threading
import time
from collections.abc import Awaitable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from hivemind import DHT
from hivemind.p2p import P2P, P2PContext, PeerID

from node.config import SwarmOptions
from node.data_dir import DataDir
from node.net.key_cap import cap_keys
from node.net.member import PeerDeaf, Record, SwarmError, SwarmMember
from node.net.reach import MAX_DIAL_BACK, Reachability, dial_back, refused_clock
from node.net.unary_calls import guard_dht_unary_calls, guard_unary_calls, reader_stopped
from protocol import transfer_pb2 as pb
from protocol.constants import PROTOCOL_VERSION
from protocol.durable import write_atomic
from protocol.identity import Identity
from protocol.peer_binding import load_p2p_key, peer_id_of
from protocol.record_validator import SwarmRecordValidator, rejection_counts
from protocol.records import is_swarm_id

if TYPE_CHECKING:
    from node.net.blobs.serve import ServeLimits
    from node.net.blobs.transfers import Transfers
    from node.net.blobstore import BlobStore

logger = logging.getLogger(__name__)

SWARM_INFO = "mergeswarm.SwarmInfo"
HEAD_TTL = 3600.0  # seconds a head record lives; its publisher refreshes it while it runs
DHT_TIMEOUT = 120.0  # seconds a store or get may take before the DHT process counts as stuck
REJOIN_SECONDS = 10.0  # between looks at whether the DHT node has lost every other node
CANCEL_POLL = 0.2  # seconds between looks at a cancel event while waiting on the loop
TAKEN_RETRIES = 5  # seconds to wait for a predecessor's DHT process to let go of the identity

T = TypeVar("T")


class Cancelled(SwarmError):
    """A call on the peer's loop was given up: the peer is stopping."""


class ProtocolMismatch(SwarmError):
    """The peer joined through speaks another mergeswarm protocol version."""


__all__ = ["HEAD_TTL", "Record", "Swarm", "SwarmError"]


class Swarm(SwarmMember):
    """A running peer's view of its swarm. Call :meth:`shutdown` when done."""

    reachability: Reachability | None = None  # what the --join peer said of this one

    def __init__(self, options: SwarmOptions) -> None:
        super().__init__()
        self.options = options
        self.data_dir = Path(options.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.identity = Identity.load_or_create(DataDir(self.data_dir).identity)
        self._pipe = threading.Lock()
        self.dht = self._start_dht()
        self.dht.run_coroutine(cap_keys)
        self.dht.run_coroutine(_exit_with_host)
        self.dht.run_coroutine(guard_dht_unary_calls)
        if options.join:
            self.dht.run_coroutine(functools.partial(_rejoin_when_alone, list(options.join)))
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="p2p", daemon=True)
        self._thread.start()
        try:
            self.p2p: P2P = self.run(_replica(self.dht))
            self.peer_id: PeerID = self.dht.peer_id
            self.p2p_key = load_p2p_key(DataDir(self.data_dir).p2p_key)
            if peer_id_of(self.binding) != self.peer_id.to_base58():
                raise SwarmError(f"{DataDir(self.data_dir).p2p_key} is not this peer's key")
            self.maddrs = [str(m) for m in self.dht.get_visible_maddrs()]
            self.swarm_id = self._settle_swarm_id()
            self.run(
                self.p2p.add_protobuf_handler(SWARM_INFO, self._swarm_info, pb.SwarmInfoRequest)
            )
        except BaseException:
            self.shutdown()
            raise

    def check_alive(self) -> None:
        why = reader_stopped(self.p2p)
        if why is not None:
            raise PeerDeaf(
                f"this peer stopped reading answers from its libp2p daemon ({why}): every "
                "call to and from it would time out. Restart it; its data dir keeps its work"
            )

    def write_multiaddrs(self) -> None:
        """Write this peer's multiaddrs to DATA_DIR/multiaddrs: a daemon does once it is up
        (its handlers registered, its stop signal caught), and launchers wait for the file."""
        text = "".join(m + "\n" for m in self.maddrs)
        write_atomic(DataDir(self.data_dir).multiaddrs, text.encode())

    def _start_dht(self) -> DHT:
        for attempt in range(TAKEN_RETRIES + 1):
            try:
                return self._try_start_dht()
            except SwarmError as exc:
                # The DHT process of a killed predecessor exits about a second after it.
                if "already taken" not in str(exc) or attempt == TAKEN_RETRIES:
                    raise
                time.sleep(1.0)
        raise AssertionError("unreachable")

    def _try_start_dht(self) -> DHT:
        o = self.options
        if o.p2p_metrics_addr:
            _serve_p2pd_metrics(o.p2p_metrics_addr)
        try:
            return DHT(
                initial_peers=o.join or None,
                start=True,
                client_mode=o.client_mode,
                record_validators=[SwarmRecordValidator()],
                identity_path=str(DataDir(self.data_dir).p2p_key),
                host_maddrs=o.host_maddrs,
                announce_maddrs=o.announce_maddrs or None,
                use_relay=o.use_relay,
                use_auto_relay=o.use_auto_relay,
                startup_timeout=o.startup_timeout,
            )
        except Exception as exc:  # noqa: BLE001 - hivemind raises bare Exceptions here
            clock = refused_clock(str(exc))
            if clock is not None:
                raise SwarmError(clock) from None
            hint = (
                " Check that the --join multiaddrs are reachable from here and include /p2p/<peer id>."
                if o.join
                else " Check --host-maddr."
            )
            raise SwarmError(f"could not start the DHT: {exc}.{hint}") from None

    def _settle_swarm_id(self) -> str:
        saved_path = DataDir(self.data_dir).swarm_id
        saved = saved_path.read_text().strip() if saved_path.is_file() else None
        swarm_id = self.options.swarm_id
        if self.options.join:
            try:
                swarm_id = swarm_id or self.ask_join_peer().swarm_id
            except ProtocolMismatch:
                raise
            except SwarmError as exc:
                if swarm_id is None:
                    raise SwarmError(f"{exc}; pass --swarm-id") from None
                logger.info("could not ask how the swarm sees this peer: %s", exc)
        swarm_id = swarm_id or saved or f"swarm-{secrets.token_hex(6)}"
        if not is_swarm_id(swarm_id):
            raise SwarmError(f"swarm id {swarm_id!r}: use 3-64 of a-z, 0-9 and '-'")
        if saved is not None and saved != swarm_id:
            raise SwarmError(
                f"{self.data_dir} belongs to swarm {saved!r}, not {swarm_id!r}; "
                "use another --data-dir for another swarm"
            )
        if saved is None:
            write_atomic(saved_path, swarm_id.encode() + b"\n")
        return swarm_id

    def ask_join_peer(self) -> pb.SwarmInfo:
        """Ask the first --join peer that answers for its swarm id, and how it sees this peer
        (sets :attr:`reachability`); SwarmError when none answers."""
        errors = []
        for maddr in self.options.join:
            peer = maddr.rsplit("/p2p/", 1)[-1] if "/p2p/" in maddr else None
            if peer is None:
                errors.append(f"{maddr} has no /p2p/<peer id>")
                continue
            announced = [] if self.options.client_mode else self.maddrs
            request = pb.SwarmInfoRequest(dial_back=announced[:MAX_DIAL_BACK])
            try:
                asked_at = time.time()
                info = self.run(
                    self.p2p.call_protobuf_handler(
                        PeerID.from_base58(peer), SWARM_INFO, request, pb.SwarmInfo
                    ),
                    timeout=15,
                )
            except Exception as exc:  # noqa: BLE001 - any failure: try the next peer
                errors.append(f"{maddr}: {exc or type(exc).__name__}")
                continue
            if info.version != PROTOCOL_VERSION:
                # Blob ids would not add up between the two: every fetch would fail later.
                raise ProtocolMismatch(
                    f"{maddr} speaks mergeswarm protocol {info.version or '1'}, this peer "
                    f"speaks {PROTOCOL_VERSION}; install the mergeswarm version the swarm runs"
                )
            if not is_swarm_id(info.swarm_id):
                errors.append(f"{maddr} answered with an invalid swarm id")
                continue
            # the other's clock against the middle of the call (what the wire took is split)
            skew = info.time - (asked_at + time.time()) / 2 if info.time else None
            self.reachability = Reachability(
                maddr, announced[:MAX_DIAL_BACK], list(info.reachable), info.observed, skew
            )
            return info
        raise SwarmError("no --join peer answered (" + "; ".join(errors) + ")")

    async def _swarm_info(self, request: pb.SwarmInfoRequest, context: P2PContext) -> pb.SwarmInfo:
        observed = ""
        with contextlib.suppress(Exception):  # p2pd errors have no common base: unknown
            for info in await self.p2p.list_peers():
                if info.peer_id == context.remote_id and info.addrs:
                    observed = str(info.addrs[0])
        reachable = await dial_back(list(request.dial_back), observed) if observed else []
        return pb.SwarmInfo(
            swarm_id=self.swarm_id,
            version=PROTOCOL_VERSION,
            maddrs=self.maddrs,
            time=time.time(),
            observed=observed,
            reachable=reachable,
        )

    # -- the asyncio loop ------------------------------------------------------

    def run(
        self,
        coro: Coroutine[Any, Any, T] | Awaitable[T],
        timeout: float | None = 60,
        cancel: threading.Event | None = None,
    ) -> T:
        """Run a coroutine on the peer's loop from another thread and wait for it.

        On timeout, when ``cancel`` is set (Cancelled) or when the waiting thread is
        interrupted, the coroutine is cancelled.
        """
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]
        try:
            if cancel is None:
                return future.result(timeout)
            deadline = None if timeout is None else time.monotonic() + timeout
            while not future.done():
                if cancel.is_set():
                    raise Cancelled("the peer is stopping")
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError
                concurrent.futures.wait([future], timeout=CANCEL_POLL)
            return future.result()
        except BaseException:
            future.cancel()
            raise

    # -- the backend of SwarmMember ---------------------------------------------------

    def _put(self, key: str, value: bytes, expires: float, what: str) -> bool:
        with self._pipe:  # hivemind's host-to-DHT pipe is not safe for concurrent writers
            future = self.dht.store(
                key, value, expires, subkey=self.identity.author, return_future=True
            )
        return bool(self._answer(future, what))

    def _get(self, key: str, what: str) -> dict[object, tuple[object, float]]:
        with self._pipe:
            future = self.dht.get(key, latest=True, return_future=True)
        found = self._answer(future, what)
        if found is None or not isinstance(found.value, dict):
            return {}
        return {sub: (item.value, item.expiration_time) for sub, item in found.value.items()}

    def _get_many(
        self, keys: list[str], what: str
    ) -> dict[str, dict[object, tuple[object, float]]]:
        with self._pipe:  # one trip to the DHT process and one traversal for every key
            future = self.dht.run_coroutine(
                functools.partial(_latest_many, keys), return_future=True
            )
        return self._answer(future, what) or {}

    def _store_rejections(self) -> dict[str, int]:
        with self._pipe:
            future = self.dht.run_coroutine(rejection_counts, return_future=True)
        return dict(self._answer(future, "counting rejected records"))

    def transfers(self, store: BlobStore, limits: ServeLimits | None = None) -> Transfers:
        from node.net.blobs.transfers import P2PTransfers  # it builds on this module

        return P2PTransfers(self, store, limits)

    def shutdown(self) -> None:
        if getattr(self, "_closed", False):
            return
        self._closed = True
        if self.loop.is_running():
            p2p = getattr(self, "p2p", None)
            if p2p is not None:
                try:
                    self.run(p2p.shutdown(), timeout=10)
                except Exception as exc:  # noqa: BLE001 - shutting down regardless
                    logger.debug("p2p replica shutdown: %s", exc)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
        try:
            self.dht.shutdown()
        except Exception as exc:  # noqa: BLE001 - a DHT process already gone (SIGTERM to all)
            logger.debug("DHT shutdown: %s", exc)

    def _answer(self, future: Any, what: str) -> Any:
        """The result of a DHT call; SwarmError when the DHT process does not answer in
        DHT_TIMEOUT or is gone (a SIGTERM to the whole process group ends it first)."""
        deadline = time.monotonic() + DHT_TIMEOUT
        while True:
            try:
                return future.result(timeout=1.0)
            except TimeoutError:
                if not self.dht.is_alive():
                    future.cancel()
                    raise SwarmError(f"{what}: the DHT process has ended") from None
                if time.monotonic() > deadline:
                    future.cancel()
                    raise SwarmError(
                        f"{what}: the DHT did not answer in {DHT_TIMEOUT:.0f} s"
                    ) from None


async def _replica(dht: DHT) -> P2P:
    """A client of the DHT's p2pd for this process, with its unary calls guarded (a late
    answer must not end its reader: node.net.unary_calls); run on the client's loop."""
    p2p = await dht.replicate_p2p()
    guard_unary_calls(p2p)
    return p2p


async def _latest_many(
    keys: list[str], _dht: object, node: Any
) -> dict[str, dict[object, tuple[object, float]]]:
    """For ``DHT.run_coroutine``: the latest entries under each of ``keys``, as _get gives them."""
    found = await node.get_many(keys, sufficient_expiration_time=float("inf"))
    out: dict[str, dict[object, tuple[object, float]]] = {}
    for key, item in found.items():
        if item is not None and isinstance(item.value, dict):
            out[key] = {sub: (v.value, v.expiration_time) for sub, v in item.value.items()}
    return out


async def _exit_with_host(_dht: object, node: Any) -> None:
    """For ``DHT.run_coroutine``: end the DHT process, and its p2pd, once the host is gone.

    hivemind's DHT is a forked process that outlives a host killed with SIGKILL, holding
    the peer id (so a restart cannot join) and its ports. It polls its parent instead.
    """
    host = os.getppid()
    # A signal handler the host installed before forking would swallow the SIGTERM with which
    # DHT.shutdown ends this process when it does not stop by itself.
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(ValueError):  # not the main thread: nothing to reset here
            signal.signal(sig, signal.SIG_DFL if sig == signal.SIGTERM else signal.SIG_IGN)

    async def watch() -> None:
        while os.getppid() == host:
            await asyncio.sleep(0.5)
        try:
            await asyncio.wait_for(node.p2p.shutdown(), timeout=5)
        finally:
            os._exit(0)

    node.mergeswarm_watchdog = asyncio.get_running_loop().create_task(watch())


async def _rejoin_when_alone(join: list[str], _dht: object, node: Any) -> None:
    """For ``DHT.run_coroutine``: whenever the DHT node knows no other node (a link that was
    down long enough for every connection and routing entry to go), dial the --join peers
    again and ping them back into the routing table: hivemind bootstraps only at start, so a
    healed partition would otherwise leave the peer alone for good."""
    from hivemind.utils.multiaddr import Multiaddr

    async def watch() -> None:
        while True:
            await asyncio.sleep(REJOIN_SECONDS)
            if node.protocol.routing_table.uid_to_peer_id:
                continue
            for maddr in join:
                address, _, peer = maddr.rpartition("/p2p/")
                with contextlib.suppress(Exception):  # still cut off: try again later
                    peer_id = PeerID.from_base58(peer)
                    await node.p2p._client.connect(peer_id, [Multiaddr(address)])
                    await node.protocol.call_ping(peer_id)

    node.mergeswarm_rejoin = asyncio.get_running_loop().create_task(watch())


def _serve_p2pd_metrics(addr: str) -> None:
    """Have the libp2p daemons this process starts (the DHT process is forked from it after
    this) serve their Prometheus metrics on ``addr``: p2pd's ``-metricsAddr``, a flag
    hivemind does not expose, so it is added to the daemon's command line here."""
    make = _ORIGINAL_MAKE_ARGS

    def with_metrics(*args: Any, **kwargs: Any) -> list[str]:
        proc_args = make(*args, **kwargs)
        if "noListenAddrs" not in kwargs:  # not the short-lived "is this identity taken?" probe
            proc_args.append(f"-metricsAddr={addr}")
        return proc_args

    P2P._make_process_args = staticmethod(with_metrics)


_ORIGINAL_MAKE_ARGS = P2P._make_process_args
