"""Sampling text from a trained model, one token at a time, for a batch of prompts.

Uncached, every step re-runs the model on each row's latest context (any kind; the row is
rebuilt from whole words of the text so far, so words and subword ids come out exactly as in
training). Cached, the context runs once and each step extends key/value caches by the new
positions only: the byte and subword kinds one token per row; HAT one byte through the encoder,
one backbone step for each word the new byte finished, and the decoder positions whose word
(or its predictive embedding) changed. Rows move at their own pace inside one batched call: a
row with less to do than another is padded with positions past the caches' end, which are
computed and never stored.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hiermodel.config import DataConfig
from hiermodel.data.packing import RowBuilder
from hiermodel.text.words import BOS_ID, VOCAB_SIZE, split_words
from hiermodel.train.step import cast

_COMPILED: dict = {}
# Words re-split after each new byte: enough for a 4-byte character whose first bytes stood
# alone as invalid words to rejoin the word before them.
_RESPLIT_WORDS = 6


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


def context_row(data: bytes | bytearray, encoder, config: DataConfig) -> tuple[dict, int]:
    """A one-row batch holding the longest tail of whole words of BOS + data; and the last position."""
    document = encoder.document(bytes(data))
    if encoder.end_id is not None:  # the text goes on: no end-of-text after it
        document = document.words(0, document.num_words - 1)
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
    seed: int = 0  # row r of a batch draws from seed + r


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


def generate(graphdef, params, encoder, prompts: list[bytes], max_bytes: int, data: DataConfig,
             compute_dtype: str, sampling: Sampling = Sampling(), on_bytes=None, cached: bool = True,
             forced: list[bytes] | None = None) -> list[bytes]:
    """At most `max_bytes` bytes continuing each prompt (a row each), fewer where a row samples
    end-of-text (models trained with data.end_of_text); `on_bytes(row, piece)` sees every chosen
    token's bytes as it comes. `forced`: byte-level models take each row's next byte from it
    instead of sampling (the same work per byte, on real text: for timing)."""
    if forced is not None and (encoder.vocab_size != VOCAB_SIZE or min(map(len, forced)) < max_bytes):
        raise ValueError(f"forced generation needs a byte-level model and {max_bytes} bytes for every row")
    if not cached:
        rows = _Uncached(graphdef, params, encoder, data, compute_dtype)
    elif hasattr(nnx.merge(graphdef, params), "empty_state"):
        rows = _HatCached(graphdef, params, encoder, data, compute_dtype)
    else:
        rows = _Cached(graphdef, params, _text_context(encoder, data), data.row_tokens, compute_dtype)
    allowed = encoder.token_bytes > 0  # text tokens, and end-of-text where the model learned it; no BOS
    if encoder.end_id is not None:
        allowed[encoder.end_id] = True
    rngs = [np.random.default_rng(sampling.seed + r) for r in range(len(prompts))]
    texts = [bytearray(p) for p in prompts]
    produced = np.zeros(len(prompts), np.int64)
    ended = np.zeros(len(prompts), bool)
    logits_BxV = rows.start([bytes(p) for p in prompts])
    while True:
        tokens = np.zeros(len(prompts), np.int32)
        for r in np.flatnonzero((produced < max_bytes) & ~ended):
            tokens[r] = (forced[r][produced[r]] if forced is not None
                         else sample(logits_BxV[r], allowed[:logits_BxV.shape[1]], rngs[r], sampling))
            ended[r] = tokens[r] == encoder.end_id
            piece = encoder.id_bytes[tokens[r]][:max_bytes - produced[r]]
            texts[r] += piece
            produced[r] += len(piece)
            if on_bytes is not None and piece:
                on_bytes(int(r), piece)
        active = (produced < max_bytes) & ~ended
        if not active.any():
            return [bytes(t[len(p):]) for t, p in zip(texts, prompts)]
        logits_BxV = rows.advance(texts, tokens, active)


def _bucket(n: int) -> int:
    """The next power of two: each new width of batched work compiles once."""
    return 0 if n == 0 else 1 << (n - 1).bit_length()


def _padded(rows: list[np.ndarray], width: int, fill: int) -> np.ndarray:
    out = np.full((len(rows), width), fill, np.int32)
    for r, row in enumerate(rows):
        out[r, :len(row)] = row
    return out


class _Uncached:
    """Re-runs the model on every row's context for each token."""

    def __init__(self, graphdef, params, encoder, data: DataConfig, compute_dtype: str):
        self.params, self.encoder, self.data = params, encoder, data
        self.forward = _compiled(graphdef, compute_dtype, "__call__", "hard")  # gated models delete as at inference

    def start(self, prompts: list[bytes]) -> np.ndarray:
        return self.advance(prompts, None, np.ones(len(prompts), bool))

    def advance(self, texts: list[bytearray], tokens, active: np.ndarray) -> np.ndarray:
        rows = [context_row(text, self.encoder, self.data) for text in texts]
        batch = {k: np.concatenate([row[k] for row, _ in rows]) for k in rows[0][0]}
        logits_BxTxV = np.asarray(self.forward(self.params, batch))
        return logits_BxTxV[np.arange(len(rows)), [last for _, last in rows]]


class _Incremental:
    """Runs `model.extend(*inputs, state, *constants)` on the device state and returns the
    logits of each row's last position; the state is donated, so it is updated in place. The
    integer inputs travel as one array (one transfer per step, not one per input)."""

    def __init__(self, graphdef, params, compute_dtype: str, *constants):
        self.graphdef, self.params, self.compute_dtype = graphdef, params, compute_dtype
        key = (id(graphdef), compute_dtype, "extend", constants)
        if key not in _COMPILED or _COMPILED[key][0] is not graphdef:
            def call(params, state, packed, shapes):
                pieces = jnp.split(packed, np.cumsum([np.prod(shape) for shape in shapes])[:-1])
                last_B, *inputs = [piece.reshape(shape) for piece, shape in zip(pieces, shapes)]
                model = nnx.merge(graphdef, cast(params, compute_dtype))
                logits_BxSxV, state = model.extend(*inputs, state, *constants)
                return jnp.take_along_axis(logits_BxSxV, last_B[:, None, None], axis=1)[:, 0], state

            _COMPILED[key] = (graphdef, jax.jit(call, donate_argnums=1, static_argnums=3))
        self._extend = _COMPILED[key][1]

    def empty(self, method: str, *sizes: int):
        """A fresh device state from the model's `method(*sizes)`."""
        self.state = _compiled(self.graphdef, self.compute_dtype, method, *sizes)(self.params)

    def run(self, last_B: np.ndarray, *inputs: np.ndarray) -> np.ndarray:
        arrays = (last_B, *inputs)
        packed = np.concatenate([a.reshape(-1) for a in arrays]).astype(np.int32)
        logits_BxV, self.state = self._extend(self.params, self.state, packed, tuple(a.shape for a in arrays))
        return np.asarray(logits_BxV)


class _Cached(_Incremental):
    """Byte, subword and window kinds: one new token per row and step; a row whose cache is full
    starts again from `context(text)`, the tokens of the latest part of its text that fits."""

    def __init__(self, graphdef, params, context, row_tokens: int, compute_dtype: str):
        super().__init__(graphdef, params, compute_dtype)
        self.context, self.row_tokens = context, row_tokens

    def start(self, prompts: list) -> np.ndarray:
        self.empty("empty_cache", len(prompts), self.row_tokens)
        self.lengths = np.zeros(len(prompts), np.int64)
        return self.advance(prompts, None, np.ones(len(prompts), bool))

    def advance(self, texts: list, tokens, active: np.ndarray) -> np.ndarray:
        new, starts = [], []
        for r, text in enumerate(texts):
            if not active[r]:
                new.append(np.zeros(0, np.int32))
            elif tokens is None or self.lengths[r] == self.row_tokens:
                new.append(self.context(text))
                self.lengths[r] = 0
            else:
                new.append(np.array([tokens[r]], np.int32))
            starts.append(self.lengths[r])
        width = min(_bucket(max(len(n) for n in new)), self.row_tokens)
        positions = [start + np.arange(len(n)) for start, n in zip(starts, new)]
        self.lengths += [len(n) for n in new]
        last = np.array([max(len(n) - 1, 0) for n in new], np.int32)
        return self.run(last, _padded(new, width, 0), _padded(positions, width, self.row_tokens))


def _text_context(encoder, data: DataConfig):
    def context(text) -> np.ndarray:
        batch, last = context_row(text, encoder, data)
        return batch["tokens"][0, :last + 1]

    return context


class _HatRow:
    """One row's text as words, and what of it the device state holds: after new bytes, `plan`
    works out the words exactly as training would and lists only the work that changed."""

    def __init__(self, text: bytes, data: DataConfig):
        self.data = data
        self.words = split_words(text, data.max_word_bytes)
        self.restart()

    def restart(self):
        """Keep the latest whole words that fit a row, and forget what the state holds."""
        lengths = np.array([1] + [len(w) for w in self.words], np.int32)
        builder = RowBuilder(self.data.row_tokens, self.data.row_words)
        self.dropped = len(lengths) - builder.words_that_fit(lengths[::-1])  # BOS is word 0
        self.encoded = 0
        self.summarised = np.zeros(0, np.int32)  # lengths of the words the backbone has seen
        self.decoded_words = np.zeros(0, np.int64)  # the word each decoded position read

    def append(self, piece: bytes):
        tail = self.words[-_RESPLIT_WORDS:]
        self.words[len(self.words) - len(tail):] = split_words(b"".join(tail) + piece, self.data.max_word_bytes)

    def plan(self) -> dict:
        """New tokens and their positions; the words to summarise (start, length, position); the
        positions to decode and the word whose summary each reads (-1: the first-word vector)."""
        row = ([b""] + self.words)[self.dropped:]  # b"" stands for BOS
        lengths = np.array([len(w) or 1 for w in row], np.int32)
        if lengths.sum() > self.data.row_tokens or len(lengths) > self.data.row_words:
            self.restart()
            return self.plan()
        tokens = np.frombuffer(b"".join(row), np.uint8).astype(np.int32)
        if self.dropped == 0:
            tokens = np.concatenate([[BOS_ID], tokens]).astype(np.int32)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        # The backbone summarises every word but the last, which is still growing.
        complete = lengths[:-1]
        same = min(len(complete), len(self.summarised))
        changed = np.flatnonzero(complete[:same] != self.summarised[:same])
        first = int(changed[0]) if len(changed) else same
        word_of = np.repeat(np.arange(len(lengths)), lengths)
        same = min(len(word_of), len(self.decoded_words))
        moved = np.flatnonzero(word_of[:same] != self.decoded_words[:same])
        decode_from = min(int(moved[0]) if len(moved) else same, int(starts[first + 1]))
        plan = {"tokens": tokens[self.encoded:], "positions": np.arange(self.encoded, len(tokens)),
                "word_starts": starts[first:len(complete)], "word_lengths": complete[first:],
                "word_positions": np.arange(first, len(complete)),
                "decode": np.arange(decode_from, len(tokens)), "reads": word_of[decode_from:] - 1}
        self.encoded, self.summarised, self.decoded_words = len(tokens), complete, word_of
        return plan


class _HatCached(_Incremental):
    def __init__(self, graphdef, params, encoder, data: DataConfig, compute_dtype: str):
        super().__init__(graphdef, params, compute_dtype, data.max_word_bytes)
        self.data = data

    def start(self, prompts: list[bytes]) -> np.ndarray:
        self.rows = [_HatRow(p, self.data) for p in prompts]
        self.empty("empty_state", len(prompts), self.data.row_tokens, self.data.row_words)
        return self._run([row.plan() for row in self.rows])

    def advance(self, texts: list[bytearray], tokens, active: np.ndarray) -> np.ndarray:
        plans = []
        for row, token, busy in zip(self.rows, tokens, active):
            if busy:
                row.append(bytes([token]))
            plans.append(row.plan() if busy else None)
        return self._run(plans)

    def _run(self, plans: list) -> np.ndarray:
        nothing = np.zeros(0, np.int32)
        get = lambda key: [nothing if p is None else p[key] for p in plans]
        t, w = self.data.row_tokens, self.data.row_words
        width = lambda key, most: min(_bucket(max(len(p[key]) for p in plans if p is not None)), most)
        e, u, s = width("tokens", t), width("word_positions", w), width("decode", t)
        last = np.array([max(len(d) - 1, 0) for d in get("decode")], np.int32)
        return self.run(last, _padded(get("tokens"), e, 0), _padded(get("positions"), e, t),
                        _padded(get("word_starts"), u, 0), _padded(get("word_lengths"), u, 1),
                        _padded(get("word_positions"), u, w), _padded(get("decode"), s, t),
                        _padded(get("reads"), s, 0))


@dataclasses.dataclass(frozen=True)
class WindowSample:
    """What an eiw model (M2) generated for one prompt: the bytes its windows decode to (at most
    max_bytes of them), the windows it sampled, and those that no byte string encodes to under M1
    (they add no bytes)."""

    text: bytes
    codewords: list[int]
    undecodable: list[int]  # indices into codewords


def generate_windows(graphdef, params, encoding, predictor, prompts: list[bytes], max_bytes: int, data: DataConfig,
                     compute_dtype: str, sampling: Sampling = Sampling(), on_bytes=None) -> list[WindowSample]:
    """Continue each prompt with an eiw model: M1 (`predictor`) codes the prompt into windows, M2
    samples window tokens, and M1 decodes each window as soon as its tokens are complete. A row
    stops after max_bytes bytes, or after max_bytes windows if too many are undecodable."""
    from hiermodel.compress import windows
    from hiermodel.data import window_records

    bits, per_window = encoding.window_bits, encoding.window_bits // encoding.token_bits
    records = windows.encode_documents(predictor, prompts, bits, segment_bytes=None)
    histories = [list(encoding.document(window_records.pack(record)).tokens) for record in records]
    # After a full cache, keep the latest whole windows that fill half a row, so restarts are rare.
    keep = max(per_window, data.row_tokens // 2 // per_window * per_window)
    rows = _Cached(graphdef, params, lambda history: np.array(history[-keep - (len(history) - 1) % per_window:],
                                                              np.int32), data.row_tokens, compute_dtype)
    allowed = np.arange(encoding.vocab_size) < encoding.bos_id  # window tokens only
    rngs = [np.random.default_rng(sampling.seed + r) for r in range(len(prompts))]
    texts = [bytearray() for _ in prompts]
    sampled = [[] for _ in prompts]
    undecodable = [[] for _ in prompts]
    logits_BxV = rows.start(histories)
    active = np.ones(len(prompts), bool)
    while active.any():
        tokens = np.zeros(len(prompts), np.int32)
        for r in np.flatnonzero(active):
            tokens[r] = sample(logits_BxV[r], allowed[:logits_BxV.shape[1]], rngs[r], sampling)
            histories[r].append(int(tokens[r]))
        complete = [r for r in np.flatnonzero(active) if (len(histories[r]) - 1) % per_window == 0]
        codewords = [window_records.tokens_to_windows(np.array(histories[r][-per_window:]), bits, encoding.token_bits)
                     for r in complete]
        # Decoded in batches of every row, so that one compiled M1 step serves each call.
        for r, codeword, decoded in zip(complete, codewords,
                                        windows.decode_documents(predictor, codewords, bits, len(prompts))):
            if len(decoded.invalid_windows):
                undecodable[r].append(len(sampled[r]))
            sampled[r].append(int(codeword[0]))
            piece = decoded.data[:max_bytes - len(texts[r])]
            texts[r] += piece
            if on_bytes is not None and piece:
                on_bytes(int(r), piece)
        active = np.array([len(t) < max_bytes and len(n) < max_bytes for t, n in zip(texts, sampled)])
        if active.any():
            logits_BxV = rows.advance(histories, tokens, active)
    return [WindowSample(bytes(t), n, u) for t, n, u in zip(texts, sampled, undecodable)]
