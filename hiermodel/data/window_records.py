"""Compressed documents on disk: one ArrayRecord record per document, its Equal-Info windows.

A record is a small header (magic, format version, window bits W, window count) followed by the
window codewords (uint32) and the raw bytes each window covers (uint16), little-endian. M2 reads
the records as documents (WindowEncoding); decompression reads them back with M1. A shard
directory's summary.json (written by hiermodel compress) names the M1 that coded it.
"""

import dataclasses
import json
import os
import struct
from typing import Sequence

import numpy as np

from hiermodel import storage
from hiermodel.data.documents import Document
from hiermodel.data.sources import expand
from hiermodel.errors import UserError

SUMMARY_FILE = "summary.json"

MAGIC = b"EIW"
VERSION = 1
_HEADER = struct.Struct("<3sBBI")  # magic, version, window bits, windows


@dataclasses.dataclass(frozen=True)
class WindowRecord:
    window_bits: int
    windows: np.ndarray  # uint32 codewords, each < 2**window_bits
    window_bytes: np.ndarray  # raw bytes each window covers


def pack(record: WindowRecord) -> bytes:
    n = len(record.windows)
    if len(record.window_bytes) != n:
        raise ValueError(f"{n} windows but {len(record.window_bytes)} byte counts")
    return (_HEADER.pack(MAGIC, VERSION, record.window_bits, n)
            + record.windows.astype("<u4").tobytes() + record.window_bytes.astype("<u2").tobytes())


def unpack(data: bytes, where: str = "record") -> WindowRecord:
    """The record, or a clear error naming `where` for anything that is not one."""
    if len(data) < _HEADER.size:
        raise UserError(f"{where}: not an Equal-Info-Window record (made by hiermodel compress): too short")
    magic, version, bits, n = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise UserError(f"{where}: not an Equal-Info-Window record (made by hiermodel compress)")
    if version != VERSION:
        raise UserError(f"{where}: window record format {version}; this hiermodel reads format {VERSION}")
    if len(data) != _HEADER.size + 6 * n:
        raise UserError(f"{where}: truncated window record ({len(data)} bytes for {n} windows)")
    windows = np.frombuffer(data, "<u4", n, _HEADER.size).astype(np.uint32)
    window_bytes = np.frombuffer(data, "<u2", n, _HEADER.size + 4 * n).astype(np.int32)
    if n and int(windows.max()) >> bits:
        raise UserError(f"{where}: a window codeword does not fit in {bits} bits")
    return WindowRecord(bits, windows, window_bytes)


def window_tokens(windows: np.ndarray, window_bits: int, token_bits: int) -> np.ndarray:
    """Windows as tokens of token_bits: one each, or window_bits / token_bits each, high bits first."""
    per_window = window_bits // token_bits
    shifts = token_bits * np.arange(per_window - 1, -1, -1, dtype=np.uint64)
    pieces = (windows.astype(np.uint64)[:, None] >> shifts) & ((1 << token_bits) - 1)
    return pieces.reshape(-1).astype(np.int32)


def tokens_to_windows(tokens: np.ndarray, window_bits: int, token_bits: int) -> np.ndarray:
    """The inverse of window_tokens for whole windows (a trailing partial window is dropped)."""
    per_window = window_bits // token_bits
    whole = len(tokens) - len(tokens) % per_window
    pieces = tokens[:whole].astype(np.uint64).reshape(-1, per_window)
    shifts = token_bits * np.arange(per_window - 1, -1, -1, dtype=np.uint64)
    return (pieces << shifts).sum(axis=1).astype(np.uint32)


class WindowEncoding:
    """Documents of the `eiw` kind: a compressed record's windows as tokens after BOS; the first
    token of each window carries its raw bytes, so bits per byte stay bits over raw UTF-8."""

    reads_text = False  # documents are packed window records, not text
    end_id = None

    def __init__(self, window_bits: int, token_bits: int):
        if window_bits % token_bits:
            raise UserError(f"model.window_token_bits={token_bits} does not divide model.window_bits={window_bits}")
        self.window_bits, self.token_bits = window_bits, token_bits
        self.bos_id = 1 << token_bits
        self.vocab_size = self.bos_id + 2  # the window tokens, BOS, one reserved id

    def document(self, data: bytes, first: bool = True, last: bool = True) -> Document:
        """A whole record (window records are read uncut, so always first and last)."""
        record = unpack(data)
        if record.window_bits != self.window_bits:
            raise UserError(f"a window record of {record.window_bits}-bit windows, but model.window_bits="
                            f"{self.window_bits}")
        tokens = window_tokens(record.windows, self.window_bits, self.token_bits)
        per_window = self.window_bits // self.token_bits
        token_bytes = np.zeros(len(tokens), np.int32)
        token_bytes[::per_window] = record.window_bytes
        return Document(np.concatenate([[self.bos_id], tokens]).astype(np.int32),
                        np.concatenate([[0], token_bytes]).astype(np.int32), np.ones(len(tokens) + 1, np.int32))


def read_summary(shard_dir: str) -> dict:
    path = storage.path(shard_dir) / SUMMARY_FILE
    try:
        return json.loads(path.read_text())
    except OSError:
        raise UserError(f"{shard_dir}: not a window shard directory (no {SUMMARY_FILE}; made by hiermodel compress)") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def shard_summaries(specs: Sequence[str]) -> list[dict]:
    """The summaries of the shard directories that hold the files `specs` name (data.train)."""
    directories = sorted({os.path.dirname(path) or "." for spec in specs for path in expand(spec)})
    return [read_summary(directory) | {"directory": directory} for directory in directories]


def m1_flops_per_byte(summaries: list[dict]) -> float:
    """M1's FLOPs per raw byte in compressing these shard directories, weighted by their bytes."""
    missing = [s["directory"] for s in summaries if "m1_flops_per_byte" not in s]
    if missing:
        raise UserError(f"{missing[0]}/{SUMMARY_FILE}: no m1_flops_per_byte (compressed by an older hiermodel); "
                        f"compress it again")
    total = sum(s["bytes_in"] for s in summaries)
    return sum(s["m1_flops_per_byte"] * s["bytes_in"] for s in summaries) / max(total, 1)
