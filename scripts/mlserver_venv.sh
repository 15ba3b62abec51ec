#!/usr/bin/env bash
# Build (once) the virtual environment MLServer runs from in the tests (tests/support/
# mlserver.py). MLServer pins its own dependencies (FastAPI, uvicorn, grpc, pandas), so it
# lives apart from mirrorgate's .venv. Reused when present; measured from scratch on the
# 2-core machine: 77 s (528 MB) when quiet, 389 s at load average 12-14.
#   scripts/mlserver_venv.sh [DIR]      default: $MIRRORGATE_MLSERVER_VENV or .cache/mlserver-venv
set -euo pipefail
VERSION=1.7.1
DIR="${1:-${MIRRORGATE_MLSERVER_VENV:-$(dirname "$0")/../.cache/mlserver-venv}}"
STAMP="$DIR/.mirrorgate-mlserver-$VERSION"
if [ -f "$STAMP" ]; then
  echo "$DIR"
  exit 0
fi
rm -rf "$DIR"
"${PYTHON:-python3}" -m venv "$DIR"
"$DIR/bin/python" -m pip install -q --upgrade pip
"$DIR/bin/python" -m pip install -q "mlserver==$VERSION" "mlserver-sklearn==$VERSION"
touch "$STAMP"
echo "$DIR"
