#!/usr/bin/env bash
# Generates the Python CSI bindings from proto/csi.proto into OUT (default: the repository root),
# as agent/csi/csi_pb2.py, csi_pb2.pyi and csi_pb2_grpc.py. `make proto` runs it; a test runs it
# into a temporary directory and fails when the committed files differ (stale generated code).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$(dirname "$here")}
python=${PYTHON:-python3}
mkdir -p "$out/agent/csi"
# The virtual path agent/csi/csi.proto makes the generated grpc module import
# `from agent.csi import csi_pb2`, so the package needs no sys.path tricks.
"$python" -m grpc_tools.protoc \
  -I "agent/csi=$here" \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  "$here/csi.proto"
