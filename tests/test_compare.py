import json

import pytest
import yaml

from hiermodel import cli
from hiermodel.eval.compare import markdown
from hiermodel.eval.score import language_of
from tests.conftest import MICRO

def test_language_comes_from_the_file_name():
    assert language_of("../shared/corpus/de_faust_1.txt") == "de"
    assert language_of("/data/zh_hongloumeng_ch1-80.txt") == "zh"
    assert language_of("builtin:eval") == "builtin:eval"


@pytest.mark.slow
def test_compare_trains_each_kind_to_the_same_flops_and_reports_them(tmp_path, capsys):
    micro = yaml.safe_load(MICRO.read_text())
    paths = []
    # hat and subword: tokens of different sizes (the byte kind takes the hat kind's path here).
    for kind, extra in [("hat", {}), ("subword", {"vocab_size": 400})]:
        path = tmp_path / f"micro_{kind}.yaml"
        path.write_text(yaml.safe_dump({**micro, "model": {**micro["model"], "kind": kind, **extra}}))
        paths.append(str(path))
    budget = 2e10
    out = tmp_path / "out"
    args = ["compare", "--models", *paths, "--output", str(out), "--budget-flops", str(budget),
            "--curve-points", "2", "--perturb", "drop:0.1", "data.eval=builtin:eval", "data.holdout=0.5",
            "data.chunk_bytes=2000", "train.eval_rows=4"]
    assert cli.main(args) == 0
    results = {r["name"]: r for r in json.loads((out / "results.json").read_text())}
    assert set(results) == {"micro_hat", "micro_subword"}
    for r in results.values():
        step_flops = r["train_flops"] / r["steps"]
        assert budget - step_flops < r["train_flops"] <= budget  # matched compute, to within a step
        assert 0 < r["bpb"] < 9 and len(r["curve"]) >= 2 and r["curve"][-1][0] == r["train_flops"]
        assert set(r["degradation"]) == {"drop:0.1"}
        assert r["train_flops_per_byte"] > r["inference_flops_per_byte"] > 0
    # The same held-out bytes for every kind, whatever its tokens.
    assert len({r["eval_bytes"] for r in results.values()}) == 1
    assert results["micro_subword"]["steps"] != results["micro_hat"]["steps"]
    table = (out / "compare.md").read_text()
    assert all(name in table for name in results) and "Δbpb drop:0.1" in table
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "bpe400.json").exists() and (out / "micro_subword" / "tokenizer.json").exists()
    assert markdown(list(results.values())) in table

    # A second run finds every model trained and only scores again.
    capsys.readouterr()
    assert cli.main(args) == 0
    again = {r["name"]: r for r in json.loads((out / "results.json").read_text())}
    assert all(again[n]["bpb"] == pytest.approx(results[n]["bpb"]) for n in results)
