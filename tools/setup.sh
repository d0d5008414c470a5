#!/usr/bin/env bash
# Create .venv with hiermodel and its test dependencies: uv (fast, cached) inside the venv, pip as fallback.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
if .venv/bin/python -m uv --version >/dev/null 2>&1 || .venv/bin/python -m pip install -q uv; then
  .venv/bin/python -m uv pip install -q --python .venv/bin/python --compile-bytecode -e '.[test]'
else
  .venv/bin/python -m pip install -q -e '.[test]'
fi
