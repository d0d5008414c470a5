#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: create it (or reuse it), install this checkout on every worker,
# run the same command on all workers and stream their output.
#
#   launch/tpu_pod.sh NAME ZONE ACCELERATOR CONFIG [key=value ...]
#   launch/tpu_pod.sh my-pod us-east5-a v5p-128 configs/pods/hat_1b_v5p-128.yaml
#
# Environment: PROJECT (default: gcloud's), RUNTIME (TPU software version; default by generation),
# QUEUED=1 to ask through a queued resource (waits for capacity), SPOT=1 for spot capacity,
# SETUP_ONLY=1 to stop after installing. Data paths in the config must be readable from every
# worker (a GCS mount or the same local files). jax.distributed finds the other workers itself.
set -euo pipefail
[ $# -ge 4 ] || { echo "usage: launch/tpu_pod.sh NAME ZONE ACCELERATOR CONFIG [key=value ...]" >&2; exit 2; }
name=$1 zone=$2 accelerator=$3; shift 3
cd "$(dirname "$0")/.."
project=(${PROJECT:+--project "$PROJECT"})
case "$accelerator" in
  v6e-*) runtime=${RUNTIME:-v2-alpha-tpuv6e} ;;
  v5p-*) runtime=${RUNTIME:-v2-alpha-tpuv5} ;;
  v5litepod-*|v5e-*) runtime=${RUNTIME:-v2-alpha-tpuv5-lite} ;;
  *) runtime=${RUNTIME:-tpu-ubuntu2204-base} ;;
esac
spot=(${SPOT:+--spot})

tpu() { gcloud compute tpus "$@" --zone "$zone" "${project[@]}"; }
state() { tpu tpu-vm describe "$name" --format='value(state)' 2>/dev/null || true; }

if [ -n "$(state)" ]; then
  echo "reusing TPU VM $name ($(state))" >&2
elif [ -n "${QUEUED:-}" ]; then
  echo "queueing $accelerator as $name" >&2
  tpu queued-resources create "$name" --node-id "$name" --accelerator-type "$accelerator" \
    --runtime-version "$runtime" "${spot[@]}"
  until [ "$(tpu queued-resources describe "$name" --format='value(state.state)')" = ACTIVE ]; do
    echo "waiting for capacity: $(tpu queued-resources describe "$name" --format='value(state.state)')" >&2
    sleep 60
  done
else
  echo "creating $accelerator TPU VM $name" >&2
  tpu tpu-vm create "$name" --accelerator-type "$accelerator" --version "$runtime" "${spot[@]}"
fi
until [ "$(state)" = READY ]; do echo "waiting for $name: $(state)" >&2; sleep 20; done

# Ship exactly this commit (plus uncommitted changes) and install it with the TPU extras everywhere.
archive=$(mktemp -t hiermodel.XXXX.tar.gz)
trap 'rm -f "$archive"' EXIT
git ls-files -co --exclude-standard -z | tar --null -czf "$archive" -T -
tpu tpu-vm scp "$archive" "$name":hiermodel.tar.gz --worker=all
tpu tpu-vm ssh "$name" --worker=all --command \
  "mkdir -p hiermodel && tar -xzf hiermodel.tar.gz -C hiermodel && cd hiermodel && EXTRAS=tpu ./tools/setup.sh"
[ -z "${SETUP_ONLY:-}" ] || exit 0

# Same command on every worker; gcloud interleaves their output, process 0 prints progress.
# Ctrl-C sends SIGTERM on the workers, which checkpoint and stop; rerun to resume.
command="cd hiermodel && export JAX_COMPILATION_CACHE_DIR=\$HOME/hiermodel/.cache/jax && .venv/bin/hiermodel train $(printf '%q ' "$@")"
trap 'tpu tpu-vm ssh "$name" --worker=all --command "pkill -TERM -f \"hiermodel train\"" || true' INT
tpu tpu-vm ssh "$name" --worker=all --command "$command"
