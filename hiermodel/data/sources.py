"""Documents from text files, directories, globs, JSONL, ArrayRecord shards and the built-in corpus."""

import glob as globlib
import json
import os
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
from grain.sources import ArrayRecordDataSource

from hiermodel.config import DataConfig
from hiermodel.data.builtin import builtin_documents
from hiermodel.errors import UserError

ARRAY_RECORD_SUFFIXES = (".arrayrecord", ".array_record")
JSONL_SUFFIXES = (".jsonl",)


def expand(spec: str) -> list[str]:
    """Files named by one spec: a file, a directory (recursive) or a glob; 'builtin:SPLIT' as is."""
    if spec.startswith("builtin:"):
        return [spec]
    if any(ch in spec for ch in "*?["):
        files = sorted(p for p in globlib.glob(spec, recursive=True) if os.path.isfile(p))
        if not files:
            raise UserError(f"{spec}: the pattern matches no files")
        return files
    path = Path(spec)
    if path.is_dir():
        files = sorted(
            str(p) for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise UserError(f"{spec}: the directory holds no files")
        return files
    if not path.exists():
        raise UserError(f"{spec}: no such file or directory")
    return [spec]


def _read_bytes(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror}") from None


def _jsonl_documents(path: str, field: str, group_field: str = "") -> list[bytes] | dict[str, list[bytes]]:
    """The `field` strings of a JSONL file; with `group_field`, grouped by that field's value."""
    documents, groups = [], {}
    for line_number, line in enumerate(_read_bytes(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}:{line_number}: not valid JSON ({e})") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise UserError(f"{path}:{line_number}: no string field {field!r}")
        document = record[field].encode("utf-8", errors="surrogateescape")
        if group_field:
            if not isinstance(record.get(group_field), str):
                raise UserError(f"{path}:{line_number}: no string field {group_field!r} to group by")
            groups.setdefault(record[group_field], []).append(document)
        documents.append(document)
    return {name: groups[name] for name in sorted(groups)} if group_field else documents


def chunk_at_lines(data: bytes, chunk_bytes: int) -> list[bytes]:
    """Consecutive pieces of at most `chunk_bytes`, cut after a newline where one is in reach."""
    pieces, start = [], 0
    while len(data) - start > chunk_bytes:
        cut = data.rfind(b"\n", start, start + chunk_bytes) + 1
        cut = cut if cut > start else start + chunk_bytes
        pieces.append(data[start:cut])
        start = cut
    pieces.append(data[start:])
    return pieces


def _text_documents(path: str, separator: str, chunk_bytes: int) -> list[bytes]:
    data = _read_bytes(path)
    documents = data.split(separator.encode()) if separator else [data]
    if chunk_bytes:
        documents = [piece for document in documents for piece in chunk_at_lines(document, chunk_bytes)]
    return documents


def held_out_mask(documents: list[bytes], fraction: float) -> np.ndarray:
    """Which documents of one file are held out: a stable choice by content (the same text is held
    out wherever it appears), plus the file's lowest-hashed document where that picks none of two
    or more, so that every file, and so every language, is evaluated."""
    hashes = np.array([zlib.crc32(d) % 10000 for d in documents], np.int64)
    mask = hashes < fraction * 10000
    if len(documents) > 1 and not mask.any():
        mask[np.argmin(hashes)] = True
    return mask


class DocumentSource:
    """Random access over documents (bytes) from several files; grain reads it as a data source.

    Text files split at `separator` and then into pieces of at most `chunk_bytes` (0: whole);
    `select`, if given, picks from each text, JSONL or built-in file's list of documents. With
    `group_field`, a JSONL file is one source per value of that field (its path then ends in
    "#FIELD=VALUE"), so scores come out per value, e.g. per language.
    """

    def __init__(self, specs: list[str], separator: str = "", jsonl_field: str = "text", chunk_bytes: int = 0,
                 select: Callable[[list[bytes]], list[bytes]] | None = None, group_field: str = ""):
        if not specs:
            raise UserError("no data given")
        self.paths: list[str] = []
        self._parts: list = []  # per file: a list of bytes, or an ArrayRecord source
        for spec in specs:
            for path in expand(spec):
                if group_field and path.endswith(JSONL_SUFFIXES):
                    # Each value of the field becomes a source of its own: "PATH#FIELD=VALUE".
                    named = {f"{path}#{group_field}={value}": docs
                             for value, docs in _jsonl_documents(path, jsonl_field, group_field).items()}
                else:
                    named = {path: self._open(path, separator, jsonl_field, chunk_bytes)}
                for name, part in named.items():
                    if select is not None:
                        if not isinstance(part, list):
                            raise UserError(f"{path}: data.holdout cannot select from ArrayRecord shards; "
                                            "write the held-out documents to their own shards")
                        part = select(part)
                    self.paths.append(name)
                    self._parts.append(part)
        sizes = [len(part) for part in self._parts]
        self._starts = np.cumsum([0] + sizes)
        if self._starts[-1] == 0:
            raise UserError(f"{', '.join(specs)}: no documents (every file is empty)")

    @staticmethod
    def _open(path: str, separator: str, jsonl_field: str, chunk_bytes: int):
        if path.startswith("builtin:"):
            try:
                return [text for _, text in builtin_documents(path.split(":", 1)[1])]
            except ValueError as e:
                raise UserError(f"{path}: {e}") from None
        if path.endswith(ARRAY_RECORD_SUFFIXES):
            try:
                return ArrayRecordDataSource([path])
            except Exception as e:  # array_record raises bare RuntimeErrors on bad files
                raise UserError(f"{path}: not a readable ArrayRecord file ({e})") from None
        if path.endswith(JSONL_SUFFIXES):
            documents = _jsonl_documents(path, jsonl_field)
        else:
            documents = _text_documents(path, separator, chunk_bytes)
        return [d for d in documents if d]

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(file number, index within the file) of a document."""
        file_number = int(np.searchsorted(self._starts, index, side="right")) - 1
        return file_number, index - int(self._starts[file_number])

    def __getitem__(self, index: int) -> bytes:
        file_number, local = self.locate(int(index))
        return bytes(self._parts[file_number][local])

    def documents_of(self, file_number: int) -> range:
        return range(int(self._starts[file_number]), int(self._starts[file_number + 1]))


def open_split(data: DataConfig, split: str, specs: list[str] | None = None, group_field: str = "") -> DocumentSource:
    """The "train" or "eval" documents of a data config (of `specs` instead of its own if given);
    with data.holdout > 0 the two splits share no document."""
    specs = specs if specs is not None else (data.train if split == "train" else data.eval)
    def this_split(documents: list[bytes]) -> list[bytes]:
        held_out = held_out_mask(documents, data.holdout)
        return [d for d, h in zip(documents, held_out) if h == (split == "eval")]

    return DocumentSource(specs, data.separator, data.jsonl_field, data.chunk_bytes,
                          this_split if data.holdout > 0 else None, group_field)


def open_train(data: DataConfig) -> DocumentSource | list[DocumentSource]:
    """The training documents: one pool, or with data.train_weights one source per data.train
    entry, to be mixed by those byte shares."""
    if not data.train_weights:
        return open_split(data, "train")
    if len(data.train_weights) != len(data.train) or min(data.train_weights) <= 0:
        raise UserError(f"data.train_weights={data.train_weights} needs one positive share per data.train entry "
                        f"({len(data.train)}: {', '.join(data.train)})")
    return [open_split(data, "train", [spec]) for spec in data.train]
