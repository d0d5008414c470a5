"""Joining a multi-process job: what is detected from the environment, and what JAX makes of it."""

import jax
import pytest
from jax._src.clusters import ClusterEnv

from hiermodel.config import DistributedConfig
from hiermodel.errors import UserError
from hiermodel.train import distributed

SLURM = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[017-024]", "SLURM_NTASKS": "64",
         "SLURM_PROCID": "9", "SLURM_LOCALID": "1"}


@pytest.fixture
def initialize_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **arguments: calls.append(arguments))
    monkeypatch.setattr(jax.config, "update", lambda *args: None)
    for name in [*SLURM, "TPU_WORKER_HOSTNAMES"]:
        monkeypatch.delenv(name, raising=False)
    return calls


def test_a_single_process_joins_nothing(initialize_calls):
    distributed.initialize(DistributedConfig())
    assert initialize_calls == []


def test_an_explicit_coordinator_is_used_as_given(initialize_calls):
    distributed.initialize(DistributedConfig("10.0.0.1:1234", 4, 3))
    assert initialize_calls == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}]
    with pytest.raises(UserError, match="distributed.process_id=4 is not in"):
        distributed.initialize(DistributedConfig("10.0.0.1:1234", 4, 4))


def test_slurm_jobs_are_left_to_jax_one_process_per_gpu(initialize_calls, monkeypatch):
    for name, value in SLURM.items():
        monkeypatch.setenv(name, value)
    distributed.initialize(DistributedConfig())
    assert initialize_calls == [{}]
    # What jax.distributed then reads: the first node coordinates, each task drives its local GPU.
    port = 4242 % 4096 + 65536 - 4096
    assert ClusterEnv.auto_detect_unset_distributed_params(None, None, None, None, None, None) == (
        f"gpu017:{port}", 64, 9, [1])


def test_tpu_pods_are_detected_but_not_libtpus_warning(initialize_calls, monkeypatch):
    # libtpu, finding no TPU, writes a sentence with commas into TPU_WORKER_HOSTNAMES.
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "WARNING: could not determine TPU worker hostnames, please set it")
    distributed.initialize(DistributedConfig())
    assert initialize_calls == []
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1v-n-0,t1v-n-1,t1v-n-2,t1v-n-3")
    distributed.initialize(DistributedConfig())
    assert initialize_calls == [{}]
