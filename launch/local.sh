#!/usr/bin/env bash
# Train on this machine: all local devices in one process, with a persistent compilation cache.
#   launch/local.sh CONFIG [key=value ...]
# On a CPU-only machine, FAKE_DEVICES=8 splits the CPU into 8 devices to try a sharded mesh.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: launch/local.sh CONFIG [key=value ...]" >&2; exit 2; }
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$PWD/.cache/jax}
if [ -n "${FAKE_DEVICES:-}" ]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$FAKE_DEVICES"
fi
[ -x .venv/bin/hiermodel ] || ./tools/setup.sh
exec .venv/bin/hiermodel train "$@"
