"""The volunteer's local control service: gRPC on 127.0.0.1, for `mergeswarm node status` & co.

The port is written to ``DATA_DIR/control_port`` so the CLI finds the node
from its data directory alone. Only loopback is bound: whoever can reach it
runs as a local user of this machine.
"""

from __future__ import annotations

import logging
from concurrent import futures
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from node.data_dir import DataDir
from node.volunteer import control_pb2 as pb
from node.volunteer import control_pb2_grpc as rpc
from protocol.durable import write_atomic
from protocol.errors import MergeswarmError

if TYPE_CHECKING:
    from node.volunteer.volunteer import Volunteer

logger = logging.getLogger(__name__)


class ControlError(MergeswarmError):
    """The node's control service cannot be reached."""


class _Servicer(rpc.NodeControlServicer):
    def __init__(self, node: Volunteer) -> None:
        self.node = node

    def Status(self, request: pb.Empty, context: grpc.ServicerContext) -> pb.NodeStatus:  # noqa: N802
        n = self.node
        return pb.NodeStatus(
            status=n.status,
            swarm_id=n.swarm.swarm_id,
            peer_id=n.swarm.peer_id.to_base58(),
            head_round=n.head.round if n.head else -1,
            head_id=n.head.base_id if n.head else "",
            rounds_done=n.rounds_done,
            paused=n.paused.is_set(),
            samples_per_second=n.samples_per_second,
            announced=[a["delta_id"] for a in n.state.get("announced", [])],
        )

    def Pause(self, request: pb.Empty, context: grpc.ServicerContext) -> pb.Ack:  # noqa: N802
        self.node.paused.set()
        return pb.Ack(ok=True, message="paused after the current step")

    def Resume(self, request: pb.Empty, context: grpc.ServicerContext) -> pb.Ack:  # noqa: N802
        self.node.paused.clear()
        return pb.Ack(ok=True, message="resumed")

    def PublishNow(self, request: pb.Empty, context: grpc.ServicerContext) -> pb.Ack:  # noqa: N802
        self.node.publish_now.set()
        return pb.Ack(ok=True, message="the round ends after the current step")


def serve(node: Volunteer, data_dir: Path, port: int = 0) -> grpc.Server:
    """Start the service on 127.0.0.1 (``port`` 0: any free one) and record its port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    rpc.add_NodeControlServicer_to_server(_Servicer(node), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    if not bound:
        raise ControlError(f"cannot bind the control service to 127.0.0.1:{port}")
    server.start()
    write_atomic(DataDir(data_dir).control_port, f"{bound}\n".encode())
    return server


def call(data_dir: Path, method: str, timeout: float = 10.0):
    """Call ``method`` (Status, Pause, Resume, PublishNow) on the node of ``data_dir``."""
    port_file = DataDir(data_dir).control_port
    if not port_file.is_file():
        raise ControlError(f"no node has run with --data-dir {data_dir} (no {port_file.name} file)")
    port = port_file.read_text().strip()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = rpc.NodeControlStub(channel)
        try:
            return getattr(stub, method)(pb.Empty(), timeout=timeout)
        except grpc.RpcError as exc:
            raise ControlError(
                f"the node of {data_dir} does not answer on 127.0.0.1:{port} "
                f"({exc.code().name}); is `mergeswarm node` running?"
            ) from None
