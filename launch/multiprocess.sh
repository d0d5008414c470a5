#!/usr/bin/env bash
# One training job as N processes on this machine, joined by jax.distributed over CPU collectives:
# the way to run multi-host code without a cluster.
#   launch/multiprocess.sh N CONFIG [key=value ...]
# DEVICES_PER_PROCESS fake CPU devices each (default 1); process 0 prints to the terminal, the
# others to $LOG_DIR/process-I.log (default: a new temporary directory). If one process fails,
# the others are stopped and the exit status is the failure's.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: launch/multiprocess.sh N CONFIG [key=value ...]" >&2; exit 2; }
n=$1; shift
python=${PYTHON:-.venv/bin/python}
log_dir=${LOG_DIR:-$(mktemp -d -t hiermodel-processes.XXXX)}
mkdir -p "$log_dir"
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$PWD/.cache/jax}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-1}"
pids=()
stop_all() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap 'stop_all; exit 130' INT TERM
for ((i = 0; i < n; i++)); do
  args=(-m hiermodel.cli train "$@" "distributed.coordinator=localhost:$port" "distributed.num_processes=$n"
        "distributed.process_id=$i")
  if [ "$i" -eq 0 ]; then
    "$python" "${args[@]}" &
  else
    "$python" "${args[@]}" >"$log_dir/process-$i.log" 2>&1 &
  fi
  pids+=($!)
done
echo "$n processes, coordinator localhost:$port, logs of processes 1-$((n - 1)) in $log_dir" >&2
status=0
while [ ${#pids[@]} -gt 0 ]; do
  set +e; wait -n -p done_pid "${pids[@]}"; code=$?; set -e
  running=(); for pid in "${pids[@]}"; do [ "$pid" = "$done_pid" ] || running+=("$pid"); done; pids=("${running[@]}")
  if [ "$code" -ne 0 ] && [ "$status" -eq 0 ]; then
    status=$code
    echo "a process exited with status $code; stopping the others" >&2
    stop_all
  fi
done
exit "$status"
