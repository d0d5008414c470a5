"""A pretrained model's own byte-level BPE (a Hugging Face tokenizer.json), with exact byte accounting.

Bits per byte need the raw bytes of every token, so only tokenizers whose tokens are byte
strings qualify: byte-level BPE (GPT-2's byte-to-character map), as Llama 3, Qwen2 and Mistral
Nemo use. A document is encoded whole, as the model saw text in pretraining; bytes that are not
valid UTF-8 become their single-byte tokens. Each token is a word of its own for packing.
"""

import json

import numpy as np
import tokenizers

from hiermodel.errors import UserError
from hiermodel.text.subword import BOS_TOKEN, Subword, TokenizerFile, read


def _byte_characters() -> dict[str, int]:
    """GPT-2's map of each byte to a printable character, inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def _uses_byte_level(part: dict | None) -> bool:
    if not part:
        return False
    if part.get("type") == "ByteLevel":
        return True
    return any(_uses_byte_level(p) for p in part.get("decoders", part.get("processors", part.get("pretokenizers", []))))


def _bos_of(post_processor: dict | None) -> str | None:
    """The special token the post-processor puts before a single sequence, if any."""
    if not post_processor:
        return None
    if post_processor.get("type") == "Sequence":
        return next(filter(None, map(_bos_of, post_processor["processors"])), None)
    if post_processor.get("type") == "TemplateProcessing":
        first = post_processor["single"][0]
        return first["SpecialToken"]["id"] if "SpecialToken" in first else None
    return None


class PretrainedTokenizer(TokenizerFile):
    """Ids to bytes and documents to ids; BOS is the token its post-processor adds."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, origin: str):
        spec = json.loads(tokenizer.to_str())
        if not _uses_byte_level(spec.get("decoder")):
            kind = (spec.get("decoder") or {}).get("type", "none")
            raise UserError(f"{origin}: its decoder ({kind}) is not byte-level BPE, so a token's bytes are not known "
                            "exactly (bits per byte need them); byte-level tokenizers such as Llama 3's are supported")
        if spec.get("normalizer"):
            raise UserError(f"{origin}: it normalizes text ({spec['normalizer'].get('type')}), so its tokens do not "
                            "spell the document's bytes")
        bos = _bos_of(spec.get("post_processor"))
        if bos is None:
            raise UserError(f"{origin}: it adds no beginning-of-text token (post_processor); hiermodel import "
                            "gives it one")
        self.tokenizer = tokenizer
        self.tokenizer.encode_special_tokens = True  # text that spells a special token is text
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size, self.bos_id = max(vocab.values()) + 1, vocab[bos]
        special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
        chars = _byte_characters()
        self.id_bytes: list[bytes] = [b""] * self.vocab_size
        for piece, index in vocab.items():
            if piece not in special:
                self.id_bytes[index] = (bytes(chars[c] for c in piece) if all(c in chars for c in piece)
                                        else piece.encode())
        self.token_bytes = np.array([len(b) for b in self.id_bytes], np.int32)
        self.byte_ids = np.array([vocab[c] for c in sorted(chars, key=chars.get)], np.int32)
        self.origin = origin

    def pad_vocab(self, size: int) -> None:
        """Ids up to `size` (a model's embedding rows past the tokenizer's ids), spelling nothing."""
        self.id_bytes += [b""] * (size - self.vocab_size)
        self.token_bytes = np.array([len(b) for b in self.id_bytes], np.int32)
        self.vocab_size = size

    def encode_document(self, data: bytes, max_word_bytes: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, tokens per word): the whole text at once, every token a word."""
        ids, start = [], 0
        while start < len(data):
            try:
                text = data[start:].decode()
                end = len(data)
            except UnicodeDecodeError as e:
                text, end = data[start:start + e.start].decode(), start + e.end
            ids.append(np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, np.int32))
            ids.append(self.byte_ids[np.frombuffer(data[start + len(text.encode()):end], np.uint8)])
            start = end
        tokens = np.concatenate(ids) if ids else np.zeros(0, np.int32)
        if int(self.token_bytes[tokens].sum()) != len(data):
            raise UserError(f"{self.origin}: its tokens spell {int(self.token_bytes[tokens].sum())} bytes of a "
                            f"{len(data)}-byte document; it cannot be scored in bits per byte")
        return tokens, np.ones(len(tokens), np.int32)


def load(path) -> Subword | PretrainedTokenizer:
    """A tokenizer file: hiermodel's own BPE (BOS at id 0) or a pretrained model's."""
    tokenizer = read(path)
    if tokenizer.get_vocab().get(BOS_TOKEN) == 0:
        return Subword(tokenizer, str(path))
    return PretrainedTokenizer(tokenizer, str(path))
