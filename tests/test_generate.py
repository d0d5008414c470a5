"""Cached generation (key/value caches) against re-running the model on the whole context."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hiermodel.data.documents import ByteEncoding
from hypothesis import given, settings
from hypothesis import strategies as st

from hiermodel.eval.generate import Sampling, _HatCached, _HatRow, context_row, generate, sample
from hiermodel.text.words import split_words
from hiermodel.models.gates import deletion_counts
from hiermodel.models.registry import build
from tests.conftest import MICRO, micro_config


# Gated: hard deletion of about half the positions (untrained gates with bias 0), and a target
# of 0 so the full forward's capacity holds every position (the cache has no capacity).
GATED = {"model.gate.layer": 1, "model.gate.bias": 0.0, "model.gate.target": 0.0}
# ... and the stack's last layer on every position again after the gated one.
LAST_LAYER_FULL = {**GATED, "model.backbone_layers": 3, "model.gate.full_layers": 1}
BYTE_MODELS = {"plain": {}, "gated": GATED, "gated, last layer full": LAST_LAYER_FULL,
               "gated, straight-through keys": {**LAST_LAYER_FULL, "model.gate.straight_through": True},
               # (full_recent 0 differs only in reading no recent key whatever its gate)
               "gated, last layer on kept and recent keys": {**LAST_LAYER_FULL, "model.gate.full_keys": "kept",
                                                             "model.gate.full_recent": 5}}


@pytest.fixture(scope="module", params=list(BYTE_MODELS))
def byte_model(request):
    # byte_window 48: the uncached forward is block-local
    config = micro_config(**{"model.kind": "byte", **BYTE_MODELS[request.param]})
    graphdef, params = nnx.split(build(config.model, nnx.Rngs(0)))
    return config, graphdef, nnx.to_pure_dict(params)


def test_cached_logits_equal_the_full_forward(byte_model):
    config, graphdef, params = byte_model
    # jit'd: run eagerly, each of the model's operations compiles on its own (hundreds of compiles).
    forward = jax.jit(lambda p, batch: nnx.merge(graphdef, p)(batch, deletion="hard", with_stats=True))
    extend = jax.jit(lambda p, tokens, positions, caches: nnx.merge(graphdef, p).extend(tokens, positions, caches))
    tokens_1xT = jax.random.randint(jax.random.PRNGKey(1), (1, 200), 0, 256)
    full, stats = forward(params, {"tokens": tokens_1xT, "segments": jnp.ones_like(tokens_1xT)})
    positions = jnp.arange(200)[None]
    caches = nnx.merge(graphdef, params).empty_cache(1, config.data.row_tokens)
    head, caches = extend(params, tokens_1xT[:, :150], positions[:, :150], caches)
    pieces = [head]
    for t in range(150, 200):  # then one position at a time
        out, caches = extend(params, tokens_1xT[:, t:t + 1], positions[:, t:t + 1], caches)
        pieces.append(out)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=2e-5, rtol=2e-5)
    if config.model.gate.layer:  # the equivalence covers real deletions
        deleted = deletion_counts(stats, config.model.gate.k)
        assert 0.2 < deleted["deleted"] / deleted["positions"] < 0.8


def test_cached_greedy_generation_equals_uncached(byte_model):
    config, graphdef, params = byte_model
    encoder = ByteEncoding(config.data.max_word_bytes)
    args = (graphdef, params, encoder, [b"The cat sat on the "], 60, config.data, "float32")
    greedy = Sampling(temperature=0)
    assert generate(*args, greedy) == generate(*args, greedy, cached=False)
    sampled = generate(*args, Sampling(seed=4))
    assert len(sampled[0]) == 60 and sampled == generate(*args, Sampling(seed=4))


def test_batched_rows_generate_as_they_would_alone(byte_model):
    """Prompts of different lengths in one batch: row r samples what it would alone with seed + r."""
    config, graphdef, params = byte_model
    encoder = ByteEncoding(config.data.max_word_bytes)
    prompts = [b"The cat sat on the ", b"A", "Über den Wolken muss die Freiheit".encode()]
    together = generate(graphdef, params, encoder, prompts, 30, config.data, "float32", Sampling(seed=7))
    alone = [generate(graphdef, params, encoder, [p], 30, config.data, "float32", Sampling(seed=7 + r))[0]
             for r, p in enumerate(prompts)]
    assert together == alone and len(set(together)) == 3


def test_cached_generation_continues_past_a_full_row(byte_model):
    config, graphdef, params = byte_model
    pieces = []
    out = generate(graphdef, params, ByteEncoding(config.data.max_word_bytes), [b"word " * 45, b"x"], 120,
                   config.data, "float32", Sampling(), on_bytes=lambda row, piece: pieces.append((row, piece)))
    assert [len(o) for o in out] == [120, 120]
    assert [b"".join(p for r, p in pieces if r == row) for row in (0, 1)] == out


@pytest.fixture(scope="module", params=["plain", "gated"])
def hat_model(request):
    config = micro_config(**(GATED if request.param == "gated" else {}))
    graphdef, params = nnx.split(build(config.model, nnx.Rngs(0)))
    return config, graphdef, nnx.to_pure_dict(params)


def test_hat_cached_logits_follow_the_full_forward_byte_by_byte(hat_model):
    """Every prefix of multilingual text, multi-byte characters cut in the middle and invalid
    bytes included, in a batch whose rows differ in what each step does: the incremental state
    gives each row the logits of re-running the whole model on its text."""
    config, graphdef, params = hat_model
    encoder = ByteEncoding(config.data.max_word_bytes)
    forward = jax.jit(lambda p, batch: nnx.merge(graphdef, p)(batch, deletion="hard"))
    texts = ["Die Katze saß; 日本語のテキスト, café!".encode(), b"ab 3.5 x\xff\xfe y",
             "an 🙂 and on".encode()]
    rows = _HatCached(graphdef, params, encoder, config.data, "float32")
    current = [t[:3] for t in texts]
    logits = rows.start(current)
    checked = np.ones(len(texts), bool)
    while True:
        for r in np.flatnonzero(checked):
            batch, last = context_row(current[r], encoder, config.data)
            np.testing.assert_allclose(logits[r], np.asarray(forward(params, batch))[0, last], atol=3e-5, rtol=3e-5)
        checked = np.array([len(c) < len(t) for c, t in zip(current, texts)])
        if not checked.any():
            break
        tokens = np.array([t[len(c)] if a else 0 for c, t, a in zip(current, texts, checked)])
        current = [t[:len(c) + a] for c, t, a in zip(current, texts, checked)]
        logits = rows.advance(current, tokens, checked)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", " ", ".", "3", "\n", "ß", "日", "🙂", "\udcff", "\udcc3", "e\u0301",
                                 "'"]), max_size=40))
def test_words_split_byte_by_byte_equal_the_split_of_the_whole_text(pieces):
    data = "".join(pieces).encode("utf-8", errors="surrogateescape")
    row = _HatRow(b"", micro_config().data)
    for i in range(len(data)):
        row.append(data[i:i + 1])
        assert row.words == split_words(data[:i + 1], row.data.max_word_bytes)


def test_hat_cached_generation_equals_uncached(hat_model):
    config, graphdef, params = hat_model
    encoder = ByteEncoding(config.data.max_word_bytes)
    args = (graphdef, params, encoder, ["Ein Hund lief über die ".encode(), b"The "], 16, config.data, "float32")
    assert generate(*args, Sampling(temperature=0)) == generate(*args, Sampling(temperature=0), cached=False)
    # Sampling from an untrained model: invalid bytes and split characters all along.
    assert generate(*args, Sampling(seed=2)) == generate(*args, Sampling(seed=2), cached=False)
    prompts = [b"word " * 50, b"x"]  # 250 of the row's 256 bytes, and one byte
    long = generate(graphdef, params, encoder, prompts, 24, config.data, "float32", Sampling(seed=1))
    # Past a full row the first starts again from its latest words; rows stay independent.
    assert [len(t) for t in long] == [24, 24]
    assert long[1] == generate(graphdef, params, encoder, prompts[1:], 24, config.data, "float32", Sampling(seed=2))[0]


def test_generation_benchmark_times_both_modes(tmp_path):
    from tools import bench_generate

    (tmp_path / "prompt.txt").write_text("It is a truth universally acknowledged,\nthat a single man\n")
    out = tmp_path / "result.json"
    assert bench_generate.main([str(MICRO), "--prompt-file", str(tmp_path / "prompt.txt"), "--bytes", "8",
                                "--repeats", "1", "--batch", "2", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert [(r["kind"], r["mode"], r["bytes"]) for r in results] == [("hat", "cached", 16), ("hat", "uncached", 16)]
    assert all(r["bytes_per_s"] == pytest.approx(16 / r["seconds"]) for r in results)
    assert bench_generate.main([str(MICRO), "--prompt-file", str(tmp_path / "prompt.txt"), "--bytes", "4",
                                "--repeats", "1", "--modes", "cached", "--set", "model.backbone_layers=1",
                                "--json", str(out)]) == 0
    assert json.loads(out.read_text())[0]["params"] < results[0]["params"]


def test_forced_generation_takes_the_given_bytes(hat_model):
    config, graphdef, params = hat_model
    encoder = ByteEncoding(config.data.max_word_bytes)
    forced = ["Straße und Weg".encode(), b" the end of it"]
    assert generate(graphdef, params, encoder, [b"Die ", b"At"], 12, config.data, "float32",
                    forced=forced) == [f[:12] for f in forced]
    with pytest.raises(ValueError, match="bytes for every row"):
        generate(graphdef, params, encoder, [b"Die "], 40, config.data, "float32", forced=forced[:1])


def test_top_k_and_top_p_keep_only_the_likeliest_tokens():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    allowed = np.ones(4, bool)
    draw = lambda sampling: {sample(logits, allowed, np.random.default_rng(i), sampling) for i in range(300)}
    assert draw(Sampling()) == {0, 1, 2, 3}
    assert draw(Sampling(top_k=2)) == {0, 1}
    assert draw(Sampling(top_p=0.75)) == {0, 1}  # 0.5 + 0.3 reaches it
    assert draw(Sampling(top_k=3, top_p=0.9)) == {0, 1, 2}
    assert draw(Sampling(temperature=0)) == {0}
    assert draw(Sampling(top_k=3, top_p=1.0)) == {0, 1, 2}
    assert draw(Sampling()) != draw(Sampling(top_k=1)) == {0}
    allowed[0] = False
    assert draw(Sampling(top_k=1)) == {1}


def test_a_model_trained_with_end_of_text_stops_there(tmp_path):
    from hiermodel import run
    from hiermodel.run import encoding
    from hiermodel.train.loop import train

    (tmp_path / "docs.txt").write_text("|".join(["The end."] * 400))
    run_dir = tmp_path / "run"
    config = micro_config(run_dir=run_dir, **{"data.train": tmp_path / "docs.txt", "data.separator": "|",
                                             "data.end_of_text": True, "mesh.data": 1, "train.steps": 30,
                                             "train.checkpoint_every": 30, "train.log_every": 10})
    train(config, devices=jax.devices()[:1])
    _, _, graphdef, params = run.load_params(str(run_dir))
    args = (graphdef, params, encoding(config), [b"The end", b"The"], 20, config.data, "float32")
    greedy = Sampling(temperature=0)
    assert generate(*args, greedy) == generate(*args, greedy, cached=False) == [b".", b" end."]
