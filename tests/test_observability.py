"""What a training run reports about itself: time-based checkpoints, a profiler trace, where the
time goes (data wait, step-time percentiles, goodput across restarts), MFU apart from HFU."""

import jax
import pytest

from hiermodel.errors import UserError
from hiermodel.train.checkpoint import Checkpointer
from hiermodel.train.loop import train
from hiermodel.train.metrics import read_metrics
from tests.conftest import micro_config

ONE_DEVICE = {"mesh.data": 1}  # and micro.yaml's batch: the programs of other one-device tests, compiled once


def saved_steps(run_dir) -> list[int]:
    checkpointer = Checkpointer(run_dir, read_only=True)
    try:
        return sorted(checkpointer.manager.all_steps())
    finally:
        checkpointer.close()


def test_minutes_cadence_saves_at_log_steps_and_a_profile_is_written(tmp_path):
    # A cadence of under a millisecond is due at every log step, and only there.
    config = micro_config(run_dir=tmp_path / "run", **ONE_DEVICE, **{
        "train.steps": 7, "train.log_every": 2, "train.checkpoint_every": 1000, "train.checkpoint_minutes": 1e-5,
        "train.keep_checkpoints": 10, "train.profile_steps": "3:4"})
    train(config, devices=jax.devices()[:1])
    assert saved_steps(config.run_dir) == [2, 4, 6, 7]
    traces = list((tmp_path / "run" / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0


def test_timing_and_utilisation_metrics_hold_together_across_a_restart(tmp_path):
    first = micro_config(run_dir=tmp_path / "run", **ONE_DEVICE, **{"train.steps": 4, "train.log_every": 1})
    train(first, devices=jax.devices()[:1])
    before = read_metrics(first.run_dir)
    train(micro_config(run_dir=tmp_path / "run", **ONE_DEVICE, **{"train.steps": 8, "train.log_every": 1}),
          devices=jax.devices()[:1])
    after = read_metrics(first.run_dir)
    assert not (tmp_path / "run" / "profile").exists()
    for step, m in after.items():
        assert 0 <= m["data_wait"] <= 1 and 0 < m["step_s_p50"] <= m["step_s_p90"]
        # From the second log window of each attempt on (the first holds the compile).
        assert ("goodput" in m) == (step not in (1, 5)), step
        assert 0 < m.get("goodput", 1) <= 1
        assert 0 < m["mfu"] < m["hfu"]  # causal attention: the model needs fewer pairs than run
        assert m["hfu"] / m["mfu"] == pytest.approx(after[1]["hfu"] / after[1]["mfu"])
    walls = [after[s]["wall_s"] for s in sorted(after)]
    assert walls == sorted(walls)  # the restarted run's wall time continues the first run's
    assert after[5]["wall_s"] > before[4]["wall_s"]
    assert after[8]["productive_s"] > before[4]["productive_s"]  # the earlier attempt's steps still count


@pytest.mark.parametrize("spec", ["5", "0:3", "4:2", "a:b", "1:2:3"])
def test_bad_profile_steps_are_refused_before_compiling(tmp_path, spec):
    with pytest.raises(UserError, match="train.profile_steps"):
        train(micro_config(run_dir=tmp_path / "run", **ONE_DEVICE, **{"train.profile_steps": spec}),
              devices=jax.devices()[:1])
    assert not (tmp_path / "run").exists()


def test_negative_checkpoint_minutes_are_refused(tmp_path):
    with pytest.raises(UserError, match="train.checkpoint_minutes=-1.0"):
        train(micro_config(run_dir=tmp_path / "run", **ONE_DEVICE, **{"train.checkpoint_minutes": -1}),
              devices=jax.devices()[:1])
