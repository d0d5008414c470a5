"""Two JAX processes on this machine (CPU collectives), four fake devices each, against one
process with eight: the same losses and the same checkpoint, through preemption of either
process; and a run directory the processes do not share is refused."""

import os
import re
import signal
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
from hiermodel.sharding import make_mesh
from tests.conftest import FAST_COMPILE, MICRO, REPO, micro_config, xla_flags

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


# checkpoint_minutes adds saves wherever process 0's clock says, which every process must follow.
# 20 steps: the three stops land by step 11 (5, 8, 11 at the earliest), and the last job runs on to the end.
PREEMPTED_RUN = {"data.shards": 2, "mesh.data": 8, "train.steps": 20, "train.log_every": 1, "train.checkpoint_every": 4,
                 "train.checkpoint_minutes": 0.02, "train.keep_checkpoints": 100,
                 "data.eval": "builtin:eval", "train.eval_every": 5, "train.eval_rows": 64}
# Process 0 prints a step's progress line, then evaluates (every 5th step), then saves (every 4th):
# a signal sent on seeing the line lands during evaluation, during a save, or between steps.
SIGNAL_POINTS = [("during eval", 1, lambda s: s % 5 == 0),
                 ("during a save", 0, lambda s: s % 4 == 0 and s % 5),
                 ("between steps", 1, lambda s: s % 4 and s % 5)]


def job_env(tmp_path):
    return {**os.environ, "XLA_FLAGS": FAST_COMPILE, "DEVICES_PER_PROCESS": "4", "PYTHON": sys.executable,
            "LOG_DIR": str(tmp_path / "logs")}


def saved_steps(run_dir) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def run_job(tmp_path, run_dir, overrides, signal_to=None, when=None):
    """launch/multiprocess.sh 2 on the run; with signal_to, SIGTERM that process (0 or 1) once
    process 0 prints the progress line of a step after the resumed one for which when(step) holds.
    Returns (exit code, process 0's output, process 1's log)."""
    start = saved_steps(run_dir)[-1] if (run_dir / "checkpoints").is_dir() else 0
    printed = []
    with open(tmp_path / "process-0.err", "w") as err:
        job = subprocess.Popen([str(REPO / "launch" / "multiprocess.sh"), "2", str(MICRO), f"run_dir={run_dir}",
                                *[f"{k}={v}" for k, v in overrides.items()]],
                               cwd=REPO, env=job_env(tmp_path), stdout=subprocess.PIPE, stderr=err, text=True)
        for line in job.stdout:
            printed.append(line)
            match = re.match(r"step\s+(\d+)/", line)
            if signal_to is not None and match and int(match.group(1)) > start + 1 and when(int(match.group(1))):
                pid = subprocess.run(["pgrep", "-f", f"run_dir={run_dir} .*distributed.process_id={signal_to}$"],
                                     capture_output=True, text=True).stdout.split()
                assert len(pid) == 1, pid
                os.kill(int(pid[0]), signal.SIGTERM)
                signal_to = None
        code = job.wait(timeout=600)
    return code, "".join(printed) + (tmp_path / "process-0.err").read_text(), \
        (tmp_path / "logs" / "process-1.log").read_text()


@pytest.mark.slow
def test_two_processes_preempted_through_either_equal_one_uninterrupted_process(tmp_path):
    """Two processes of four devices, signalled three times, against one process of eight."""
    # The reference saves only at its end (saves change no number; only its last checkpoint is compared).
    whole = micro_config(run_dir=tmp_path / "whole", **{**PREEMPTED_RUN, "train.checkpoint_minutes": 0,
                                                         "train.checkpoint_every": PREEMPTED_RUN["train.steps"]})
    train(whole)

    run_dir = tmp_path / "preempted"
    for point, process, when in SIGNAL_POINTS:
        code, err, other = run_job(tmp_path, run_dir, PREEMPTED_RUN, process, when)
        assert code == 0, f"{point}: {err}\n{other}"
        stopped = re.findall(r"saved checkpoint at step (\d+) on every process", err)
        assert len(stopped) == 1, f"{point}: {err}"
        assert f"saved checkpoint at step {stopped[0]} on every process" in other  # the same step
        assert saved_steps(run_dir)[-1] == int(stopped[0]) < PREEMPTED_RUN["train.steps"], point
    code, err, other = run_job(tmp_path, run_dir, PREEMPTED_RUN)
    assert code == 0 and "saved checkpoint" not in err, err
    assert "mesh {'data': 8" in err and "8 cpu devices" in err and "bpb" not in other  # progress is printed once
    assert saved_steps(run_dir)[-1] == PREEMPTED_RUN["train.steps"]
    assert sorted(read_metrics(run_dir)) == list(range(1, PREEMPTED_RUN["train.steps"] + 1))
    np.testing.assert_allclose(losses(run_dir), losses(whole.run_dir), rtol=1e-5)
    evals = lambda d: {s: m["bpb"] for s, m in read_metrics(d, "eval").items()}
    assert evals(run_dir).keys() == evals(whole.run_dir).keys()
    np.testing.assert_allclose(list(evals(run_dir).values()), list(evals(whole.run_dir).values()), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 final_params(micro_config(run_dir=run_dir, **PREEMPTED_RUN)), final_params(whole))


def test_a_run_directory_each_host_sees_alone_is_refused_before_anything_is_written(tmp_path):
    """Two processes, each in a directory of its own: a relative run_dir is then on each host's own disk."""
    port = subprocess.run([sys.executable, "-c", "import socket; s = socket.socket(); s.bind(('localhost', 0)); "
                           "print(s.getsockname()[1])"], capture_output=True, text=True).stdout.strip()
    env = {**os.environ, "XLA_FLAGS": xla_flags(1), "PYTHONPATH": str(REPO)}
    hosts = [tmp_path / f"host{i}" for i in range(2)]
    jobs = []
    for i, host in enumerate(hosts):
        host.mkdir()
        jobs.append(subprocess.Popen(
            [sys.executable, "-m", "hiermodel.cli", "train", str(MICRO), "run_dir=runs/mine", "mesh.data=2",
             f"distributed.coordinator=localhost:{port}", "distributed.num_processes=2", f"distributed.process_id={i}"],
            cwd=host, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [job.communicate(timeout=300) for job in jobs]
    for job, (out, err) in zip(jobs, results):
        assert job.returncode == 2, err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "processes 1 of 2 do not see what process 0 writes there" in errors[0], err
        assert "gs://" in errors[0]
    assert not (hosts[0] / "runs" / "mine").exists() and not (hosts[1] / "runs" / "mine").exists()
