"""The volunteer's local control service: gRPC on 127.0.0.1, for `mergeswarm node status` & co.

The port is written to ``DATA_DIR/control_port`` so the CLI finds the node
from its data directory alone. Only loopback is bound, and every call must
show the token of ``DATA_DIR/control_token`` (a new one each start, readable
by the node's user only): other local users can reach the port but not
pause the node or read its status.
"""

from __future__ import annotations

import hmac
import logging
import secrets
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

TOKEN_HEADER = "x-mergeswarm-token"
PRIVATE = 0o600


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


class _TokenCheck(grpc.ServerInterceptor):
    """Refuses every call that does not carry the node's token."""

    def __init__(self, token: str) -> None:
        self.token = token

        def deny(request, context: grpc.ServicerContext):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "no valid control token")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation, handler_call_details):
        given = dict(handler_call_details.invocation_metadata or ()).get(TOKEN_HEADER, "")
        if hmac.compare_digest(str(given), self.token):
            return continuation(handler_call_details)
        return self._deny


def serve(node: Volunteer, data_dir: Path, port: int = 0) -> grpc.Server:
    """Start the service on 127.0.0.1 (``port`` 0: any free one); record its port and a new
    token, both readable by this user only."""
    files = DataDir(data_dir)
    token = secrets.token_hex(16)
    write_atomic(files.control_token, f"{token}\n".encode(), mode=PRIVATE)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2), interceptors=[_TokenCheck(token)]
    )
    rpc.add_NodeControlServicer_to_server(_Servicer(node), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    if not bound:
        raise ControlError(f"cannot bind the control service to 127.0.0.1:{port}")
    server.start()
    write_atomic(files.control_port, f"{bound}\n".encode(), mode=PRIVATE)
    return server


def call(data_dir: Path, method: str, timeout: float = 10.0):
    """Call ``method`` (Status, Pause, Resume, PublishNow) on the node of ``data_dir``."""
    port_file = DataDir(data_dir).control_port
    if not port_file.is_file():
        raise ControlError(f"no node has run with --data-dir {data_dir} (no {port_file.name} file)")
    try:
        port = port_file.read_text().strip()
        token = DataDir(data_dir).control_token.read_text().strip()
    except OSError as exc:
        raise ControlError(
            f"cannot read the node's control files in {data_dir} ({exc.strerror}); run this "
            "as the user that runs the node"
        ) from None
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = rpc.NodeControlStub(channel)
        try:
            return getattr(stub, method)(
                pb.Empty(), timeout=timeout, metadata=((TOKEN_HEADER, token),)
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise ControlError(
                    f"the node of {data_dir} refused the call: {port_file.name} and "
                    "control_token are not from its current run"
                ) from None
            raise ControlError(
                f"the node of {data_dir} does not answer on 127.0.0.1:{port} "
                f"({exc.code().name}); is `mergeswarm node` running?"
            ) from None
