#!/usr/bin/env bash
# Regenerate macvtapdp/api/ from proto/: the device plugin API (v1beta1) and the
# PodResources API (podresources/v1). The generator must not be newer than the
# lowest grpcio/protobuf runtime pyproject.toml allows: the generated modules
# check both at import time (grpcio-tools 1.85.x emits protobuf 7.35 gencode).
# Usage: proto/generate.sh [OUTPUT_ROOT]   (default: the repository root)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$(dirname "$here")}
python -m grpc_tools.protoc -I "$here" \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" \
  "$here/macvtapdp/api/v1beta1/api.proto" \
  "$here/macvtapdp/api/podresources/v1/api.proto"
