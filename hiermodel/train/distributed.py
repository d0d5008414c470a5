"""Joining a multi-process job before JAX touches a device."""

import os

import jax

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


def barrier(name: str, timeout_s: int = 3600) -> None:
    """Every process waits here: the coordination service's barrier, not a device collective."""
    if jax.process_count() > 1:
        from jax._src import distributed as jax_distributed  # the client jax.distributed started

        jax_distributed.global_state.client.wait_at_barrier(name, timeout_s * 1000)
