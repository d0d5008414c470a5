"""The delete gate's controller on a trained HAT (its own file, so it runs beside test_gates.py)."""

import numpy as np
import pytest

from tests.conftest import english, micro_config


@pytest.mark.slow
def test_a_gate_added_to_a_trained_hat_holds_the_target_rate_when_trained_by_sgd(tmp_path, corpus):
    """MrT5's setting on the HAT backbone, where deleting words costs little: under Adam the
    rate cycles between none and most words; under SGD the controller holds it."""
    from hiermodel.train.loop import train
    from hiermodel.train.metrics import read_metrics

    data = {**english(corpus), "train.log_every": 1}
    train(micro_config(run_dir=tmp_path / "base", **{"train.steps": 80, "train.checkpoint_every": 80,
                                                      "train.learning_rate": 3e-3, "train.warmup_steps": 10, **data}))
    train(micro_config(run_dir=tmp_path / "gated", init_from=str(tmp_path / "base"),
                       **{"train.steps": 100, "train.learning_rate": 1e-3, "train.warmup_steps": 5,
                          "model.gate.layer": 1, "model.gate.target": 0.3, "model.gate.detach": True,
                          "model.gate.kp": 0.5, "model.gate.ki": 1e-5, "model.gate.sgd_lr": 5e-4,
                          "train.checkpoint_every": 100, **data}))  # one save: saves change no number here
    logged = read_metrics(tmp_path / "gated")
    realised = np.mean([logged[s]["deletion"] for s in range(61, 101)])
    assert abs(realised - 0.3) < 0.1, f"deleted {realised:.1%} over the last 40 steps, target 30%"
