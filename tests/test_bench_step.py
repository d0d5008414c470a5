"""tools/bench_step.py times the real step on real batches and derives its figures consistently."""

import numpy as np
import pytest

from hiermodel import config as config_lib
from hiermodel.models.registry import model_flops, train_flops
from tests.conftest import MICRO
from tools import bench_step


def test_step_benchmark_reports_consistent_figures(capsys):
    result = bench_step.main([str(MICRO), "mesh.data=8", "--steps", "3", "--warmup", "1", "train.batch_size=8"])
    config = config_lib.load(MICRO)
    assert result["devices"] == 8 and len(result["step_seconds_all"]) == 3
    assert result["step_seconds"] == np.median(result["step_seconds_all"]) > 0
    # Packed rows are nearly full of text: the bytes a step learns from are most of 8 rows.
    assert 0.8 * 8 * config.data.row_tokens < result["bytes_per_step"] <= 8 * config.data.row_tokens
    assert result["bytes_per_s"] == pytest.approx(result["bytes_per_step"] / result["step_seconds"])
    shape = (config.model, config.data.row_tokens, config.data.row_words)
    assert result["hfu"] == pytest.approx(8 * train_flops(*shape) / result["step_seconds"] / result["peak_flops"])
    assert result["mfu"] == pytest.approx(8 * model_flops(*shape) / result["step_seconds"] / result["peak_flops"])
    assert result["mfu"] < result["hfu"]  # micro's attention is causal: the model needs fewer pairs than are computed
    assert "ms/step (median of 3)" in capsys.readouterr().out


def test_bad_arguments_are_refused(capsys):
    assert bench_step.main([str(MICRO), "--steps", "0"]) is None
    assert "--steps and --warmup must be at least 1" in capsys.readouterr().err
