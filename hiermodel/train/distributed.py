"""Joining a multi-process job before JAX touches a device, and agreeing on things once joined."""

import os
import uuid

import jax
from etils import epath

from hiermodel.config import DistributedConfig
from hiermodel.errors import UserError


def _cluster_detected() -> bool:
    """A SLURM allocation with several tasks, or a TPU slice with several workers: JAX reads the
    coordinator, process count and id from the environment itself."""
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")
    # libtpu, finding no TPU, writes a sentence with commas into that variable: hostnames have no spaces.
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1 or (len(hosts) > 1 and not any(" " in h for h in hosts))


def initialize(config: DistributedConfig) -> None:
    if jax.distributed.is_initialized():
        return
    if config.coordinator:
        if not 0 <= config.process_id < config.num_processes:
            raise UserError(f"distributed.process_id={config.process_id} is not in "
                            f"[0, distributed.num_processes={config.num_processes})")
        arguments = {"coordinator_address": config.coordinator, "num_processes": config.num_processes,
                     "process_id": config.process_id}
    elif _cluster_detected():
        arguments = {}
    else:
        return
    # CPU processes (tests, debugging) need a collectives backend; accelerators ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**arguments)


def _client():
    from jax._src import distributed as jax_distributed  # the client jax.distributed started

    return jax_distributed.global_state.client


def barrier(name: str, timeout_s: int = 3600) -> None:
    """Every process waits here: the coordination service's barrier, not a device collective."""
    if jax.process_count() > 1:
        _client().wait_at_barrier(name, timeout_s * 1000)


def from_process_zero(key: str, value: str, timeout_s: int = 3600) -> str:
    """Process 0's `value` on every process (through the coordination service's key-value store;
    `key` must be new each time)."""
    if jax.process_count() == 1:
        return value
    if jax.process_index() == 0:
        _client().key_value_set(f"hiermodel/{key}", value)
        return value
    return _client().blocking_key_value_get(f"hiermodel/{key}", timeout_s * 1000)


def check_shared(run_dir: epath.Path) -> None:
    """A UserError on every process unless all of them see the files process 0 writes in run_dir:
    on a pod, a path on each host's own disk would give each host its own checkpoints."""
    if jax.process_count() == 1:
        return
    token = from_process_zero("shared-check", uuid.uuid4().hex if jax.process_index() == 0 else "")
    marker = run_dir / f".shared-check-{token}"
    if jax.process_index() == 0:
        created = [p for p in [run_dir, *run_dir.parents] if not p.exists()]  # deepest first
        run_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(token)
    barrier("hiermodel: shared-check marker written")
    seen = marker.exists() and marker.read_text() == token
    _client().key_value_set(f"hiermodel/shared-check/{jax.process_index()}", "1" if seen else "0")
    blind = [i for i in range(jax.process_count())
             if _client().blocking_key_value_get(f"hiermodel/shared-check/{i}", 600_000) != "1"]
    barrier("hiermodel: shared-check done")
    if jax.process_index() == 0:
        marker.unlink()
        if blind:
            for folder in created:  # nothing else is in them
                folder.rmdir()
    if blind:
        raise UserError(f"run_dir={run_dir}: processes {', '.join(map(str, blind))} of {jax.process_count()} do not "
                        f"see what process 0 writes there; every process must share the run directory: use "
                        f"gs://BUCKET/PATH or a shared filesystem, not a path on each host's own disk")
