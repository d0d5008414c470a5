#!/usr/bin/env bash
# Create .venv with hiermodel and its test dependencies: uv (fast, cached) inside the venv, pip as fallback.
# EXTRAS picks the optional dependencies: test (default), tpu (TPU VMs), cuda (GPU nodes), or several: "cuda,test".
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
extras=${EXTRAS:-test}
[ -x .venv/bin/python ] || "$python" -m venv .venv
if .venv/bin/python -m uv --version >/dev/null 2>&1 || .venv/bin/python -m pip install -q uv; then
  .venv/bin/python -m uv pip install -q --python .venv/bin/python --compile-bytecode -e ".[$extras]"
else
  .venv/bin/python -m pip install -q -e ".[$extras]"
fi
