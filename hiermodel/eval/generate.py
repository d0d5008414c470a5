"""Sampling text from a trained model, one token at a time.

`generate` re-runs the model on the latest row of context for each token (any kind; the row is
rebuilt from whole words of the text so far, so words and subword ids come out exactly as in
training). `generate_cached` runs the context once and then one position per token against
key/value caches (the kinds with an `extend` method: byte and subword).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hiermodel.config import DataConfig
from hiermodel.data.packing import RowBuilder
from hiermodel.train.step import cast


def context_row(data: bytes, encoder, config: DataConfig) -> tuple[dict, int]:
    """A one-row batch holding the longest tail of whole words of BOS + data; and the last position."""
    document = encoder.document(data)
    builder = RowBuilder(config.row_tokens, config.row_words)
    # Keep the most recent words that fit, dropping from the front.
    keep = builder.words_that_fit(document.word_lengths[::-1])
    tail = document.words(document.num_words - keep, document.num_words)
    builder.add(tail)
    return {k: v[None] for k, v in builder.finish().items()}, len(tail.tokens) - 1


def sample(logits: np.ndarray, allowed: np.ndarray, rng: np.random.Generator, temperature: float,
           top_p: float) -> int:
    """A token id among the `allowed` ones from next-token logits; temperature 0 is greedy."""
    logits = np.where(allowed, logits.astype(np.float64), -np.inf)
    if temperature <= 0:
        return int(np.argmax(logits))
    probs = np.exp((logits - logits.max()) / temperature)
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs)
        cumulative = np.cumsum(probs[order])
        cut = int(np.searchsorted(cumulative, top_p)) + 1
        kept = np.zeros_like(probs)
        kept[order[:cut]] = probs[order[:cut]]
        probs = kept / kept.sum()
    return int(rng.choice(len(probs), p=probs))


def generate(graphdef, params, encoder, prompt: bytes, max_bytes: int, data: DataConfig, compute_dtype: str,
             temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, on_bytes=None) -> bytes:
    """At most `max_bytes` bytes continuing `prompt`; `on_bytes(piece)` is called as each token is chosen."""
    forward = jax.jit(lambda p, batch: nnx.merge(graphdef, cast(p, compute_dtype))(batch))
    allowed = encoder.token_bytes > 0  # text tokens only, no BOS
    rng = np.random.default_rng(seed)
    text = bytearray(prompt)
    while len(text) - len(prompt) < max_bytes:
        batch, last = context_row(bytes(text), encoder, data)
        logits = np.asarray(forward(params, batch)[0, last])
        piece = encoder.id_bytes[sample(logits, allowed[:len(logits)], rng, temperature, top_p)]
        piece = piece[:max_bytes - (len(text) - len(prompt))]
        text += piece
        if on_bytes is not None:
            on_bytes(piece)
    return bytes(text[len(prompt):])


def generate_cached(graphdef, params, encoder, prompt: bytes, max_bytes: int, data: DataConfig,
                    compute_dtype: str, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                    on_bytes=None) -> bytes:
    """As `generate`, with caches: the same tokens while the text fits one row; when the cache
    is full, it starts again from the latest whole words that fit."""
    length = data.row_tokens
    model = lambda p: nnx.merge(graphdef, cast(p, compute_dtype))
    # The prefill always covers a whole row (one compilation); slots past the context hold keys
    # no query can see, and each is overwritten when its position is decoded.
    prefill = jax.jit(lambda p, tokens_1xT: model(p).extend(tokens_1xT, jnp.arange(length)[None],
                                                           model(p).empty_cache(1, length)))
    step = jax.jit(lambda p, token_1x1, position_1x1, caches: model(p).extend(token_1x1, position_1x1, caches))
    allowed = encoder.token_bytes > 0
    rng = np.random.default_rng(seed)
    text = bytearray(prompt)

    def start():
        batch, last = context_row(bytes(text), encoder, data)
        logits, caches = prefill(params, batch["tokens"])
        return np.asarray(logits[0, last]), caches, last + 1

    logits, caches, position = start()
    while True:
        token = sample(logits, allowed[:len(logits)], rng, temperature, top_p)
        piece = encoder.id_bytes[token][:max_bytes - (len(text) - len(prompt))]
        text += piece
        if on_bytes is not None:
            on_bytes(piece)
        if len(text) - len(prompt) >= max_bytes:
            return bytes(text[len(prompt):])
        if position == length:
            logits, caches, position = start()
        else:
            out, caches = step(params, np.array([[token]], np.int32), np.array([[position]], np.int32), caches)
            logits, position = np.asarray(out[0, 0]), position + 1
