"""hiermodel compress / decompress with a trained micro M1: exact round trips through shards,
across batch sizes and shard counts, and clear errors for the wrong M1 or a broken directory."""

import json

import jax
import pytest

from hiermodel.cli import main
from hiermodel.compress import files
from hiermodel.data import window_records
from hiermodel.errors import UserError
from hiermodel.run import INTEGER_M1_FILE
from tests.conftest import micro_config

DOCUMENTS = [b"", b"a", "Grüße aus Köln, 世界!\n".encode() * 3, bytes(range(256)) * 2,
             b"The quick brown fox jumps over the lazy dog. " * 20]


@pytest.fixture(scope="module")
def m1_run(tmp_path_factory):
    from hiermodel.train.loop import train

    run_dir = tmp_path_factory.mktemp("m1") / "run"
    train(micro_config(run_dir=run_dir, **{"model.kind": "byte", "model.byte_window": 64, "mesh.data": 1,
                                           "train.steps": 30, "train.learning_rate": 1e-2, "train.warmup_steps": 5,
                                           "train.checkpoint_every": 30, "train.log_every": 10}),
          devices=jax.devices()[:1])
    return str(run_dir)


def test_decompress_of_compress_is_exact_across_batches_and_shards(m1_run, tmp_path):
    summary = files.compress(m1_run, DOCUMENTS, tmp_path / "w", num_shards=3, batch_size=4, segment_bytes=100)
    assert summary["documents"] == len(DOCUMENTS) and summary["bytes_in"] == sum(map(len, DOCUMENTS))
    assert summary["bits_per_byte"] == pytest.approx(16 * summary["windows_out"] / summary["bytes_in"])
    restored_summary, restored = files.decompress(m1_run, tmp_path / "w", batch_size=7)
    assert restored == DOCUMENTS
    assert restored_summary["windows_out"] == summary["windows_out"]


def test_the_cli_restores_a_file_byte_for_byte(m1_run, tmp_path, corpus, capsys):
    text = b"".join((path.read_bytes()[:1500] for path in sorted(corpus.glob("*.txt"))))
    source = tmp_path / "mixed.txt"
    source.write_bytes(text)
    assert main(["compress", str(source), "--m1", m1_run, "--output", str(tmp_path / "w"), "--chunk-bytes", "700",
                 "--shards", "2"]) == 0
    assert "bytes per window" in capsys.readouterr().out
    assert main(["decompress", str(tmp_path / "w"), "--m1", m1_run, "--output", str(tmp_path / "back.txt")]) == 0
    assert (tmp_path / "back.txt").read_bytes() == text


def test_the_wrong_m1_or_a_broken_directory_is_a_clear_error(m1_run, tmp_path):
    files.compress(m1_run, DOCUMENTS[2:], tmp_path / "w")
    summary = json.loads((tmp_path / "w" / window_records.SUMMARY_FILE).read_text())
    summary["m1_fingerprint"] = "0" * 64
    (tmp_path / "w" / window_records.SUMMARY_FILE).write_text(json.dumps(summary))
    with pytest.raises(UserError, match="is not the one that compressed"):
        files.decompress(m1_run, tmp_path / "w")
    with pytest.raises(UserError, match="not a window shard directory"):
        files.decompress(m1_run, tmp_path / "nothing")


@pytest.fixture(scope="module")
def m2_run(m1_run, tmp_path_factory):
    """An eiw model trained on windows of English text, and its held-out windows (in eval/)."""
    from hiermodel.train.loop import train
    from tests.conftest import CORPUS

    if not (CORPUS / "SOURCES.md").exists():
        pytest.skip(f"the shared corpus is not at {CORPUS} (it lives beside the repository, not in it)")
    tmp_path = tmp_path_factory.mktemp("m2")
    text = (CORPUS / "en_pride_and_prejudice.txt").read_bytes()
    train_docs = [text[i:i + 600] for i in range(0, 12_000, 600)]
    files.compress(m1_run, train_docs, tmp_path / "train", num_shards=2)
    files.compress(m1_run, [text[20_000:21_000], text[21_000:22_000]], tmp_path / "eval")
    run_dir = tmp_path / "run"
    train(micro_config(run_dir=run_dir, **{"model.kind": "eiw", "model.m1": m1_run, "data.row_words": 256,
                                           "data.train": str(tmp_path / "train" / "*.arrayrecord"),
                                           "mesh.data": 1, "train.steps": 12, "train.checkpoint_every": 12,
                                           "train.log_every": 4}), devices=jax.devices()[:1])
    return str(run_dir)


def test_m2_trains_on_compressed_shards_and_is_scored_in_raw_bytes(m2_run, capsys):
    from pathlib import Path

    from hiermodel.train.metrics import read_metrics

    run_dir, tmp_path = m2_run, Path(m2_run).parent
    coded = window_records.read_summary(str(tmp_path / "eval"))
    logged = [entry for step, entry in sorted(read_metrics(run_dir).items()) if "loss" in entry]
    assert logged[-1]["loss"] < logged[0]["loss"]
    # M1's FLOPs per byte are in M2's (the training FLOPs count M2's alone).
    m1_per_byte = window_records.m1_flops_per_byte(window_records.shard_summaries([str(tmp_path / "train" / "*.arrayrecord")]))
    assert m1_per_byte > 0 and all(entry["flops_per_byte"] > m1_per_byte for entry in logged)

    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(run_dir), "--data", str(tmp_path / "eval" / "*.arrayrecord"),
                 "--output-json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["bytes"] == coded["bytes_in"]  # raw bytes, not the records' bytes
    assert "bits_per_char" not in result  # no text to count characters in
    # Better than the windows themselves (16 bits each, M1's coded rate): M2 learned their order.
    assert result["bpb"] < coded["bits_per_byte"]
    assert main(["eval", "--checkpoint", str(run_dir), "--data", str(tmp_path / "eval"), "--perturb", "swap:0.1"]) == 2
    assert "reads compressed windows" in capsys.readouterr().err


def test_m1_flops_per_byte_count_every_m1_step_of_the_coder(m1_run, tmp_path):
    from hiermodel.compress.integer_lm import IntegerLM

    summary = files.compress(m1_run, DOCUMENTS, tmp_path / "w", batch_size=3, segment_bytes=50)
    shape = IntegerLM.load(f"{m1_run}/{INTEGER_M1_FILE}").shape
    # The shared BOS step, then one step per byte a window took but its first (whose CDF is
    # BOS's), and one more for the byte that did not fit.
    windows, capacity = summary["windows_out"], shape.max_context - 1
    assert summary["bytes_in"] - windows < summary["m1_positions"] <= windows * capacity + 1
    assert summary["m1_flops_per_byte"] == pytest.approx(summary["m1_positions"] * shape.position_flops()
                                                         / summary["bytes_in"])
    assert window_records.m1_flops_per_byte(window_records.shard_summaries([str(tmp_path / "w" / "*.arrayrecord")])) == pytest.approx(
        summary["m1_flops_per_byte"])


def test_m2_generation_decodes_its_windows_with_m1(m2_run, m1_run, capsys):
    from hiermodel.compress import windows
    from hiermodel.compress.integer_lm import IntegerPredictor
    from hiermodel.eval.generate import Sampling, generate_windows
    from hiermodel.run import encoding, load_params

    config, mesh, graphdef, params = load_params(m2_run)
    predictor = IntegerPredictor(files.integer_m1(m1_run))
    prompts = [b"It is a truth universally", b""]
    with jax.set_mesh(mesh):
        run = lambda prompts, seed: generate_windows(graphdef, params, encoding(config), predictor, prompts, 60,
                                                     config.data, config.model.compute_dtype, Sampling(seed=seed))
        samples = run(prompts, 3)
        assert [run([p], 3 + r)[0] for r, p in enumerate(prompts)] == samples  # row r samples alone from seed + r
    for sample in samples:
        assert 0 < len(sample.text) <= 60 and sample.codewords
        # The text is what M1 makes of the sampled windows, and the undecodable ones are those it cannot.
        decoded = windows.decode_documents(predictor, [sample.codewords], 16)[0]
        assert decoded.data[:60] == sample.text
        assert decoded.invalid_windows.tolist() == sample.undecodable

    assert main(["generate", "--checkpoint", m2_run, "--prompt", "It is a truth universally", "--max-bytes", "30",
                 "--seed", "3"]) == 0
    out = capsys.readouterr().out.encode("utf-8", errors="surrogateescape")
    assert out.startswith(b"It is a truth universally") and len(out) <= len(b"It is a truth universally") + 31
    assert main(["generate", "--checkpoint", m2_run, "--prompt", "x", "--no-cache"]) == 2


def test_a_matched_flops_comparison_charges_m2_for_m1(m2_run, tmp_path):
    from pathlib import Path

    from hiermodel.eval.compare import bytes_per_step, compare, plan
    from hiermodel.models.registry import train_flops

    config_file = str(Path(m2_run) / "config.yaml")
    held_out = f"data.eval={Path(m2_run).parent / 'eval' / '*.arrayrecord'}"
    [planned] = plan([config_file], [held_out], tmp_path, budget_flops=1e12, budget_bytes=0, curve_points=2)
    config = planned.config
    m1_per_byte = window_records.m1_flops_per_byte(window_records.shard_summaries(config.data.train))
    assert planned.m1_flops_per_byte == m1_per_byte > 0
    model_flops = config.train.batch_size * train_flops(config.model, config.data.row_tokens, config.data.row_words)
    assert planned.step_flops == model_flops + int(m1_per_byte * bytes_per_step(config))
    with pytest.raises(UserError, match="reads compressed windows"):
        compare([config_file], [held_out], str(tmp_path / "c"), budget_flops=1e12, perturb=["swap:0.1"])
