"""Documents as tokens grouped into words: raw bytes for `hat` and `byte`, BPE ids for `subword`."""

import dataclasses
import functools
import numpy as np

from hiermodel.text.words import BOS_ID, END_ID, VOCAB_SIZE, split_words


@dataclasses.dataclass(frozen=True)
class Document:
    """Token ids, the raw bytes each covers, and the tokens in each word; BOS is its first word."""

    tokens: np.ndarray  # int32
    token_bytes: np.ndarray  # int32
    word_lengths: np.ndarray  # int32

    @property
    def num_words(self) -> int:
        return len(self.word_lengths)

    @classmethod
    def join(cls, parts: list["Document"]) -> "Document":
        """One document of consecutive parts."""
        return cls(*(np.concatenate([getattr(p, name) for p in parts])
                     for name in ("tokens", "token_bytes", "word_lengths")))

    @functools.cached_property
    def word_starts(self) -> np.ndarray:
        """Token offset of each word, and the total length last."""
        return np.concatenate([[0], np.cumsum(self.word_lengths)])

    def words(self, first: int, end: int) -> "Document":
        """Words first..end-1 and their tokens."""
        span = slice(self.word_starts[first], self.word_starts[end])
        return Document(self.tokens[span], self.token_bytes[span], self.word_lengths[first:end])


def _word_lengths(pieces: list, first: bool) -> np.ndarray:
    """Tokens per word, BOS (a word of its own) first when the document starts here."""
    lengths = np.fromiter(map(len, pieces), np.int32, len(pieces))
    return np.concatenate([[1], lengths]).astype(np.int32) if first else lengths


class ByteEncoding:
    """Each byte is a token (the `hat` and `byte` kinds)."""

    vocab_size = VOCAB_SIZE
    bos_id = BOS_ID
    reads_text = True  # documents are text, so characters and words can be counted and perturbed
    id_bytes = [bytes([i]) for i in range(256)] + [b""] * (VOCAB_SIZE - 256)
    token_bytes = np.array([len(b) for b in id_bytes], np.int32)

    def __init__(self, max_word_bytes: int, end_of_text: bool = False):
        self.max_word_bytes = max_word_bytes
        self.end_id = END_ID if end_of_text else None  # None: documents just stop

    def document(self, data: bytes, first: bool = True, last: bool = True) -> Document:
        """BOS if the document starts here, the bytes, and END_ID (a word of its own) if it ends
        here under end_of_text."""
        begin = [BOS_ID] if first else []
        end = [END_ID] if last and self.end_id is not None else []
        tokens = np.concatenate([begin, np.frombuffer(data, np.uint8), end]).astype(np.int32)
        token_bytes = np.ones(len(tokens), np.int32)
        token_bytes[:len(begin)] = 0
        token_bytes[len(tokens) - len(end):] = 0
        word_lengths = _word_lengths(split_words(data, self.max_word_bytes), first)
        return Document(tokens, token_bytes, np.concatenate([word_lengths, np.ones(len(end), np.int32)]))


class SubwordEncoding:
    """Each word is the BPE ids of its bytes (the `subword` kind); with a pretrained model's
    tokenizer each token is a word."""

    reads_text = True
    end_id = None  # the BPE has no end-of-text id

    def __init__(self, tokenizer, max_word_bytes: int):
        self.tokenizer, self.max_word_bytes = tokenizer, max_word_bytes
        self.vocab_size, self.bos_id = tokenizer.vocab_size, tokenizer.bos_id
        self.id_bytes, self.token_bytes = tokenizer.id_bytes, tokenizer.token_bytes

    def document(self, data: bytes, first: bool = True, last: bool = True) -> Document:
        tokens, word_lengths = self.tokenizer.encode_document(data, self.max_word_bytes)
        if first:
            tokens, word_lengths = np.concatenate([[self.bos_id], tokens]), np.concatenate([[1], word_lengths])
        return Document(tokens.astype(np.int32), self.token_bytes[tokens], word_lengths.astype(np.int32))
