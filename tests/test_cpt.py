"""Continued pretraining: weights from another run, a new mixture, both languages evaluated."""

import jax
import numpy as np
import pytest

from hiermodel.data.sources import open_split
from hiermodel.train.loop import train
from hiermodel.train.metrics import read_metrics
from tests.conftest import micro_config
from tools import plot_runs


def test_continuing_on_a_new_language_reports_old_and_new(corpus, tmp_path, capsys):
    english, german = str(corpus / "en_alice_in_wonderland.txt"), str(corpus / "de_alice_im_wunderland.txt")
    data = {"data.chunk_bytes": 2048, "data.holdout": 0.05, "data.eval": f"{english},{german}",
            "train.eval_every": 3, "train.eval_rows": 0, "mesh.data": 1}
    base = micro_config(run_dir=tmp_path / "en", **data, **{"data.train": english, "train.steps": 3})
    train(base, devices=jax.devices()[:1])
    continued = micro_config(run_dir=tmp_path / "de", init_from=tmp_path / "en", **data, **{
        "data.train": f"{german},{english}", "data.train_weights": "0.9,0.1", "train.steps": 6,
        "train.freeze": "encoder", "train.warmup_steps": 2})
    train(continued, devices=jax.devices()[:1])
    pieces, held = open_split(continued.data, "eval").split_size
    assert pieces >= 2 and f"data.holdout=0.05: {held:,} bytes in {pieces} pieces held out" in capsys.readouterr().out

    evals = read_metrics(continued.run_dir, "eval")
    assert sorted(evals) == [3, 6] and all({"bpb_en", "bpb_de"} <= set(r) for r in evals.values())
    series = plot_runs.curves([str(base.run_dir), str(continued.run_dir)])
    assert set(series) == {"en", "de"} and len(series["de"][str(continued.run_dir)]) == 2
    out = tmp_path / "curves.png"
    assert plot_runs.main([str(base.run_dir), str(continued.run_dir), "--output", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    german = series["de"][str(continued.run_dir)]
    assert plot_runs.first_step_reaching(german, german[0][1]) == 3
    assert plot_runs.first_step_reaching(german, min(b for _, b in german) - 1) is None
    assert plot_runs.main([str(continued.run_dir), "--output", str(out), "--reach", f"de={german[-1][1]}"]) == 0
    assert plot_runs.main([str(continued.run_dir), "--output", str(out), "--reach", "xx=1"]) == 2
    losses = [m["loss"] for m in read_metrics(continued.run_dir).values()]
    assert len(losses) == 6 and np.isfinite(losses).all()
    with pytest.raises(SystemExit):
        plot_runs.main([])
