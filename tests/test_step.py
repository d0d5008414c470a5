import pytest

from hiermodel.config import TrainConfig
from hiermodel.train.step import schedule


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    lr = schedule(TrainConfig(steps=100, warmup_steps=10, learning_rate=1.0, min_lr_ratio=0.1, schedule="cosine"))
    assert float(lr(0)) == 0.0 and float(lr(10)) == pytest.approx(1.0)
    assert float(lr(100)) == pytest.approx(0.1)
    values = [float(lr(s)) for s in range(10, 101)]
    assert all(a >= b - 1e-7 for a, b in zip(values, values[1:]))


def test_wsd_schedule_holds_the_peak_then_decays_linearly():
    lr = schedule(TrainConfig(steps=100, warmup_steps=10, learning_rate=1.0, min_lr_ratio=0.0,
                              schedule="wsd", decay_fraction=0.2))
    assert float(lr(5)) == pytest.approx(0.5)
    assert [float(lr(s)) for s in (10, 50, 80)] == pytest.approx([1.0, 1.0, 1.0])
    assert float(lr(90)) == pytest.approx(0.5) and float(lr(100)) == pytest.approx(0.0)
