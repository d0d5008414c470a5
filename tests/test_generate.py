"""Cached generation (key/value caches) against re-running the model on the whole context."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hiermodel.data.documents import ByteEncoding
from hiermodel.eval.generate import (Sampling, _HatDecoder, context_row, generate, generate_cached,
                                     generate_hat_cached, sample)
from hiermodel.models.gates import deletion_counts
from hiermodel.models.registry import build
from tests.conftest import MICRO, micro_config


# Gated: hard deletion of about half the positions (untrained gates with bias 0), and a target
# of 0 so the full forward's capacity holds every position (the cache has no capacity).
GATED = {"model.gate.layer": 1, "model.gate.bias": 0.0, "model.gate.target": 0.0}


@pytest.fixture(scope="module", params=["plain", "gated"])
def byte_model(request):
    # byte_window 48: the uncached forward is block-local
    config = micro_config(**{"model.kind": "byte", **(GATED if request.param == "gated" else {})})
    graphdef, params = nnx.split(build(config.model, nnx.Rngs(0)))
    return config, graphdef, nnx.to_pure_dict(params)


def test_cached_logits_equal_the_full_forward(byte_model):
    config, graphdef, params = byte_model
    model = nnx.merge(graphdef, params)
    tokens_1xT = jax.random.randint(jax.random.PRNGKey(1), (1, 200), 0, 256)
    full = model({"tokens": tokens_1xT, "segments": jnp.ones_like(tokens_1xT)}, deletion="hard")
    positions = jnp.arange(200)[None]
    caches = model.empty_cache(1, config.data.row_tokens)
    head, caches = model.extend(tokens_1xT[:, :150], positions[:, :150], caches)
    pieces = [head]
    for t in range(150, 200):  # then one position at a time
        out, caches = model.extend(tokens_1xT[:, t:t + 1], positions[:, t:t + 1], caches)
        pieces.append(out)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=2e-5, rtol=2e-5)
    if config.model.gate.layer:  # the equivalence covers real deletions
        _, stats = model({"tokens": tokens_1xT, "segments": jnp.ones_like(tokens_1xT)}, deletion="hard",
                         with_stats=True)
        deleted = deletion_counts(stats, config.model.gate.k)
        assert 0.2 < deleted["deleted"] / deleted["positions"] < 0.8


def test_cached_greedy_generation_equals_uncached(byte_model):
    config, graphdef, params = byte_model
    encoder = ByteEncoding(config.data.max_word_bytes)
    args = (graphdef, params, encoder, b"The cat sat on the ", 60, config.data, "float32")
    assert generate_cached(*args, Sampling(temperature=0)) == generate(*args, Sampling(temperature=0))
    sampled = generate_cached(*args, Sampling(seed=4))
    assert len(sampled) == 60 and sampled == generate_cached(*args, Sampling(seed=4))


def test_cached_generation_continues_past_a_full_row(byte_model):
    config, graphdef, params = byte_model
    pieces = []
    out = generate_cached(graphdef, params, ByteEncoding(config.data.max_word_bytes), b"word " * 45, 120,
                          config.data, "float32", Sampling(), on_bytes=pieces.append)
    assert len(out) == 120 and b"".join(pieces) == out


@pytest.fixture(scope="module", params=["plain", "gated"])
def hat_model(request):
    config = micro_config(**(GATED if request.param == "gated" else {}))
    graphdef, params = nnx.split(build(config.model, nnx.Rngs(0)))
    return config, graphdef, nnx.to_pure_dict(params)


def test_hat_cached_logits_follow_the_full_forward_byte_by_byte(hat_model):
    """Every prefix of multilingual text, multi-byte characters cut in the middle included: the
    incremental state gives the logits of re-running the whole model on it."""
    config, graphdef, params = hat_model
    encoder = ByteEncoding(config.data.max_word_bytes)
    forward = jax.jit(lambda p, batch: nnx.merge(graphdef, p)(batch, deletion="hard"))
    state = _HatDecoder(graphdef, params, encoder, config.data, "float32")
    text = "Die Katze saß; 日本語のテキスト, café!".encode()
    for end in range(4, len(text) + 1):
        cached = state.restart(text[:end]) if end == 4 else state.advance(text[:end])
        batch, last = context_row(text[:end], encoder, config.data)
        np.testing.assert_allclose(cached, np.asarray(forward(params, batch))[0, last], atol=3e-5, rtol=3e-5)


def test_hat_cached_generation_equals_uncached(hat_model):
    config, graphdef, params = hat_model
    encoder = ByteEncoding(config.data.max_word_bytes)
    # Each new length of cached work compiles once, so the texts are short.
    args = (graphdef, params, encoder, "Ein Hund lief über die ".encode(), 16, config.data, "float32")
    assert generate_hat_cached(*args, Sampling(temperature=0)) == generate(*args, Sampling(temperature=0))
    # Sampling from an untrained model: invalid bytes and split characters all along.
    assert generate_hat_cached(*args, Sampling(seed=2)) == generate(*args, Sampling(seed=2))
    prompt = b"word " * 50  # 250 of the row's 256 bytes
    long = generate_hat_cached(graphdef, params, encoder, prompt, 24, config.data, "float32", Sampling(seed=1))
    assert len(long) == 24  # past a full row: started again from the latest words


def test_generation_benchmark_times_both_modes(tmp_path):
    from tools import bench_generate

    (tmp_path / "prompt.txt").write_text("It is a truth universally acknowledged,\nthat a single man\n")
    out = tmp_path / "result.json"
    assert bench_generate.main([str(MICRO), "--prompt-file", str(tmp_path / "prompt.txt"), "--bytes", "8",
                                "--repeats", "1", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert [(r["kind"], r["mode"], r["bytes"]) for r in results] == [("hat", "cached", 8), ("hat", "uncached", 8)]
    assert all(r["bytes_per_s"] == pytest.approx(8 / r["seconds"]) for r in results)


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
