#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: create it (or reuse it), install this checkout on every worker,
# run the same command on all workers and stream their output.
#
#   launch/tpu_pod.sh NAME ZONE ACCELERATOR CONFIG [key=value ...]
#   launch/tpu_pod.sh my-pod us-east5-a v5p-128 configs/pods/hat_1b_v5p-128.yaml run_dir=gs://my-bucket/hat_1b
#
# Environment: PROJECT (default: gcloud's), RUNTIME (TPU software version; default by generation),
# QUEUED=1 to ask through a queued resource (waits for capacity), SPOT=1 for spot capacity,
# SETUP_ONLY=1 to stop after installing, COMPILE_CACHE (default gs://BUCKET/hiermodel-compile-cache,
# BUCKET being run_dir's: every worker and every restart reuses the compiled step).
# run_dir must be on gs://: all workers write one run there, and a preempted slice resumes from it.
# Data paths must be readable from every worker (gs:// or the same files on each). jax.distributed
# finds the other workers itself.
set -euo pipefail
[ $# -ge 4 ] || { echo "usage: launch/tpu_pod.sh NAME ZONE ACCELERATOR CONFIG [key=value ...]" >&2; exit 2; }
name=$1 zone=$2 accelerator=$3; shift 3
cd "$(dirname "$0")/.."

run_dir=$(sed -n 's/^run_dir: *//p' "$1" | tr -d "\"'")
for arg in "${@:2}"; do case "$arg" in run_dir=*) run_dir=${arg#run_dir=} ;; esac; done
case "$run_dir" in
  gs://*/*) ;;
  *) echo "launch/tpu_pod.sh: run_dir=${run_dir:-(unset)} is not on gs://; every worker must write the same run:" \
          "add run_dir=gs://BUCKET/PATH" >&2; exit 2 ;;
esac
bucket=${run_dir#gs://}; bucket=${bucket%%/*}
compile_cache=${COMPILE_CACHE:-gs://$bucket/hiermodel-compile-cache}

# XLA overlaps FSDP's parameter all-gathers and gradient reduce-scatters with the layers' compute
# only with these (tests/test_aot.py compiles a step with them, so libtpu must know them all).
LIBTPU_INIT_ARGS="--xla_tpu_enable_async_collective_fusion=true --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true --xla_tpu_enable_async_collective_fusion_multiple_steps=true --xla_tpu_overlap_compute_collective_tc=true --xla_enable_async_all_gather=true --xla_tpu_enable_data_parallel_all_reduce_opt=true --xla_tpu_data_parallel_opt_different_sized_ops=true"
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
# Ctrl-C sends SIGTERM on the workers: they agree on one step, save it and stop; rerun to resume.
command="cd hiermodel && export JAX_COMPILATION_CACHE_DIR=$(printf '%q' "$compile_cache") \
LIBTPU_INIT_ARGS=$(printf '%q' "$LIBTPU_INIT_ARGS") && .venv/bin/hiermodel train $(printf '%q ' "$@")"
trap 'tpu tpu-vm ssh "$name" --worker=all --command "pkill -TERM -f \"hiermodel train\"" || true' INT
tpu tpu-vm ssh "$name" --worker=all --command "$command"
