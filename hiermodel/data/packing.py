"""Packing documents into fixed-shape rows of tokens and words.

A row holds `row_tokens` token positions (bytes, or subword ids) and at most `row_words` words. Each piece of a
document placed in a row is a segment: attention never crosses segments, and no word is
cut between rows. Arrays of a row:
  tokens_T        token ids (bytes, or BOS_ID)           0 where padding
  token_bytes_T   raw bytes the token covers (BOS: 0)     0 where padding
  segments_T      segment id, 1-based                     0 where padding
  words_T         index of the token's word in the row    row_words where padding
  word_segments_W segment id of each word                 0 where padding
  loss_mask_T     1 where the token at t+1 is a scored target of position t
  tags_T          caller's tag of the segment (eval: the file number), -1 where padding
"""

from typing import Iterable, Iterator

import numpy as np

from hiermodel.data.documents import Document


class RowBuilder:
    """Fills one row at a time with segments of whole words."""

    def __init__(self, row_tokens: int, row_words: int):
        self.row_tokens, self.row_words = row_tokens, row_words
        self._reset()

    def _reset(self):
        self.used_bytes = self.used_words = self.num_segments = 0
        self.arrays = {
            "tokens": np.zeros(self.row_tokens, np.int32),
            "token_bytes": np.zeros(self.row_tokens, np.int32),
            "segments": np.zeros(self.row_tokens, np.int32),
            "words": np.full(self.row_tokens, self.row_words, np.int32),
            "word_segments": np.zeros(self.row_words, np.int32),
            "loss_mask": np.zeros(self.row_tokens, np.float32),
            "tags": np.full(self.row_tokens, -1, np.int32),
        }

    def words_that_fit(self, word_lengths: np.ndarray) -> int:
        """How many leading words of `word_lengths` fit in what is left of the row."""
        room = min(len(word_lengths), self.row_words - self.used_words)
        ends = np.cumsum(word_lengths[:room])
        return int(np.searchsorted(ends, self.row_tokens - self.used_bytes, side="right"))

    def add(self, piece: Document, context_words: int = 0, tag: int = 0):
        """Append one segment; the first `context_words` words are context, not scored."""
        tokens, word_lengths = piece.tokens, piece.word_lengths
        n, w = len(tokens), len(word_lengths)
        b0, w0 = self.used_bytes, self.used_words
        assert n == int(word_lengths.sum()) and b0 + n <= self.row_tokens and w0 + w <= self.row_words
        self.num_segments += 1
        a = self.arrays
        word_index = np.repeat(np.arange(w, dtype=np.int32), word_lengths)
        a["tokens"][b0:b0 + n] = tokens
        a["token_bytes"][b0:b0 + n] = piece.token_bytes
        a["segments"][b0:b0 + n] = self.num_segments
        a["words"][b0:b0 + n] = w0 + word_index
        a["word_segments"][w0:w0 + w] = self.num_segments
        a["loss_mask"][b0:b0 + n - 1] = word_index[1:] >= context_words
        a["tags"][b0:b0 + n] = tag
        self.used_bytes += n
        self.used_words += w

    def finish(self) -> dict[str, np.ndarray]:
        row = self.arrays
        self._reset()
        return row

    @property
    def empty(self) -> bool:
        return self.used_bytes == 0


def chunk_for_scoring(parts: Iterable[Document], row_tokens: int, row_words: int) -> Iterator[tuple[Document, int]]:
    """Cut a document, given as consecutive parts, into row-sized segments; each later one repeats
    preceding words as context.

    Every token after BOS is a scored target of exactly one segment, and each segment after
    the first sees up to half a row of the words before it. Parts are joined as they are needed,
    so a long document is never held whole.
    """
    parts = iter(parts)
    document = next(parts, None)
    if document is None:
        return
    first, more = 0, True
    builder = RowBuilder(row_tokens, row_words)
    while True:
        starts = document.word_starts
        while more and (document.num_words - first <= row_words or starts[-1] - starts[first] <= row_tokens):
            part = next(parts, None)
            if part is None:
                more = False
                break
            keep = max(first - row_words // 2 - 1, 0)  # the words a context may still repeat
            document = Document.join([document.words(keep, document.num_words), part])
            first -= keep
            starts = document.word_starts
        if first >= document.num_words:
            return
        context = 0
        if first > 0:  # the longest run of preceding words within half a row
            while (context < first and context < row_words // 2
                   and starts[first] - starts[first - context - 1] <= row_tokens // 2):
                context += 1
        lo = first - context
        taken = builder.words_that_fit(document.word_lengths[lo:])
        assert taken > context, "a row must hold more than its context"
        yield document.words(lo, lo + taken), context
        first = lo + taken
