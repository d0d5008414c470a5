"""Two JAX processes on this machine (CPU collectives), four fake devices each, against one
process with eight: the same losses and the same checkpoint."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from hiermodel.config import MeshConfig
from hiermodel.train import state as state_lib
from hiermodel.train.checkpoint import Checkpointer
from hiermodel.train.loop import train
from hiermodel.train.metrics import read_metrics
from hiermodel.train.sharding import make_mesh
from tests.conftest import MICRO, REPO, micro_config

pytestmark = pytest.mark.slow

SAME_RUN = {"data.shards": 2, "train.steps": 4, "train.checkpoint_every": 2, "mesh.data": 8}


def final_params(config):
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    with jax.set_mesh(mesh):
        _, abstract = state_lib.abstract_params(config, mesh)
        checkpointer = Checkpointer(config.run_dir, read_only=True)
        params = checkpointer.restore_params(checkpointer.latest_step(), abstract)
        checkpointer.close()
    return jax.tree.map(np.asarray, params)


def losses(run_dir):
    return [m["loss"] for _, m in sorted(read_metrics(run_dir).items())]


def test_two_processes_of_four_devices_train_exactly_like_one_of_eight(tmp_path):
    single = micro_config(run_dir=tmp_path / "single", **SAME_RUN)
    train(single)

    env = {**os.environ, "XLA_FLAGS": "", "DEVICES_PER_PROCESS": "4", "PYTHON": sys.executable,
           "LOG_DIR": str(tmp_path / "logs")}
    job = subprocess.run([str(REPO / "launch" / "multiprocess.sh"), "2", str(MICRO), f"run_dir={tmp_path / 'multi'}",
                          *[f"{k}={v}" for k, v in SAME_RUN.items()]],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, job.stdout + job.stderr + (tmp_path / "logs" / "process-1.log").read_text()
    assert "mesh {'data': 8" in job.stderr and "8 cpu devices" in job.stderr and "bpb" in job.stdout
    assert "bpb" not in (tmp_path / "logs" / "process-1.log").read_text()  # progress is printed once

    multi = micro_config(run_dir=tmp_path / "multi", **SAME_RUN)
    assert len(losses(multi.run_dir)) == 4
    np.testing.assert_allclose(losses(multi.run_dir), losses(single.run_dir), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 final_params(multi), final_params(single))
