"""The volunteer's control service (gRPC on 127.0.0.1) answers only callers that show the
token its data directory holds for the node's user. A stand-in node: no swarm is needed."""

from __future__ import annotations

import stat
import threading
from types import SimpleNamespace

import grpc
import pytest

from node.data_dir import DataDir
from node.volunteer import control_pb2 as pb
from node.volunteer import control_pb2_grpc as rpc
from node.volunteer.control import ControlError, call, serve


@pytest.fixture
def node():
    swarm = SimpleNamespace(swarm_id="swarm-x", peer_id=SimpleNamespace(to_base58=lambda: "Qm1"))
    return SimpleNamespace(
        status="training", swarm=swarm, head=None, rounds_done=2, paused=threading.Event(),
        samples_per_second=1.5, state={"announced": []}, publish_now=threading.Event(),
    )  # fmt: skip


def test_a_call_with_the_data_dirs_token_is_served_and_one_without_is_refused(node, tmp_path):
    server = serve(node, tmp_path)
    try:
        files = DataDir(tmp_path)
        for path in (files.control_port, files.control_token):  # this user's only
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert call(tmp_path, "Status").rounds_done == 2
        assert call(tmp_path, "Pause").ok and node.paused.is_set()
        port = files.control_port.read_text().strip()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = rpc.NodeControlStub(channel)
            for metadata in ((), (("x-mergeswarm-token", "0" * 32),)):
                with pytest.raises(grpc.RpcError) as refused:
                    stub.Resume(pb.Empty(), timeout=10, metadata=metadata)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert node.paused.is_set()  # nobody without the token resumed it
        files.control_token.write_text("f" * 32 + "\n")  # a stale token: one clear line
        with pytest.raises(ControlError, match="not from its current run"):
            call(tmp_path, "Status")
    finally:
        server.stop(grace=None)
