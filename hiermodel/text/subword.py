"""Byte-level BPE for the subword baseline, trained and applied with the `tokenizers` library.

Text is first cut by the same word splitter as HAT, so merges never cross a word boundary;
each byte maps to the character of the same number (U+0000-U+00FF), so any byte string,
valid UTF-8 or not, encodes losslessly and every token covers a whole number of bytes.
"""

from pathlib import Path
from typing import Iterable

import numpy as np
import tokenizers
from tokenizers import decoders, models, trainers

from hiermodel import storage
from hiermodel.errors import UserError
from hiermodel.text.words import split_words

# Outside the byte alphabet, so no text can ever produce it.
BOS_TOKEN = "\u0100"
_CACHE_LIMIT = 1 << 18


def read(path: str | Path) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer.from_str(storage.path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such tokenizer file") from None
    except Exception as e:  # tokenizers raises bare Exceptions for unreadable files
        raise UserError(f"{path}: cannot load a tokenizer ({str(e).splitlines()[0][:200]})") from None


class TokenizerFile:
    """What every BPE offers: `tokenizer`, `id_bytes` (the raw bytes of each id), saving."""

    tokenizer: tokenizers.Tokenizer
    id_bytes: list[bytes]

    def save(self, path: str | Path) -> None:
        storage.write_atomically(str(path), self.tokenizer.to_str().encode())

    def decode(self, ids: Iterable[int]) -> bytes:
        return b"".join(self.id_bytes[i] for i in ids)


class Subword(TokenizerFile):
    """A trained BPE: words of bytes to ids, ids to bytes; id 0 is BOS."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, origin: str = "tokenizer"):
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        if vocab.get(BOS_TOKEN) != 0:
            raise UserError(f"{origin}: not a hiermodel tokenizer (no BOS at id 0); make one with tools/train_tokenizer.py")
        self.vocab_size = len(vocab)
        self.bos_id = 0
        self.id_bytes: list[bytes] = [b""] * self.vocab_size
        for piece, index in vocab.items():
            if index != self.bos_id:
                self.id_bytes[index] = piece.encode("latin-1")
        self.token_bytes = np.array([len(b) for b in self.id_bytes], np.int32)
        self._cache: dict[bytes, np.ndarray] = {}

    @classmethod
    def load(cls, path: str | Path) -> "Subword":
        return cls(read(path), str(path))

    def encode_document(self, data: bytes, max_word_bytes: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, tokens per word) of a document's words."""
        pieces = self.encode_words(split_words(data, max_word_bytes))
        lengths = np.fromiter(map(len, pieces), np.int32, len(pieces))
        return np.concatenate(pieces).astype(np.int32) if pieces else np.zeros(0, np.int32), lengths

    def encode_words(self, words: list[bytes]) -> list[np.ndarray]:
        """The ids of each word; a cache keeps frequent words out of the tokenizer."""
        missing = list({w for w in words if w not in self._cache})
        if missing:
            if len(self._cache) > _CACHE_LIMIT:
                self._cache.clear()
            encodings = self.tokenizer.encode_batch([w.decode("latin-1") for w in missing], add_special_tokens=False)
            for word, encoding in zip(missing, encodings):
                self._cache[word] = np.asarray(encoding.ids, np.int32)
        return [self._cache[w] for w in words]


def train(documents: Iterable[bytes], vocab_size: int, max_word_bytes: int) -> Subword:
    """BPE with `vocab_size` ids (BOS and the 256 bytes included) learned from `documents`."""
    if vocab_size < 258:
        raise UserError(f"vocab_size={vocab_size}: a byte-level BPE needs at least 258 ids (BOS and 256 bytes)")
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS_TOKEN],
                                  initial_alphabet=[chr(i) for i in range(256)], show_progress=False)

    def words():
        for document in documents:
            for word in split_words(document, max_word_bytes):
                yield word.decode("latin-1")

    tokenizer.train_from_iterator(words(), trainer)
    return Subword(tokenizer)

