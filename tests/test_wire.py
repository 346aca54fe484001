"""The wire messages: the checked-in protobuf module matches its schema."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_checked_in_protobuf_module_is_current(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'protocol' / 'proto'}",
            f"--python_out={tmp_path}",
            str(ROOT / "protocol" / "proto" / "transfer.proto"),
        ],
        check=True,
    )
    fresh = (tmp_path / "transfer_pb2.py").read_text()
    assert fresh == (ROOT / "protocol" / "transfer_pb2.py").read_text(), (
        "protocol/transfer_pb2.py is stale: run scripts/gen_proto.sh"
    )
