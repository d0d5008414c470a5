"""Equal-Info windows over a Predictor: batched, exact encoding and decoding with the delay rule.

A window restarts both the coder and the predictor (BOS at position 0, its bytes at 1, 2, ...).
Encoding fills it greedily while the interval still has a codeword of at most W bits, at most
max_context - 1 bytes, up to the end of the segment; then, by the delay rule, the window keeps
only the shortest prefix with that same codeword and the rest starts the next window. The greedy
length depends on the byte after the window, which a decoder never sees; the delay rule's does
not: decoding stops at the first prefix whose codeword is the window's, which is exact.

Rows of a batch each code their own segment (encoding) or window (decoding); every loop
iteration is one predictor.step over all rows plus numpy bookkeeping, so the batch stays full.
Every window's first byte has the same CDF, that of BOS alone: the first step feeds BOS at
position 0 of every row, and from then on a window opens by coding its first byte with that CDF
and feeding it at position 1 (slot 0 still holds BOS), which saves one step per window.
"""

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from hiermodel.compress import coder
from hiermodel.compress.predictor import Predictor
from hiermodel.data.window_records import WindowRecord
from hiermodel.errors import UserError
from hiermodel.text.words import BOS_ID

Progress = Callable[[int], None]  # called with the raw bytes done so far
_PROGRESS_EVERY = 1 << 16  # bytes between progress calls
_HISTORY_START = 64  # initial per-row window buffer; grows on demand


@dataclasses.dataclass(frozen=True)
class DecodedDocument:
    """A document's bytes and what each window decoded to (-1: no byte string, the bytes skip it)."""

    data: bytes
    window_bytes: np.ndarray  # int32, one per window

    @property
    def invalid_windows(self) -> np.ndarray:
        return np.flatnonzero(self.window_bytes < 0)


class UndecodableWindowError(UserError):
    """A window that no byte string encodes to under this predictor (e.g. one M2 generated)."""

    def __init__(self, document: int, window: int, invalid_count: int):
        self.document, self.window, self.invalid_count = document, window, invalid_count
        others = f" (and {invalid_count - 1} more)" if invalid_count > 1 else ""
        super().__init__(f"document {document}, window {window}{others}: no byte string encodes to this "
                         f"window under this M1 (windows decode only with the M1 that made them; generated "
                         f"windows can be invalid)")


@dataclasses.dataclass(frozen=True)
class CompressionSummary:
    window_bits: int
    bytes_in: int
    windows_out: int

    @property
    def bytes_per_window(self) -> float:
        return self.bytes_in / max(self.windows_out, 1)

    @property
    def bits_per_byte(self) -> float:
        return self.window_bits * self.windows_out / max(self.bytes_in, 1)


def summarize(records: Sequence[WindowRecord], window_bits: int) -> CompressionSummary:
    """Bytes in, windows out and the rates derived from them."""
    return CompressionSummary(window_bits, sum(int(r.window_bytes.sum()) for r in records),
                              sum(len(r.windows) for r in records))


def window_capacity(predictor: Predictor) -> int:
    """The most bytes one window can hold: BOS takes the first of max_context positions."""
    capacity = int(predictor.max_context) - 1
    if capacity < 1:
        raise ValueError(f"a predictor needs max_context >= 2 to code a byte, got {predictor.max_context}")
    return capacity


def encode_documents(predictor: Predictor, documents: Sequence[bytes], window_bits: int, batch_size: int = 512,
                     segment_bytes: int | None = None, progress: Progress | None = None) -> list[WindowRecord]:
    """Each document's Equal-Info windows: codewords (< 2**window_bits) and the raw bytes each covers.

    Documents longer than segment_bytes are coded as independent segments (a window never
    crosses a segment end) so that long documents spread over rows; None keeps them whole.
    The result depends on segment_bytes but never on batch_size.
    """
    window_bits = coder.check_window_bits(window_bits)
    data_N = np.frombuffer(b"".join(documents), np.uint8)
    document_starts = np.concatenate([[0], np.cumsum([len(d) for d in documents])]).astype(np.int64)
    segment_starts, segment_ends = _segments(document_starts, segment_bytes)
    encoder = _Encoder(predictor, data_N, window_bits, batch_size, segment_starts, segment_ends, progress)
    starts, codewords, counts = encoder.run()
    return _records_by_document(document_starts, starts, codewords, counts, window_bits)


def decode_documents(predictor: Predictor, codewords: Sequence[np.ndarray], window_bits: int, batch_size: int = 512,
                     progress: Progress | None = None) -> list[DecodedDocument]:
    """Each document's bytes from its window codewords; undecodable windows are reported, not guessed."""
    window_bits = coder.check_window_bits(window_bits)
    codewords_W = np.concatenate([np.asarray(w, np.int64).reshape(-1) for w in codewords] + [np.zeros(0, np.int64)])
    if len(codewords_W) and (codewords_W.min() < 0 or codewords_W.max() >> window_bits):
        raise ValueError(f"window codewords must lie in [0, 2**{window_bits})")
    lengths_W, data_N = _Decoder(predictor, codewords_W, window_bits, batch_size, progress).run()
    window_starts = np.concatenate([[0], np.cumsum([len(w) for w in codewords])]).astype(np.int64)
    byte_ends = np.concatenate([[0], np.cumsum(np.maximum(lengths_W, 0))])[window_starts]
    return [DecodedDocument(data_N[byte_ends[d]:byte_ends[d + 1]].tobytes(),
                            lengths_W[window_starts[d]:window_starts[d + 1]].astype(np.int32))
            for d in range(len(codewords))]


def require_decodable(decoded: Sequence[DecodedDocument]) -> list[bytes]:
    """The documents' bytes, or UndecodableWindowError naming the first undecodable window."""
    invalid = [(d, doc.invalid_windows) for d, doc in enumerate(decoded) if len(doc.invalid_windows)]
    if invalid:
        document, windows = invalid[0]
        raise UndecodableWindowError(document, int(windows[0]), sum(len(w) for _, w in invalid))
    return [doc.data for doc in decoded]


def _segments(document_starts: np.ndarray, segment_bytes: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Segment [start, end) offsets: non-empty documents cut every segment_bytes, longest first."""
    lengths = np.diff(document_starts)
    if segment_bytes is None:
        segment_bytes = max(int(lengths.max(initial=0)), 1)
    if segment_bytes < 1:
        raise ValueError(f"segment_bytes must be at least 1, got {segment_bytes}")
    pieces = -(-lengths // segment_bytes)
    first_piece = np.repeat(np.cumsum(pieces) - pieces, pieces)
    starts = np.repeat(document_starts[:-1], pieces) + segment_bytes * (np.arange(pieces.sum()) - first_piece)
    ends = np.minimum(starts + segment_bytes, np.repeat(document_starts[1:], pieces))
    # Long segments first, so the last iterations are not spent on one long row.
    order = np.argsort(starts - ends, kind="stable")
    return starts[order], ends[order]


def _records_by_document(document_starts, starts, codewords, counts, window_bits) -> list[WindowRecord]:
    order = np.argsort(starts)  # window starts are distinct offsets into the joined documents
    starts, codewords, counts = starts[order], codewords[order], counts[order]
    bounds = np.searchsorted(starts, document_starts)
    return [WindowRecord(window_bits, codewords[a:b].astype(np.uint32), counts[a:b].astype(np.int32))
            for a, b in zip(bounds[:-1], bounds[1:])]


class _ProgressMeter:
    def __init__(self, progress: Progress | None):
        self.progress, self.done, self.reported = progress, 0, 0

    def add(self, count: int, final: bool = False):
        self.done += count
        if self.progress and (final or self.done - self.reported >= _PROGRESS_EVERY):
            self.progress(self.done)
            self.reported = self.done


def _grown(buffer_BxN: np.ndarray, needed: int, limit: int) -> np.ndarray:
    """buffer_BxN with at least `needed` columns (doubling, at most `limit`)."""
    width = buffer_BxN.shape[1]
    if needed <= width:
        return buffer_BxN
    new_width = min(max(2 * width, needed), limit)
    return np.pad(buffer_BxN, ((0, 0), (0, new_width - width)))


def _drive(predictor, feed_B, count_B, busy, advance):
    """Step the predictor until no row is busy. advance(rows, cdf_Rx257) moves the rows one byte
    and updates feed_B and count_B in place; a row at count 0 (its window just opened) moves with
    BOS's CDF, which the first step computed, and the predictor sees it again at position 1."""
    state, cdf_Bx257 = predictor.step(predictor.start(len(feed_B)), feed_B, count_B.astype(np.int32))
    bos_cdf_1x257 = cdf_Bx257[:1]
    while True:
        rows = np.flatnonzero(busy() & (count_B > 0))
        if len(rows):
            advance(rows, cdf_Bx257 if len(rows) == len(cdf_Bx257) else cdf_Bx257[rows])
        # An opened window may close at once (a segment's last byte), so repeat until every busy
        # row has a byte to feed.
        while len(opening := np.flatnonzero(busy() & (count_B == 0))):
            advance(opening, np.repeat(bos_cdf_1x257, len(opening), axis=0))
        if not busy().any():
            return
        state, cdf_Bx257 = predictor.step(state, feed_B, count_B.astype(np.int32))


class _Encoder:
    """Rows each code one segment, a window at a time; cursor == end marks an idle row."""

    def __init__(self, predictor, data_N, window_bits, batch, segment_starts, segment_ends, progress):
        self.predictor, self.data_N, self.window_bits = predictor, data_N, window_bits
        self.capacity = window_capacity(predictor)
        self.queue_starts, self.queue_ends, self.queued = segment_starts, segment_ends, 0
        self.cursor_B = np.zeros(batch, np.int64)  # first byte of the row's current window
        self.end_B = np.zeros(batch, np.int64)
        self.count_B = np.zeros(batch, np.int64)  # bytes taken into the current window
        self.feed_B = np.full(batch, BOS_ID, np.int32)  # the last byte taken, or BOS at a window start
        self.low_B, self.range_B = coder.initial_interval(batch)
        # codeword_history_BxN[r, j]: codeword of the window's first j bytes (column 0 unused)
        self.codeword_history_BxN = np.zeros((batch, min(_HISTORY_START, self.capacity + 1)), np.int64)
        self.closed = []  # (starts, codewords, counts) per iteration that closed windows
        self.meter = _ProgressMeter(progress)

    def run(self):
        self._refill()
        if not self._active().any():
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
        _drive(self.predictor, self.feed_B, self.count_B, self._active, self._code)
        self.meter.add(0, final=True)
        if not self.closed:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
        return tuple(np.concatenate(parts) for parts in zip(*self.closed))

    def _active(self) -> np.ndarray:
        return self.cursor_B < self.end_B

    def _code(self, rows, cdf_Rx257):
        """Rows take their next byte under their CDFs; those that close do, and idle rows get new segments."""
        self._close(rows[self._take_next_byte(rows, cdf_Rx257)])
        self._refill()

    def _take_next_byte(self, rows, cdf_Rx257):
        """Extend the rows' windows by their next byte where the codeword still fits; which close."""
        next_R = self.cursor_B[rows] + self.count_B[rows]
        byte_R = self.data_N[next_R].astype(np.int64)
        low_R, range_R = coder.narrow(self.low_B[rows], self.range_B[rows], cdf_Rx257, byte_R)
        codeword_R = coder.codeword(low_R, range_R, self.window_bits)
        took_R = codeword_R != coder.NO_CODEWORD
        took = rows[took_R]
        self.low_B[took], self.range_B[took] = low_R[took_R], range_R[took_R]
        self.feed_B[took] = byte_R[took_R]
        self.count_B[took] += 1
        self.codeword_history_BxN = _grown(self.codeword_history_BxN, int(self.count_B[rows].max()) + 1,
                                           self.capacity + 1)
        self.codeword_history_BxN[took, self.count_B[took]] = codeword_R[took_R]
        count_R = self.count_B[rows]
        return ~took_R | (count_R == self.capacity) | (self.cursor_B[rows] + count_R == self.end_B[rows])

    def _close(self, rows):
        """Delay rule: the window keeps the shortest prefix whose codeword is its greedy one."""
        if not len(rows):
            return
        counts = self.count_B[rows]
        final = self.codeword_history_BxN[rows, counts]
        # The first match is at or before `counts`, so stale columns past it never win.
        history = self.codeword_history_BxN[rows, 1:int(counts.max()) + 1]
        kept = np.argmax(history == final[:, None], axis=1) + 1
        self.closed.append((self.cursor_B[rows].copy(), final, kept))
        self.cursor_B[rows] += kept
        self.count_B[rows] = 0
        self.feed_B[rows] = BOS_ID
        self.low_B[rows], self.range_B[rows] = coder.initial_interval(len(rows))
        self.meter.add(int(kept.sum()))

    def _refill(self):
        idle = np.flatnonzero(self.cursor_B == self.end_B)[:len(self.queue_starts) - self.queued]
        taken = slice(self.queued, self.queued + len(idle))
        self.cursor_B[idle], self.end_B[idle] = self.queue_starts[taken], self.queue_ends[taken]
        self.queued += len(idle)


class _Decoder:
    """Rows each decode one window; window_B == -1 marks an idle row."""

    def __init__(self, predictor, codewords_W, window_bits, batch, progress):
        self.predictor, self.codewords_W, self.window_bits = predictor, codewords_W, window_bits
        self.capacity = window_capacity(predictor)
        self.queued = 0
        self.window_B = np.full(batch, -1, np.int64)
        self.target_B = np.zeros(batch, np.int64)
        self.count_B = np.zeros(batch, np.int64)
        self.feed_B = np.full(batch, BOS_ID, np.int32)  # the last byte decoded, or BOS at a window start
        self.low_B, self.range_B = coder.initial_interval(batch)
        self.bytes_BxN = np.zeros((batch, min(_HISTORY_START, self.capacity)), np.uint8)
        self.lengths_W = np.zeros(len(codewords_W), np.int64)
        self.decoded = []  # (windows, their bytes joined) per iteration that finished windows
        self.meter = _ProgressMeter(progress)

    def run(self) -> tuple[np.ndarray, np.ndarray]:
        """Bytes per window (-1: undecodable) and the decodable windows' bytes joined in window order."""
        self._refill()
        if not (self.window_B >= 0).any():
            return self.lengths_W, np.zeros(0, np.uint8)
        _drive(self.predictor, self.feed_B, self.count_B, lambda: self.window_B >= 0, self._decode)
        self.meter.add(0, final=True)
        return self.lengths_W, self._joined_in_window_order()

    def _decode(self, rows, cdf_Rx257):
        """Rows decode their next byte; finished windows are recorded and idle rows get new ones."""
        done_R, invalid_R = self._decode_next_byte(rows, cdf_Rx257)
        self._finish(rows[done_R], rows[invalid_R])
        self._refill()

    def _decode_next_byte(self, rows, cdf_Rx257):
        """Each row's next byte; which rows' windows are complete, and which cannot be."""
        point_R = coder.codeword_point(self.target_B[rows], self.window_bits)
        low_R, range_R = self.low_B[rows], self.range_B[rows]
        byte_R = coder.symbol_at(low_R, range_R, cdf_Rx257, point_R)
        low_R, range_R = coder.narrow(low_R, range_R, cdf_Rx257, byte_R)
        self.low_B[rows], self.range_B[rows] = low_R, range_R
        codeword_R = coder.codeword(low_R, range_R, self.window_bits)
        count_R = self.count_B[rows]
        self.bytes_BxN = _grown(self.bytes_BxN, int(count_R.max()) + 1, self.capacity)
        self.bytes_BxN[rows, count_R] = byte_R
        self.feed_B[rows] = byte_R
        count_R += 1
        self.count_B[rows] = count_R
        done_R = codeword_R == self.target_B[rows]
        # Narrower intervals never regain a W-bit codeword, so a miss with none is final.
        lost_R = (codeword_R == coder.NO_CODEWORD) | (count_R == self.capacity)
        return done_R, ~done_R & lost_R

    def _finish(self, done, invalid):
        if len(done):
            counts = self.count_B[done]
            columns = np.arange(int(counts.max()))
            self.decoded.append((self.window_B[done].copy(),
                                 self.bytes_BxN[done, :len(columns)][columns < counts[:, None]]))
            self.lengths_W[self.window_B[done]] = counts
            self.meter.add(int(counts.sum()))
        self.lengths_W[self.window_B[invalid]] = -1
        finished = np.concatenate([done, invalid])
        self.window_B[finished] = -1
        self._reset(finished)

    def _reset(self, rows):
        self.count_B[rows] = 0
        self.feed_B[rows] = BOS_ID
        self.low_B[rows], self.range_B[rows] = coder.initial_interval(len(rows))

    def _refill(self):
        idle = np.flatnonzero(self.window_B < 0)[:len(self.codewords_W) - self.queued]
        windows = np.arange(self.queued, self.queued + len(idle))
        self.window_B[idle], self.target_B[idle] = windows, self.codewords_W[windows]
        self.queued += len(idle)

    def _joined_in_window_order(self) -> np.ndarray:
        if not self.decoded:
            return np.zeros(0, np.uint8)
        windows = np.concatenate([w for w, _ in self.decoded])
        joined = np.concatenate([b for _, b in self.decoded])
        lengths = self.lengths_W[windows]
        source_start_W = np.zeros(len(self.lengths_W), np.int64)
        source_start_W[windows] = np.cumsum(lengths) - lengths
        ordered = np.sort(windows)
        ordered_lengths = self.lengths_W[ordered]
        shift = np.repeat(source_start_W[ordered] - (np.cumsum(ordered_lengths) - ordered_lengths), ordered_lengths)
        return joined[np.arange(len(joined)) + shift]
