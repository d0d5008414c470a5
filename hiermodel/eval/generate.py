"""Sampling text from a trained model, one byte at a time, without caches (simple and exact).

Each new byte re-runs the model on the latest row of context; the row is rebuilt from
whole words, so the splitter decides word boundaries exactly as in training.
"""

import jax
import numpy as np
from flax import nnx

from hiermodel.config import DataConfig
from hiermodel.data.packing import RowBuilder, to_document
from hiermodel.train.step import cast


def context_row(data: bytes, config: DataConfig) -> tuple[dict, int]:
    """A one-row batch holding the longest tail of whole words of BOS + data; and the last position."""
    document = to_document(data, config.max_word_bytes)
    builder = RowBuilder(config.row_bytes, config.row_words)
    # Keep the most recent words that fit, dropping from the front.
    keep = builder.words_that_fit(document.word_lengths[::-1])
    tail = document.words(document.num_words - keep, document.num_words)
    builder.add(tail.tokens, tail.word_lengths)
    return {k: v[None] for k, v in builder.finish().items()}, len(tail.tokens) - 1


def sample(logits: np.ndarray, rng: np.random.Generator, temperature: float, top_p: float) -> int:
    """A byte (0-255) from next-token logits; temperature 0 is greedy."""
    logits = logits[:256].astype(np.float64)
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
    return int(rng.choice(256, p=probs))


def generate(graphdef, params, prompt: bytes, max_bytes: int, data: DataConfig, compute_dtype: str,
             temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, on_byte=None) -> bytes:
    """The continuation of `prompt`; `on_byte(byte)` is called as each byte is chosen."""
    forward = jax.jit(lambda p, batch: nnx.merge(graphdef, cast(p, compute_dtype))(batch))
    rng = np.random.default_rng(seed)
    text = bytearray(prompt)
    for _ in range(max_bytes):
        batch, last = context_row(bytes(text), data)
        logits = np.asarray(forward(params, batch)[0, last])
        byte = sample(logits, rng, temperature, top_p)
        text.append(byte)
        if on_byte is not None:
            on_byte(byte)
    return bytes(text[len(prompt):])
