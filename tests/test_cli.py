"""End to end through the command line: train, resume, divergence, evaluation, sampling, errors."""

import json
import math
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hiermodel import cli, run
from hiermodel.data.documents import ByteEncoding
from hiermodel.data.packing import RowBuilder
from hiermodel.text.words import split_words
from hiermodel.train.checkpoint import Checkpointer, checkpoint_dir
from hiermodel.train.loop import train
from hiermodel.train.metrics import read_metrics
from tests.conftest import MICRO, REPO, jit_apply, micro_config, run_cli, xla_flags

def latest_step(run_dir):
    checkpointer = Checkpointer(run_dir, read_only=True)
    try:
        return checkpointer.latest_step()
    finally:
        checkpointer.close()


def losses(run_dir):
    return [m["loss"] for _, m in sorted(read_metrics(run_dir).items())]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    train(micro_config(run_dir=run_dir, **{"mesh.data": 1}), devices=jax.devices()[:1])
    return run_dir


def wait_for(predicate, process, timeout=300, poll_s=0.02):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(poll_s)


def start_training(run_dir, steps):
    env = {"XLA_FLAGS": xla_flags(1)}
    args = [sys.executable, "-m", "hiermodel.cli", "train", str(MICRO), f"run_dir={run_dir}",
            f"train.steps={steps}", "train.checkpoint_every=2", "train.log_every=1"]
    import os
    return subprocess.Popen(args, cwd=REPO, env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def saving(run_dir) -> bool:
    """A save after step 4 is under way: orbax writes it under a temporary name first."""
    names = [p.name for p in checkpoint_dir(run_dir).iterdir()] if checkpoint_dir(run_dir).is_dir() else []
    return "4" in names and any(".orbax-checkpoint-tmp" in name for name in names)


@pytest.mark.slow
def test_a_run_killed_during_a_save_resumes_from_the_last_whole_checkpoint_to_the_same_losses(tmp_path):
    # 12 steps: the kill comes during the save after step 6 (one of 2 s or more on eight devices), well
    # before the end; the reference saves only at its end (saves change no loss).
    steps = 12
    whole = run_cli("train", MICRO, f"run_dir={tmp_path / 'whole'}", f"train.steps={steps}", "train.log_every=1",
                    f"train.checkpoint_every={steps}")
    assert whole.returncode == 0, whole.stderr
    process = start_training(tmp_path / "killed", steps)
    wait_for(lambda: saving(tmp_path / "killed"), process, poll_s=0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = max(read_metrics(tmp_path / "killed"))
    assert killed_at < steps, "the run finished before it was killed"
    unfinished = [p.name for p in checkpoint_dir(tmp_path / "killed").iterdir() if "tmp" in p.name]
    last_whole = latest_step(tmp_path / "killed")
    assert last_whole is not None and all(not name.startswith(f"{last_whole}.") for name in unfinished)
    resumed = run_cli("train", MICRO, f"run_dir={tmp_path / 'killed'}", f"train.steps={steps}", "train.log_every=1")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    np.testing.assert_allclose(losses(tmp_path / "killed"), losses(tmp_path / "whole"), rtol=1e-6)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    process = start_training(tmp_path / "run", 100_000)
    wait_for(lambda: (checkpoint_dir(tmp_path / "run") / "2").is_dir(), process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert "SIGTERM: saved checkpoint at step" in out
    latest = latest_step(tmp_path / "run")
    assert latest == max(read_metrics(tmp_path / "run"))  # saved at the step it stopped on


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    result = run_cli("train", MICRO, f"run_dir={tmp_path}", "train.learning_rate=1e30", "train.warmup_steps=2",
                     "train.checkpoint_every=1", "train.steps=6")
    assert result.returncode == 1
    assert "training diverged" in result.stderr and "last good checkpoint (step 1)" in result.stderr
    assert latest_step(tmp_path) == 1
    (tmp_path / "text.txt").write_text("Some text to score.")
    code = cli.main(["eval", "--checkpoint", str(tmp_path), "--data", str(tmp_path / "text.txt")])
    assert code == 0  # the kept checkpoint is whole and usable


def test_eval_reports_the_sum_of_per_byte_bits(trained, tmp_path):
    docs = {"en_cat.txt": "The cat sat on the mat. ".encode() * 3, "de_words.txt": "Ünïcode wörds ünd 日本語.".encode(),
            "en_bytes.txt": bytes(range(200, 256))}
    for name, data in docs.items():
        (tmp_path / name).write_bytes(data)
    out = tmp_path / "result.json"
    assert cli.main(["eval", "--checkpoint", str(trained), "--data", *(str(tmp_path / n) for n in docs),
                     "--output-json", str(out), "--perturb", "case:0", "--perturb", "drop:0.3"]) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"bpb", "bits", "bytes", "tokens", "bytes_per_token", "chars", "words", "bits_per_char",
                           "word_perplexity", "per_source", "per_language", "perturbations"}
    assert result["tokens"] == result["bytes"] and result["bytes_per_token"] == 1  # a byte model
    assert result["bytes"] == sum(len(d) for d in docs.values())
    # Characters: code points of the valid text, one per byte of the invalid one (none continues one).
    assert [e["chars"] for e in result["per_source"]] == [72, len(docs["de_words.txt"].decode()), 56]
    assert [e["words"] for e in result["per_source"]] == [len(split_words(d)) for d in docs.values()]
    english = [e for e in result["per_source"] if "/en_" in e["path"]]
    assert set(result["per_language"]) == {"en", "de"}
    assert result["per_language"]["en"]["bits"] == pytest.approx(sum(e["bits"] for e in english))
    assert result["per_language"]["en"]["chars"] == 72 + 56
    for entry in [result, *result["per_source"], *result["per_language"].values()]:
        assert entry["bits_per_char"] == pytest.approx(entry["bits"] / entry["chars"])
        assert entry["word_perplexity"] == pytest.approx(2 ** (entry["bits"] / entry["words"]))
    # Perturbed text is scored against the clean bytes; a zero rate changes nothing.
    unchanged, dropped = result["perturbations"]["case:0"], result["perturbations"]["drop:0.3"]
    assert unchanged["bits"] == pytest.approx(result["bits"], rel=1e-6) and unchanged["degradation"] == pytest.approx(0)
    assert dropped["bytes"] == result["bytes"] and dropped["bits"] < 0.9 * result["bits"]

    # Independently: each document alone in a row, -log2 p of each of its bytes, summed.
    config, _, graphdef, params = run.load_params(str(trained))
    model = nnx.merge(graphdef, jax.tree.map(np.asarray, params))
    for entry, (name, data) in zip(result["per_source"], docs.items()):
        doc = ByteEncoding(config.data.max_word_bytes).document(data)
        builder = RowBuilder(config.data.row_tokens, config.data.row_words)
        builder.add(doc)
        batch = {k: jnp.asarray(v[None]) for k, v in builder.finish().items()}
        log_probs = jax.nn.log_softmax(jit_apply(lambda model, batch: model(batch), model, batch)[0, :len(data)], axis=-1)
        bits = -float(jnp.take_along_axis(log_probs, jnp.asarray(doc.tokens[1:, None]), axis=1).sum()) / math.log(2)
        assert entry["path"].endswith(name) and entry["bytes"] == len(data)
        assert entry["bits"] == pytest.approx(bits, rel=1e-4)
    assert result["bpb"] == pytest.approx(sum(e["bits"] for e in result["per_source"]) / result["bytes"])


def test_eval_groups_jsonl_documents_by_a_field(trained, tmp_path):
    records = [{"text": "The cat sat on the mat.", "lang": "en"}, {"text": "Die Katze saß.", "lang": "de"},
               {"text": "A dog ran off.", "lang": "en"}]
    (tmp_path / "mixed.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    (tmp_path / "en.jsonl").write_text("\n".join(json.dumps(r) for r in records if r["lang"] == "en"))
    grouped, alone = tmp_path / "grouped.json", tmp_path / "alone.json"
    assert cli.main(["eval", "--checkpoint", str(trained), "--data", str(tmp_path / "mixed.jsonl"),
                     "--group-field", "lang", "--output-json", str(grouped)]) == 0
    assert cli.main(["eval", "--checkpoint", str(trained), "--data", str(tmp_path / "en.jsonl"),
                     "--output-json", str(alone)]) == 0
    grouped, alone = json.loads(grouped.read_text()), json.loads(alone.read_text())
    assert [s["path"].rsplit("#", 1)[1] for s in grouped["per_source"]] == ["lang=de", "lang=en"]
    assert set(grouped["per_language"]) == {"de", "en"}
    assert grouped["per_language"]["en"]["bits"] == pytest.approx(alone["bits"], rel=1e-5)
    assert grouped["per_language"]["en"]["bytes"] == alone["bytes"] == len("The cat sat on the mat.A dog ran off.")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "no language"}))
    assert cli.main(["eval", "--checkpoint", str(trained), "--data", str(tmp_path / "bad.jsonl"),
                     "--group-field", "lang"]) == 2


def test_generate_continues_the_prompt_deterministically(trained, capsysbinary):
    args = ["generate", "--checkpoint", str(trained), "--prompt", "The ", "--max-bytes", "12", "--seed", "3"]
    assert cli.main(args) == 0
    first = capsysbinary.readouterr().out
    assert cli.main(args) == 0
    assert capsysbinary.readouterr().out == first
    assert first.startswith(b"The ") and len(first) == len(b"The ") + 12 + 1
    # Several prompts are one batch; the first row is what the single prompt gave.
    assert cli.main(args + ["--prompt", "A dog"]) == 0
    both = capsysbinary.readouterr().out
    assert both.startswith(first[:-1] + b"\n\nA dog") and len(both) == len(first) + 2 + len(b"A dog") + 12


def test_init_from_loads_weights_only(trained, tmp_path):
    config = micro_config(run_dir=tmp_path / "continued", init_from=trained, **{"train.steps": 1,
                                                                                "train.learning_rate": 0.0})
    train(config)
    _, _, _, source = run.load_params(str(trained))
    _, _, _, continued = run.load_params(str(tmp_path / "continued"))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, continued), jax.tree.map(np.asarray, source))
    assert latest_step(tmp_path / "continued") == 1


def test_bad_input_gets_one_line_and_exit_code_2(trained, tmp_path, capsys):
    cases = [
        (["eval", "--checkpoint", str(trained), "--data", str(tmp_path / "missing.txt")], "no such file"),
        (["eval", "--checkpoint", str(tmp_path), "--data", "x"], "not a hiermodel run"),
        (["train", str(MICRO), "data.train=" + str(tmp_path / "nothing*")], "matches no files"),
        (["train", str(MICRO), "train.batch_size=3"], "train.batch_size=3"),
        (["generate", "--checkpoint", str(trained), "--prompt", "x", "--top-p", "0"], "--top-p"),
        (["eval", "--checkpoint", str(trained), "--data", "x", "--perturb", "typo:0.1"], "expected KIND:RATE"),
        (["eval", "--checkpoint", str(trained), "--data", "x", "--perturb", "drop:2"], "between 0 and 1"),
    ]
    for name, change, message in [("kind", {"kind": "nope"}, "model.kind='nope'"),
                                  ("other", {"kind": "byte"}, "does not hold this model's parameters"),
                                  ("shape", {"backbone_dim": 96}, "does not hold this model's parameters")]:
        wrong = tmp_path / name
        shutil.copytree(trained, wrong)
        step = latest_step(wrong)
        meta = checkpoint_dir(wrong) / str(step) / "config" / "metadata"
        saved = json.loads(meta.read_text())
        meta.write_text(json.dumps({**saved, "model": {**saved["model"], **change}}))
        cases.append((["eval", "--checkpoint", str(wrong), "--data", "x"], message))
    for args, message in cases:
        assert cli.main(args) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (args, err)
