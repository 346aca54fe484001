#!/usr/bin/env bash
# Regenerate protocol/transfer_pb2.py from protocol/proto/transfer.proto (needs the [dev] extra).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -m grpc_tools.protoc -I protocol/proto --python_out=protocol protocol/proto/transfer.proto
