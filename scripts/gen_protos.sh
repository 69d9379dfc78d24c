#!/usr/bin/env bash
# Regenerate the checked-in gRPC stubs (services/v1, imported as specserve.v1) from protos/specserve/v1.
# tests/unit/rpc/test_protos.py fails when the checked-in stubs differ from what this produces.
#   scripts/gen_protos.sh [OUT_DIR]    default: services/v1 (the package); the test passes a temp dir
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:-services/v1}
python=${PYTHON:-.venv/bin/python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$python" -m grpc_tools.protoc -Iprotos --python_out="$tmp" --pyi_out="$tmp" --grpc_python_out="$tmp" \
  protos/specserve/v1/*.proto
mkdir -p "$out"
cp "$tmp"/specserve/v1/*.py "$tmp"/specserve/v1/*.pyi "$out"/
[[ -f $out/__init__.py ]] || echo '"""Generated gRPC stubs of protos/specserve/v1 (scripts/gen_protos.sh); do not edit."""' > "$out/__init__.py"
