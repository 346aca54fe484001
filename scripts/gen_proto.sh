#!/usr/bin/env bash
# Regenerate protocol/transfer_pb2.py from protocol/proto/transfer.proto and the volunteer's
# control service from node/volunteer/proto/control.proto (needs the [dev] extra).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -m grpc_tools.protoc -I protocol/proto --python_out=protocol protocol/proto/transfer.proto
"$PY" -m grpc_tools.protoc -I node/volunteer/proto --python_out=node/volunteer \
    --grpc_python_out=node/volunteer node/volunteer/proto/control.proto
# grpc_tools writes a top-level import; the module lives in the node.volunteer package
sed -i 's/^import control_pb2 as control__pb2$/from node.volunteer import control_pb2 as control__pb2/' \
    node/volunteer/control_pb2_grpc.py
