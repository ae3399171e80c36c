#!/usr/bin/env bash
# Regenerates the checked-in stubs under client/lossd/v1 (the proto package path).
# tests/test_generated_stubs.py runs the same command and fails on a diff.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/client}
python -m grpc_tools.protoc -I"$root/proto" \
  --python_out="$out" --grpc_python_out="$out" --mypy_out="$out" \
  "$root"/proto/lossd/v1/*.proto
