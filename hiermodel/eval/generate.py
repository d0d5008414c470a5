"""Sampling text from a trained model, one token at a time.

`generate` re-runs the model on the latest row of context for each token (any kind; the row is
rebuilt from whole words of the text so far, so words and subword ids come out exactly as in
training). `generate_cached` runs the context once and then one position per token against
key/value caches (the kinds with an `extend` method: byte and subword); `generate_hat_cached`
does the same for HAT, stage by stage.
"""

import dataclasses

import jax
import numpy as np
from flax import nnx

from hiermodel.config import DataConfig
from hiermodel.data.packing import RowBuilder
from hiermodel.train.step import cast


_COMPILED: dict = {}


def _compiled(graphdef, compute_dtype: str, method: str, *constants):
    """jit of `model.method(*args, *constants)` for (params, *args); kept per model object, so
    that generating again with the same model compiles nothing (graph definitions hold their
    config, which does not hash)."""
    key = (id(graphdef), compute_dtype, method, constants)
    if key not in _COMPILED or _COMPILED[key][0] is not graphdef:
        def call(params, *args):
            return getattr(nnx.merge(graphdef, cast(params, compute_dtype)), method)(*args, *constants)

        _COMPILED[key] = (graphdef, jax.jit(call))
    return _COMPILED[key][1]


def context_row(data: bytes, encoder, config: DataConfig) -> tuple[dict, int]:
    """A one-row batch holding the longest tail of whole words of BOS + data; and the last position."""
    document = encoder.document(data)
    builder = RowBuilder(config.row_tokens, config.row_words)
    # Keep the most recent words that fit, dropping from the front.
    keep = builder.words_that_fit(document.word_lengths[::-1])
    tail = document.words(document.num_words - keep, document.num_words)
    builder.add(tail)
    return {k: v[None] for k, v in builder.finish().items()}, len(tail.tokens) - 1


@dataclasses.dataclass
class Sampling:
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # > 0: only the k likeliest tokens
    top_p: float = 1.0  # < 1: only the likeliest tokens holding this much probability
    seed: int = 0


def sample(logits: np.ndarray, allowed: np.ndarray, rng: np.random.Generator, sampling: Sampling) -> int:
    """A token id among the `allowed` ones from next-token logits."""
    logits = np.where(allowed, logits.astype(np.float64), -np.inf)
    if sampling.temperature <= 0:
        return int(np.argmax(logits))
    probs = np.exp((logits - logits.max()) / sampling.temperature)
    order = np.argsort(-probs, kind="stable")
    keep = len(probs)
    if sampling.top_k > 0:
        keep = min(keep, sampling.top_k)
    if sampling.top_p < 1.0:
        cumulative = np.cumsum(probs[order]) / probs.sum()
        keep = min(keep, int(np.searchsorted(cumulative, sampling.top_p)) + 1)
    kept = np.zeros_like(probs)
    kept[order[:keep]] = probs[order[:keep]]
    return int(rng.choice(len(probs), p=kept / kept.sum()))


def _sample_text(next_logits, encoder, prompt: bytes, max_bytes: int, sampling: Sampling, on_bytes) -> bytes:
    """The sampling loop every generator shares: `next_logits(text, last_token)` gives the logits
    after `text` (last_token None for the prompt); `on_bytes(piece)` sees each chosen token."""
    allowed = encoder.token_bytes > 0  # text tokens only, no BOS
    rng = np.random.default_rng(sampling.seed)
    text = bytearray(prompt)
    logits = next_logits(bytes(text), None)
    while True:
        token = sample(logits, allowed[:len(logits)], rng, sampling)
        piece = encoder.id_bytes[token][:max_bytes - (len(text) - len(prompt))]
        text += piece
        if on_bytes is not None:
            on_bytes(piece)
        if len(text) - len(prompt) >= max_bytes:
            return bytes(text[len(prompt):])
        logits = next_logits(bytes(text), token)


def generate(graphdef, params, encoder, prompt: bytes, max_bytes: int, data: DataConfig, compute_dtype: str,
             sampling: Sampling = Sampling(), on_bytes=None) -> bytes:
    """At most `max_bytes` bytes continuing `prompt`, re-running the model on the context for each token."""
    forward = _compiled(graphdef, compute_dtype, "__call__", "hard")  # gated models delete as at inference

    def next_logits(text: bytes, token) -> np.ndarray:
        batch, last = context_row(text, encoder, data)
        return np.asarray(forward(params, batch)[0, last])

    return _sample_text(next_logits, encoder, prompt, max_bytes, sampling, on_bytes)


def generate_cached(graphdef, params, encoder, prompt: bytes, max_bytes: int, data: DataConfig,
                    compute_dtype: str, sampling: Sampling = Sampling(), on_bytes=None) -> bytes:
    """As `generate`, with caches: the same tokens while the text fits one row; when the cache
    is full, it starts again from the latest whole words that fit."""
    length = data.row_tokens
    extend = _compiled(graphdef, compute_dtype, "extend")
    empty = _compiled(graphdef, compute_dtype, "empty_cache", 1, length)
    state = {}

    def next_logits(text: bytes, token) -> np.ndarray:
        if token is None or state["position"] == length:
            # The prefill always covers a whole row (one compilation); slots past the context hold
            # keys no query can see, each overwritten when its position is decoded.
            batch, last = context_row(text, encoder, data)
            logits, state["caches"] = extend(params, batch["tokens"], np.arange(length, dtype=np.int32)[None],
                                              empty(params))
            state["position"] = last + 1
            return np.asarray(logits[0, last])
        position = np.array([[state["position"]]], np.int32)
        logits, state["caches"] = extend(params, np.array([[token]], np.int32), position, state["caches"])
        state["position"] += 1
        return np.asarray(logits[0, 0])

    return _sample_text(next_logits, encoder, prompt, max_bytes, sampling, on_bytes)


class _HatDecoder:
    """HAT's incremental state for one text: encoder, backbone and decoder caches and what each
    was computed from. After new bytes, `advance` works out the text's words exactly as training
    would and recomputes only what changed: new encoder positions, a backbone step per finished
    word, and decoder positions whose word (or its predictive embedding) differs; a multi-byte
    character, first split off as bytes of its own, may rejoin the previous word this way."""

    def __init__(self, graphdef, params, encoder, data: DataConfig, compute_dtype: str):
        self.params, self.encoder, self.data = params, encoder, data
        self._empty = _compiled(graphdef, compute_dtype, "empty_caches", data.row_tokens, data.row_words)
        self._encode = _compiled(graphdef, compute_dtype, "encode")
        self._summarise = _compiled(graphdef, compute_dtype, "summarise")
        self._decode = _compiled(graphdef, compute_dtype, "decode")
        self._first_word = np.asarray(cast(params["first_word"], compute_dtype))

    def restart(self, text: bytes) -> np.ndarray:
        """Start from the latest whole words of `text` that fit a row; logits of the next byte."""
        document = self.encoder.document(text)
        builder = RowBuilder(self.data.row_tokens, self.data.row_words)
        self.dropped = document.num_words - builder.words_that_fit(document.word_lengths[::-1])
        self.caches = self._empty(self.params)
        self.h = None
        self.backbone_lengths = np.zeros(0, np.int32)  # words whose backbone step is in the cache
        self.predictive = None
        self.decoded_words = np.zeros(0, np.int64)  # the word each decoded position read
        return self.advance(text)

    def advance(self, text: bytes) -> np.ndarray | None:
        """Logits of the byte after `text` (which extends the last text by whole tokens), or None
        when the text no longer fits the row."""
        document = self.encoder.document(text)
        tail = document.words(self.dropped, document.num_words)
        tokens, lengths = tail.tokens, tail.word_lengths
        if len(tokens) > self.data.row_tokens or len(lengths) > self.data.row_words:
            return None
        done = 0 if self.h is None else len(self.h)
        if len(tokens) > done:
            positions = np.arange(done, len(tokens))[None]
            h, self.caches = self._encode(self.params, tokens[None, done:], positions, self.caches)
            h = np.asarray(h[0])
            self.h = h if self.h is None else np.concatenate([self.h, h])
        # The backbone summarises every word but the last, which is still growing.
        complete = lengths[:-1]
        same = np.minimum(len(complete), len(self.backbone_lengths))
        changed = np.flatnonzero(complete[:same] != self.backbone_lengths[:same])
        first = int(changed[0]) if len(changed) else int(same)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        if first < len(complete):
            width = self.data.max_word_bytes
            words = np.zeros((len(complete) - first, width, self.h.shape[1]), self.h.dtype)
            for i, w in enumerate(range(first, len(complete))):
                words[i, :lengths[w]] = self.h[starts[w]:starts[w + 1]]
            predictive, self.caches = self._summarise(self.params, words, complete[first:],
                                                      np.arange(first, len(complete))[None], self.caches)
            predictive = np.asarray(predictive[0])
            self.predictive = predictive if first == 0 else np.concatenate([self.predictive[:first], predictive])
        self.backbone_lengths = complete
        # Decoder: from the first position whose word, or that word's predecessor's summary, changed.
        word_of = np.repeat(np.arange(len(lengths)), lengths)
        same = np.minimum(len(word_of), len(self.decoded_words))
        moved = np.flatnonzero(word_of[:same] != self.decoded_words[:same])
        start = min(int(moved[0]) if len(moved) else int(same), int(starts[first + 1]))
        reads = [self._first_word if w == 0 else self.predictive[w - 1] for w in word_of[start:]]
        logits, self.caches = self._decode(self.params, self.h[None, start:], np.stack(reads)[None],
                                           np.arange(start, len(tokens))[None], self.caches)
        self.decoded_words = word_of
        return np.asarray(logits[0, -1])


def generate_hat_cached(graphdef, params, encoder, prompt: bytes, max_bytes: int, data: DataConfig,
                        compute_dtype: str, sampling: Sampling = Sampling(), on_bytes=None) -> bytes:
    """As `generate`, for HAT, with caches (the same bytes while the text fits one row)."""
    state = _HatDecoder(graphdef, params, encoder, data, compute_dtype)

    def next_logits(text: bytes, token) -> np.ndarray:
        logits = None if token is None else state.advance(text)
        return state.restart(text) if logits is None else logits

    return _sample_text(next_logits, encoder, prompt, max_bytes, sampling, on_bytes)
