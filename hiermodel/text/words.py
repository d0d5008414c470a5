"""Bytes to words with the HAT splitter, lossless for any input bytes."""

import re

from hat_splitter import HATSplitter

BOS_ID = 256  # begins every document; not a byte, so any byte string stays representable
END_ID = 257  # ends every document under data.end_of_text
VOCAB_SIZE = 258  # 256 bytes, BOS, end-of-text

_SPLITTER = HATSplitter()
# Bytes that are not valid UTF-8 decode to lone surrogates under surrogateescape.
_INVALID_RUN = re.compile("([\udc80-\udcff]+)")


def split_words(data: bytes, max_word_bytes: int = 100) -> list[bytes]:
    """Split bytes into HAT words; b"".join(result) == data for every input.

    Valid UTF-8 runs go through the HAT splitter; each byte that is not valid UTF-8
    becomes a word of its own.
    """
    if max_word_bytes < 4:
        raise ValueError(f"max_word_bytes must be at least 4 (one UTF-8 character), got {max_word_bytes}")
    words: list[bytes] = []
    text = data.decode("utf-8", errors="surrogateescape")
    for i, run in enumerate(_INVALID_RUN.split(text)):
        if i % 2:
            words.extend(bytes([b]) for b in run.encode("utf-8", errors="surrogateescape"))
        elif run:
            words.extend(_SPLITTER.split_with_limit(run, max_word_bytes))
    return words
