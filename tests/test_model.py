import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hiermodel.data.documents import ByteEncoding
from hiermodel.data.packing import RowBuilder
from hiermodel.models.layers import dense_attention, local_attention
from hiermodel.models.registry import build
from tests.conftest import micro_config

CFG = micro_config()
T, W = CFG.data.row_tokens, CFG.data.row_words


def row(*documents: bytes, context_words: int = 0):
    builder = RowBuilder(T, W)
    for data in documents:
        doc = ByteEncoding(CFG.data.max_word_bytes).document(data)
        builder.add(doc)
    return {k: v[None] for k, v in builder.finish().items()}


@pytest.fixture(scope="module", params=["hat", "byte", "subword", "hat gated", "byte gated"])
def model(request):
    # Byte ids are valid subword ids too, so the same rows exercise every kind. Gated: soft
    # deletion after the first layer of the gated stack, at its initial (unsaturated) values.
    kind, _, gated = request.param.partition(" ")
    overrides = {"model.kind": kind, "model.vocab_size": 512, "model.gate.layer": 1 if gated else 0}
    return build(micro_config(**overrides).model, nnx.Rngs(0))


@pytest.fixture(scope="module")
def forward(model):
    graphdef, params = nnx.split(model)
    fn = jax.jit(lambda p, b: nnx.merge(graphdef, p)(b))
    return lambda batch: np.asarray(fn(params, {k: jnp.asarray(v) for k, v in batch.items()}))


def test_changing_later_bytes_changes_no_earlier_prediction(forward):
    text = b"The quick brown fox jumps over the lazy dog, again and again."
    base = row(text)
    logits = forward(base)
    rng = np.random.default_rng(0)
    for t in [0, 3, 4, 10, 25, 40, len(text) - 2]:
        # New bytes after t, split afresh: the words after t change too.
        tail = bytes(rng.integers(32, 127, len(text) - t - 1, dtype=np.uint8))
        changed = row(text[:t + 1] + tail) if t + 1 < len(text) else row(text)
        changed_logits = forward(changed)
        # Position p (0 is BOS) predicts token p+1; positions 0..t+1 hold BOS and bytes 0..t.
        np.testing.assert_allclose(changed_logits[0, :t + 2], logits[0, :t + 2], atol=1e-5, rtol=1e-5)
        assert not np.allclose(changed_logits[0, t + 2:len(text) + 1], logits[0, t + 2:len(text) + 1], atol=1e-5)


def test_documents_in_one_row_do_not_see_each_other(forward):
    first, second = b"Alpha beta gamma delta.", b"Zeta eta theta iota kappa."
    alone = forward(row(second))
    packed = forward(row(first, second))
    n = len(second) + 1
    np.testing.assert_allclose(packed[0, len(first) + 1:len(first) + 1 + n], alone[0, :n], atol=1e-5, rtol=1e-5)


def random_attention_inputs(seed: int, b: int = 2, t: int = 300, kv: int = 2, g: int = 2, d: int = 8):
    """Queries [B,T,K,G,D], keys and values [B,T,K,D], and segments: two documents and padding."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(keys[0], (b, t, kv, g, d))
    k = jax.random.normal(keys[1], (b, t, kv, d))
    v = jax.random.normal(keys[2], (b, t, kv, d))
    segments = jnp.concatenate([jnp.full((b, 100), 1), jnp.full((b, 150), 2), jnp.zeros((b, t - 250), int)], 1)
    return q, k, v, segments


@pytest.mark.parametrize("window, block", [(100, 64), (64, 64), (37, 16), (200, 64)])
def test_blocked_sliding_window_attention_equals_dense(window, block):
    q, k, v, segments = random_attention_inputs(window)
    blocked = jax.jit(local_attention, static_argnums=(4, 5))(q, k, v, segments, window, block)
    np.testing.assert_allclose(blocked, jax.jit(dense_attention, static_argnums=4)(q, k, v, segments, window),
                               atol=1e-5)


def test_logits_are_finite_with_padding_and_bf16(model):
    cfg = micro_config(**{"model.compute_dtype": "bfloat16"})
    from hiermodel.train.step import cast
    graphdef, params = nnx.split(model)
    batch = {k: jnp.asarray(v) for k, v in row(b"short").items()}
    logits = jax.jit(lambda p, b: nnx.merge(graphdef, cast(p, cfg.model.compute_dtype))(b))(params, batch)
    assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()
