"""gs:// end to end against a GCS emulator on localhost: data, checkpoints, metrics, TensorBoard,
tokenizer and compressed shards in a bucket; a run killed and resumed from the bucket trains as an
uninterrupted local run; bad URLs are one-line errors."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import MICRO, REPO, run_cli, xla_flags

sys.path.insert(0, str(REPO / "tests"))
import gcs_emulator  # noqa: E402

# Found, not imported: gcsfs reads its settings from the environment when first imported, and the
# emulator's must be in place by then.
pytestmark = [pytest.mark.skipif(
    not (importlib.util.find_spec("gcsfs") and importlib.util.find_spec("gcp_storage_emulator")),
    reason="needs gcsfs (a dependency) and gcp-storage-emulator (the test extra)")]
BUCKET = "gs://bkt"


@pytest.fixture(scope="module")
def emulator():
    """The emulator's client environment, set in this process too (before gcsfs is imported)."""
    port = gcs_emulator.free_port()
    url = f"http://127.0.0.1:{port}"
    environment = gcs_emulator.client_environment(url)
    server = subprocess.Popen([sys.executable, str(REPO / "tests" / "gcs_emulator.py"), str(port), "bkt"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = {k: os.environ.get(k) for k in environment}
    os.environ.update(environment)
    import fsspec

    fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"
    try:
        gcs_emulator.wait_until_up(url)
        yield environment
    finally:
        server.terminate()
        server.wait(10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def documents():
    from hiermodel.data.builtin import builtin_documents

    texts = [text for _, text in builtin_documents("train")]
    return {"books/a.txt": b"\n".join(texts[:30]), "books/b.txt": b"\n".join(texts[30:60]),
            "pages.jsonl": "".join(json.dumps({"text": t.decode("utf-8", "replace")}) + "\n"
                                   for t in texts[60:120]).encode(),
            "held_out.txt": b"\n".join(text for _, text in builtin_documents("eval")[:6])}


def put(files: dict, root) -> None:
    from hiermodel import storage

    for name, data in files.items():
        if not storage.is_url(str(root)):
            os.makedirs(os.path.dirname(f"{root}/{name}"), exist_ok=True)
        storage.write_atomically(f"{root}/{name}", data)


def train_args(root, run_dir, steps):
    return ["train", MICRO, f"run_dir={run_dir}", f"data.train={root}/books/*.txt,{root}/pages.jsonl",
            f"data.eval={root}/held_out.txt", f"train.steps={steps}", "train.checkpoint_every=2",
            "train.log_every=1", "train.eval_every=1000", "train.eval_rows=4", "data.read_bytes=4096"]


def losses(run_dir):
    from hiermodel.train.metrics import read_metrics

    return [m["loss"] for _, m in sorted(read_metrics(str(run_dir)).items())]


@pytest.mark.slow
def test_a_run_in_a_bucket_is_killed_resumed_and_evaluated_like_a_local_one(emulator, tmp_path):
    from hiermodel import storage

    files = documents()
    put(files, BUCKET + "/data")
    put(files, tmp_path / "data")
    steps, run = 8, f"{BUCKET}/runs/a"
    local = run_cli(*train_args(tmp_path / "data", tmp_path / "local", steps), env=emulator)
    assert local.returncode == 0, local.stderr

    process = subprocess.Popen([sys.executable, "-m", "hiermodel.cli", *map(str, train_args(f"{BUCKET}/data", run,
                                                                                            steps))],
                               cwd=REPO, env={**os.environ, "XLA_FLAGS": xla_flags(1)},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not storage.path(f"{run}/checkpoints/4/commit_success.txt").exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not os.path.exists("gs:") and not os.path.exists(REPO / "gs:")  # never a local "gs:" directory
    resumed = run_cli(*train_args(f"{BUCKET}/data", run, steps), env=emulator)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {run} from step" in resumed.stdout
    np.testing.assert_allclose(losses(run), losses(tmp_path / "local"), rtol=1e-6)
    names = {p.name for p in storage.path(run).iterdir()}
    assert {"checkpoints", "config.yaml", "metrics.jsonl", "tensorboard"} <= names
    assert any(storage.path(f"{run}/tensorboard").iterdir())

    scores = {}
    for where, checkpoint, data in (("bucket", run, f"{BUCKET}/data/held_out.txt"),
                                    ("local", tmp_path / "local", tmp_path / "data" / "held_out.txt")):
        out = f"{BUCKET}/scores/{where}.json"
        result = run_cli("eval", "--checkpoint", checkpoint, "--data", data, "--output-json", out, env=emulator)
        assert result.returncode == 0, result.stderr
        scores[where] = json.loads(storage.path(out).read_text())
    assert scores["bucket"]["bytes"] == len(files["held_out.txt"])
    assert scores["bucket"]["bpb"] == pytest.approx(scores["local"]["bpb"], rel=1e-6)
    continued = run_cli(*train_args(f"{BUCKET}/data", f"{BUCKET}/runs/b", 2), f"init_from={run}", env=emulator)
    assert continued.returncode == 0, continued.stderr
    assert f"initialising weights from {run} step {steps}" in continued.stdout


@pytest.mark.parametrize("spec, message", [
    (f"{BUCKET}/data/no-such.txt", "no such file or directory"),
    ("gs://no-such-bucket/x.txt", "no such file or directory"),
    (f"{BUCKET}/bad/*.jsonl", "not valid JSON"),
])
def test_bad_urls_are_one_line_errors(emulator, tmp_path, spec, message):
    put({"bad/x.jsonl": b'{"text": "fine"}\n{"text": oops\n'}, BUCKET)
    result = run_cli("train", MICRO, f"run_dir={tmp_path / 'run'}", f"data.train={spec}", env=emulator)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_a_subword_tokenizer_and_compressed_shards_live_in_the_bucket(emulator, tmp_path):
    from hiermodel import storage
    from hiermodel.text import subword

    texts = list(documents().values())[:2]
    tokenizer = subword.train(iter(texts), 300, 32)
    tokenizer.save(f"{BUCKET}/tok/bpe.json")
    loaded = subword.Subword.load(f"{BUCKET}/tok/bpe.json")
    assert loaded.vocab_size == 300 and [list(a) for a in loaded.encode_words([b" the", b"cat"])] == \
        [list(a) for a in tokenizer.encode_words([b" the", b"cat"])]

    m1 = f"{BUCKET}/m1"  # its integer twin is saved beside its checkpoints, in the bucket too
    trained = run_cli("train", MICRO, f"run_dir={m1}", "model.kind=byte", "model.byte_window=64", "train.steps=4",
                      env=emulator)
    assert trained.returncode == 0, trained.stderr
    put({"in.txt": texts[0][:3000]}, BUCKET + "/raw")
    shards = f"{BUCKET}/windows"
    compressed = run_cli("compress", f"{BUCKET}/raw/in.txt", "--m1", m1, "--output", shards, env=emulator)
    assert compressed.returncode == 0, compressed.stderr
    assert {p.name for p in storage.path(shards).iterdir()} == {"summary.json", "windows-00000-of-00001.arrayrecord"}
    restored = run_cli("decompress", shards, "--m1", m1, "--output", f"{BUCKET}/restored.txt", env=emulator)
    assert restored.returncode == 0, restored.stderr
    assert storage.path(f"{BUCKET}/restored.txt").read_bytes() == texts[0][:3000]
    assert storage.path(f"{m1}/m1_integer.npz").exists()


def test_an_unreachable_store_is_a_one_line_error_after_retries(emulator, tmp_path):
    closed = {**emulator, "STORAGE_EMULATOR_HOST": "http://127.0.0.1:9"}
    result = run_cli("train", MICRO, f"run_dir={tmp_path / 'run'}", f"data.train={BUCKET}/data/x.txt", env=closed)
    assert result.returncode == 2, result.stderr
    assert "cannot reach it" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
