"""hiermodel compress / decompress with a trained micro M1: exact round trips through shards,
across batch sizes and shard counts, and clear errors for the wrong M1 or a broken directory."""

import json

import jax
import pytest

from hiermodel.cli import main
from hiermodel.compress import files
from hiermodel.errors import UserError
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
    summary = json.loads((tmp_path / "w" / files.SUMMARY_FILE).read_text())
    summary["m1_fingerprint"] = "0" * 64
    (tmp_path / "w" / files.SUMMARY_FILE).write_text(json.dumps(summary))
    with pytest.raises(UserError, match="is not the one that compressed"):
        files.decompress(m1_run, tmp_path / "w")
    with pytest.raises(UserError, match="not a window shard directory"):
        files.decompress(m1_run, tmp_path / "nothing")


def test_m2_trains_on_compressed_shards_and_is_scored_in_raw_bytes(m1_run, tmp_path, corpus, capsys):
    from hiermodel.train.loop import train
    from hiermodel.train.metrics import read_metrics

    text = (corpus / "en_pride_and_prejudice.txt").read_bytes()
    train_docs = [text[i:i + 600] for i in range(0, 12_000, 600)]
    eval_docs = [text[20_000:21_000], text[21_000:22_000]]
    files.compress(m1_run, train_docs, tmp_path / "train", num_shards=2)
    coded = files.compress(m1_run, eval_docs, tmp_path / "eval")
    run_dir = tmp_path / "m2"
    train(micro_config(run_dir=run_dir, **{"model.kind": "eiw", "model.m1": m1_run, "data.row_words": 256,
                                           "data.train": str(tmp_path / "train" / "*.arrayrecord"),
                                           "mesh.data": 1, "train.steps": 12, "train.checkpoint_every": 12,
                                           "train.log_every": 4}), devices=jax.devices()[:1])
    losses = [entry["loss"] for step, entry in sorted(read_metrics(run_dir).items()) if "loss" in entry]
    assert losses[-1] < losses[0]

    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(run_dir), "--data", str(tmp_path / "eval" / "*.arrayrecord"),
                 "--output-json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["bytes"] == sum(map(len, eval_docs))  # raw bytes, not the records' bytes
    assert "bits_per_char" not in result  # no text to count characters in
    # Better than the windows themselves (16 bits each, M1's coded rate): M2 learned their order.
    assert result["bpb"] < coded["bits_per_byte"]
    assert main(["eval", "--checkpoint", str(run_dir), "--data", str(tmp_path / "eval"), "--perturb", "swap:0.1"]) == 2
    assert "reads compressed windows" in capsys.readouterr().err
