import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from hiermodel.train import calibrate
from hiermodel.train.checkpoint import checkpoint_dir
from tests.conftest import MICRO, REPO, micro_config, xla_flags
from tests.test_cli import wait_for
from tools import fetch_corpora, gate_calibrate, gate_sweep


def _result(corpus, seed, name, bpb, deleted=None, target=0.5):
    hard = {"bpb": bpb, "per_language": {}, "bytes_per_s": 1.0}
    if deleted is not None:
        hard["deletion_rate"] = deleted
    return {"corpus": corpus, "seed": seed, "name": name, "hard": hard, "target": target}


def test_summary_pairs_each_seed_with_its_own_baselines():
    results = [_result("en", 0, "no gate", 2.0), _result("en", 0, "learned 0.5", 2.04, 0.5),
               _result("en", 0, "random 0.5", 2.10, 0.5),
               _result("en", 1, "no gate", 3.0), _result("en", 1, "learned 0.5", 3.03, 0.44),
               _result("en", 1, "random 0.5", 3.06, 0.5),
               _result("en", 0, "learned 0.5, later=x", 2.02, 0.5), _result("en", 1, "learned 0.5, later=x", 3.0, 0.5),
               _result("fi", 0, "no gate", 4.0), _result("fi", 0, "learned 0.5", 4.4, 0.3)]
    rows = {(r["corpus"], r["name"]): r for r in gate_sweep.summarize(results)}
    learned = rows["en", "learned 0.5"]
    assert learned["cost"] == pytest.approx([0.02, 0.01])
    assert learned["vs_random"] == pytest.approx([-0.06, -0.03])
    assert rows["en", "random 0.5"]["cost"] == pytest.approx([0.05, 0.02])
    assert rows["en", "learned 0.5, later=x"]["vs_random"] == pytest.approx([-0.08, -0.06])
    for r in results:
        r["layer"] = 2 if "later" in r["name"] else 1
    rows = {(r["corpus"], r["name"]): r for r in gate_sweep.summarize(results)}
    assert "vs_random" not in rows["en", "learned 0.5, later=x"]  # random deletes after another layer
    assert rows["en", "learned 0.5"]["vs_random"] == pytest.approx([-0.06, -0.03])
    assert "cost" not in rows["en", "no gate"] and "vs_random" not in rows["fi", "learned 0.5"]
    # A random variant by any name is the twin when it deletes from the same layers.
    results += [{**_result("en", seed, "random 0.5, after layer 2", bpb, 0.5), "layer": 2, "mode": "random"}
                for seed, bpb in ((0, 2.05), (1, 3.01))]
    rows = {(r["corpus"], r["name"]): r for r in gate_sweep.summarize(results)}
    assert rows["en", "learned 0.5, later=x"]["vs_random"] == pytest.approx([-0.03, -0.01])
    for r in results[-2:]:
        r["full_layers"] = 1
    assert "vs_random" not in {(r["corpus"], r["name"]): r for r in gate_sweep.summarize(results)}["en", "learned 0.5, later=x"]
    for r in results:
        if "later" in r["name"]:
            r["full_layers"] = 1
    assert "vs_random" in {(r["corpus"], r["name"]): r for r in gate_sweep.summarize(results)}["en", "learned 0.5, later=x"]
    for r in results[-2:]:
        r["full_keys"] = "kept"  # full layers reading other keys: another baseline
    assert "vs_random" not in {(r["corpus"], r["name"]): r for r in gate_sweep.summarize(results)}["en", "learned 0.5, later=x"]
    for r in results:
        if "later" in r["name"]:
            r["full_keys"] = "kept"
    assert "vs_random" in {(r["corpus"], r["name"]): r for r in gate_sweep.summarize(results)}["en", "learned 0.5, later=x"]
    for r in results[-2:]:
        r["full_recent"] = 16  # ... and every recent key as well: another baseline again
    assert "vs_random" not in {(r["corpus"], r["name"]): r for r in gate_sweep.summarize(results)}["en", "learned 0.5, later=x"]
    table = gate_sweep.summary_markdown(gate_sweep.summarize(results))
    en_line = next(line for line in table.splitlines() if line.startswith("| en | learned"))
    fi_line = next(line for line in table.splitlines() if line.startswith("| fi | learned"))
    assert "+1.50 ± 0.71%" in en_line and "| met |" in en_line  # 47% deleted for 1.5%
    assert "+10.00%" in fi_line and "| not met |" in fi_line  # one seed: no spread


def test_computed_share_counts_the_gated_layers_on_the_capacity():
    run = {**_result("en", 0, "learned 0.5", 2.0, 0.5), "layer": 1, "layers": 4}
    run["hard"]["positions_after_gate"] = 0.6
    assert gate_sweep.computed_share(run) == pytest.approx((1 + 3 * 0.6) / 4)
    assert gate_sweep.computed_share({**run, "full_layers": 1}) == pytest.approx((2 + 2 * 0.6) / 4)
    assert gate_sweep.computed_share({**run, "layer": 0}) == 1.0
    assert gate_sweep.computed_share({**_result("en", 0, "learned 0.5", 2.0, 0.5), "layer": 1}) is None  # older


def test_variants_add_runs_with_their_overrides():
    variants = gate_sweep._variants([0.5], [0.5], ["learned 0.5, gate later=model.gate.layer=2 model.gate.target=0.5"])
    assert variants[-1] == ("learned 0.5, gate later", ["model.gate.layer=2", "model.gate.target=0.5"])
    assert [name for name, _ in variants[:3]] == ["no gate", "learned 0.5", "random 0.5"]
    with pytest.raises(gate_sweep.UserError, match="NAME=key=value"):
        gate_sweep._variants([], [], ["later="])


def test_each_planned_run_continues_its_own_corpus_and_seed(tmp_path):
    corpora = [gate_sweep._corpus("fi=c/fi_*"), gate_sweep._corpus("en=c/en_*")]
    planned = gate_sweep.plan(str(REPO / "configs" / "gates_byte.yaml"), ["init_from=runs/b/{corpus}/seed{seed}/no_gate"],
                              gate_sweep._variants([0.5], [], []), [0, 2], corpora, tmp_path)
    assert [(c, s, n) for c, s, n, _ in planned][:3] == [("fi", 0, "no gate"), ("fi", 0, "learned 0.5"), ("en", 0, "no gate")]
    for corpus, seed, name, config in planned:
        assert config.init_from == f"runs/b/{corpus}/seed{seed}/no_gate" and config.seed == seed
        assert config.data.train == [f"c/{corpus}_*"]
        assert config.run_dir == str(tmp_path / corpus / f"seed{seed}" / name.replace(" ", "_"))
    # One seed of one corpus goes where the larger plan put it, so its finished runs are found.
    alone = gate_sweep.plan(str(REPO / "configs" / "gates_byte.yaml"), [], gate_sweep._variants([0.5], [], []), [2],
                            corpora[1:], tmp_path)
    assert [c.run_dir for *_, c in alone] == [c.run_dir for cp, s, _, c in planned if (cp, s) == ("en", 2)]
    own_data = gate_sweep.plan(str(REPO / "configs" / "gates_byte.yaml"), [], gate_sweep._variants([], [], []), [0],
                               [("config", [])], tmp_path)
    assert own_data[0][3].run_dir == str(tmp_path / "seed0" / "no_gate")


def test_finished_summarises_the_plans_finished_runs_and_trains_nothing(tmp_path, capsys):
    import json

    args = [str(MICRO), "--output", str(tmp_path), "--targets", "0.5", "--random", "0.5", "--seeds", "0,1",
            "--no-soft", "--finished"]
    assert gate_sweep.main(args) == 2
    assert "no run of this plan has finished" in capsys.readouterr().err
    for name, bpb in (("no gate", 2.0), ("learned 0.5", 2.1), ("random 0.5", 2.2)):
        run = tmp_path / "seed0" / name.replace(" ", "_")
        run.mkdir(parents=True)
        # The random twin was already scored at the learned rate: nothing is scored again.
        at_rate = {"random_at_rate": {"bpb": 2.15}} if name.startswith("learned") else {}
        (run / "result.json").write_text(json.dumps({**_result("config", 0, name, bpb, 0.5), "layer": 1, **at_rate}))
    assert gate_sweep.main(args) == 0
    assert not (tmp_path / "seed1").exists()
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [(r["seed"], r["name"]) for r in rows] == [(0, "no gate"), (0, "learned 0.5"), (0, "random 0.5")]
    learned = next(line for line in (tmp_path / "summary.md").read_text().splitlines() if "| learned 0.5 |" in line)
    assert "| +5.00% | -0.1000 | -0.0500 | not met |" in learned
    # A smaller plan into the same output keeps the other finished runs in the output's tables,
    # after its own; what it prints is its own plan.
    capsys.readouterr()
    subset = [str(MICRO), "--output", str(tmp_path), "--targets", "", "--random", "0.5", "--seeds", "0", "--no-soft",
              "--finished"]
    assert gate_sweep.main(subset) == 0
    printed = capsys.readouterr().out
    assert "| random 0.5 |" in printed and "| learned 0.5 |" not in printed
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["name"] for r in rows] == ["no gate", "random 0.5", "learned 0.5"]
    assert "-0.1000" in (tmp_path / "summary.md").read_text()


def test_a_corpus_needs_a_name_and_patterns():
    assert gate_sweep._corpus("en=a/*.txt,b/*.txt")[1] == ["data.train=[a/*.txt,b/*.txt]", "data.eval=[a/*.txt,b/*.txt]"]
    with pytest.raises(gate_sweep.UserError, match="NAME=PATTERN"):
        gate_sweep._corpus("a/*.txt")


def test_the_bible_splits_into_books_without_verse_numbers():
    formatted = ("\nGenesis 1\n\n  1 In the beginning God created\nthe heaven.\n  2 And the earth.\n\nGenesis 2\n\n"
                 "  1 Thus the heavens.\n\n1 Samuel 1\n\n  1 Now there was a certain man.\n"
                 "\nSong of Solomon 1\n\n  1 The song of songs.\n")
    books = fetch_corpora.kjv_books(formatted)
    assert list(books) == ["Genesis", "1 Samuel", "Song of Solomon"]
    assert books["Genesis"] == "Genesis 1\n\nIn the beginning God created\nthe heaven.\nAnd the earth.\n\nGenesis 2\n\nThus the heavens.\n"
    assert books["1 Samuel"].endswith("Now there was a certain man.\n")


def test_the_cost_split_classes_each_target_byte_and_adds_up_to_the_whole_difference():
    from tools import gate_cost

    tokens = np.array([[ord(c) for c in "ab cd\nef"]])
    # targets: b, ' ', c, d, '\n', e, f, (none)
    assert gate_cost.byte_classes(tokens).tolist() == [[2, 0, 1, 2, 0, 1, 2, 2]]
    rng = np.random.default_rng(0)
    base, gated = rng.uniform(0, 8, 1000), rng.uniform(0, 8, 1000)
    deleted, classes = rng.uniform(size=1000) < 0.5, rng.integers(0, 3, 1000)
    rows = gate_cost.split_cost(gated, base, deleted, classes)
    assert len(rows) == 6 and sum(r["share"] for r in rows) == pytest.approx(1.0)
    assert sum(r["share_of_cost"] for r in rows) == pytest.approx(1.0)
    assert sum(r["extra_bits_per_byte"] for r in rows) == pytest.approx(gated.mean() - base.mean())
    spaces_kept = next(r for r in rows if r["class"] == "whitespace" and r["position"] == "kept")
    where = (classes == 0) & ~deleted
    assert spaces_kept["bpb_gated"] == pytest.approx(gated[where].mean())


def test_the_differences_standard_error_is_the_blocks_spread_over_their_count():
    from tools import gate_cost

    rng = np.random.default_rng(1)
    base = rng.uniform(0, 8, 256 * 400)
    assert gate_cost.difference_standard_error(base + 0.3, base) == pytest.approx(0.0, abs=1e-12)
    # Independent bytes: sd / sqrt(n). Bytes that differ block by block: the blocks' sd / sqrt(blocks).
    noise = rng.normal(0, 2.0, base.shape)
    assert gate_cost.difference_standard_error(base + noise, base) == pytest.approx(2.0 / np.sqrt(len(base)), rel=0.1)
    shifts = np.repeat(rng.normal(0, 1.0, 400), 256)
    assert gate_cost.difference_standard_error(base + shifts, base) == pytest.approx(1.0 / np.sqrt(400), rel=0.1)


def test_a_byte_is_repeated_when_it_and_its_context_occurred_earlier_in_the_window():
    from tools import gate_cost

    text = b"the cat sat; the cat ran; the cat sat"
    tokens = np.array([list(text)])

    def brute_force(window):  # position i predicts byte i+1: does text[i-3:i+2] end earlier, in the window?
        return [i for i in range(3, len(text) - 1)
                if any(text[e - 4:e + 1] == text[i - 3:i + 2] for e in range(max(4, i + 1 - window + 1) if window
                                                                              else 4, i + 1))]

    repeated = gate_cost.repeated_in_window(tokens, 0, context=3)
    assert np.nonzero(repeated[0])[0].tolist() == brute_force(0) and len(brute_force(0)) > 5
    second = text.index(b"the cat ran")
    assert repeated[0, second + 6] and not repeated[0, second + 7]  # "cat " repeats, "cat r" does not
    assert repeated[0, len(text) - 2]  # the last "sat" repeats the first
    # Outside the window an earlier occurrence does not count: "the cat" recurs 13 bytes later.
    near = gate_cost.repeated_in_window(tokens, 13, context=3)
    assert np.nonzero(near[0])[0].tolist() == brute_force(13) and near.sum() < repeated.sum()


def test_a_signal_stops_the_sweep_without_recording_the_unfinished_run(tmp_path):
    args = [sys.executable, "tools/gate_sweep.py", str(MICRO), "--output", str(tmp_path), "--targets", "",
            "--seeds", "0,1", "--no-soft", "train.steps=100000", "train.checkpoint_every=2", "train.log_every=1"]
    process = subprocess.Popen(args, cwd=REPO, env={**os.environ, "XLA_FLAGS": xla_flags(1)}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    first = tmp_path / "seed0" / "no_gate"
    wait_for(lambda: (checkpoint_dir(first) / "2").is_dir(), process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 1, err
    assert f"SIGTERM stopped {first} before train.steps" in err and "rerun the same command to resume" in err
    assert not (first / "result.json").exists()
    assert not (tmp_path / "seed1").exists(), "the sweep went on to the next run"


def test_kept_gate_values_count_the_kept_positions_the_gated_layers_hardly_see():
    from tools import gate_cost

    gate_values = np.array([-0.5, -14.0, -14.9, -9.0, -29.0, -16.0])
    deleted = np.array([False, False, False, False, True, True])
    kept = gate_cost.kept_gate_values(gate_values, deleted, -30.0)
    assert kept["hidden"] == pytest.approx(0.75)  # three of four kept below k/4 = -7.5
    assert kept["quantiles"][2] == pytest.approx(-11.5)  # the median of -0.5, -9, -14, -14.9


def test_the_random_twin_is_scored_again_at_the_learned_gates_held_out_rate(tmp_path, monkeypatch):
    import json

    import jax

    from hiermodel.train.loop import train

    random_dir = tmp_path / "random"
    train(micro_config(run_dir=random_dir, **{"model.kind": "byte", "model.byte_window": 64, "mesh.data": 1,
                                              "model.gate.layer": 1, "model.gate.mode": "random",
                                              "model.gate.target": 0.5, "data.eval": "[builtin:eval]",
                                              "train.steps": 2}), devices=jax.devices()[:1])
    as_trained = gate_sweep._score(random_dir, "hard")
    learned = {**_result("config", 0, "learned 0.5", 2.0, 0.2), "layer": 1, "run_dir": str(tmp_path / "learned")}
    random = {**_result("config", 0, "random 0.5", 2.1, as_trained["deletion_rate"]), "layer": 1, "mode": "random",
              "run_dir": str(random_dir)}
    (tmp_path / "learned").mkdir()
    gate_sweep.score_random_at_learned_rates([learned], [learned, random])
    saved = json.loads((tmp_path / "learned" / "result.json").read_text())
    at_rate = saved["random_at_rate"]
    assert "run_dir" not in saved  # where the file lies says it
    assert abs(as_trained["deletion_rate"] - 0.5) < 0.03 and abs(at_rate["deletion_rate"] - 0.2) < 0.03
    assert at_rate["bytes"] == as_trained["bytes"] and at_rate["bpb"] != as_trained["bpb"]
    assert "random_at_rate" not in random
    row = {r["name"]: r for r in gate_sweep.summarize([learned, random])}["learned 0.5"]
    assert row["vs_random_at_rate"] == pytest.approx([2.0 - at_rate["bpb"]])
    monkeypatch.setattr(gate_sweep, "_score", lambda *a, **k: pytest.fail("scored twice"))
    gate_sweep.score_random_at_learned_rates([learned], [learned, random])


def test_the_bias_change_deletes_the_target_share_and_moves_every_margin_alike():
    margins_N = calibrate.margins(np.array([[0.0, -1.0, -15.0, -29.0], [-30.0, -7.5, -22.5, 0.0]]),
                                  np.array([[True, True, True, True], [False, True, True, True]]), -30.0)
    assert margins_N == pytest.approx([np.inf, np.log(29.0), 0.0, -np.log(29.0), np.log(3.0), -np.log(3.0), np.inf])
    assert calibrate.deleted_share(margins_N) == pytest.approx(2 / 7)
    change = calibrate.bias_change(margins_N, 4 / 7)
    assert change == pytest.approx(-np.log(29.0)) and calibrate.deleted_share(margins_N, change) == pytest.approx(4 / 7)
    # More than the positions that may go: all of those, not the ones that must stay.
    assert calibrate.deleted_share(margins_N, calibrate.bias_change(margins_N, 0.9)) == pytest.approx(5 / 7)


def test_a_run_calibrated_after_training_differs_only_in_its_gate_bias_and_deletes_its_target(tmp_path):
    import jax

    from hiermodel.run import load_params
    from hiermodel.train.loop import train

    def run(name, **extra):
        return train(micro_config(run_dir=tmp_path / name, **{
            "model.kind": "byte", "model.byte_window": 64, "mesh.data": 1, "model.gate.layer": 1,
            "model.gate.target": 0.3, "data.eval": "[builtin:eval]", "train.steps": 3, **extra}),
            devices=jax.devices()[:1])

    plain, calibrated = run("plain"), run("calibrated", **{"model.gate.calibrate": 3})
    change = calibrated["gate_bias_change"]
    assert "gate_bias_change" not in plain and abs(change) > 0.05
    before, after = (load_params(str(tmp_path / name))[3] for name in ("plain", "calibrated"))
    assert float(after["gate"]["b"][0]) == pytest.approx(float(before["gate"]["b"][0]) + change, abs=1e-6)
    after["gate"]["b"] = before["gate"]["b"]
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))

    # The tool reads the same batches: the calibrated run deletes its target there, the plain one
    # moves by the same change to get there.
    assert gate_calibrate.calibrate(str(tmp_path / "plain"), batches=3)["change"] == pytest.approx(change, abs=1e-5)
    result = gate_calibrate.calibrate(str(tmp_path / "calibrated"), batches=3)
    assert abs(result["change"]) < 1e-3 and abs(result["train_deleted"] - 0.3) < 0.01
    assert result["held_out"]["bytes"] == result["held_out_calibrated"]["bytes"] > 0
    assert gate_calibrate.main([str(tmp_path / "none")]) == 2
