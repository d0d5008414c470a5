"""Documents from text files, directories, globs, JSONL, ArrayRecord shards and the built-in corpus.

Files are read in units of about `read_bytes`, never whole: a unit of a text file runs from one
line end to another, a unit of a JSONL file holds the lines that start in its byte range, a unit
of an ArrayRecord file is one record. A unit yields pieces: consecutive bytes of one document, at
most about `read_bytes` each, cut after a line end where one is near (where the HAT splitter
always ends a word, so a document's words do not depend on where it was cut). What a process
holds and reads is then bounded by `read_bytes`, whatever the size of a document, and a process
reads only the units it is given.
"""

import dataclasses
import json
import math
import zlib
from typing import Iterator

import numpy as np
from grain.sources import ArrayRecordDataSource

from hiermodel import storage
from hiermodel.config import DataConfig
from hiermodel.data.builtin import builtin_documents
from hiermodel.errors import UserError

ARRAY_RECORD_SUFFIXES = (".arrayrecord", ".array_record")
JSONL_SUFFIXES = (".jsonl",)
LINE_SEARCH = 65536  # how far past a unit's nominal start a line end is looked for


@dataclasses.dataclass(frozen=True)
class Piece:
    """Consecutive bytes of one document. `first`: the document starts here (BOS goes before it);
    `last`: it ends here; `joins`: the bytes right before it in the file are the previous piece of
    the same document, and that piece is in this source."""

    data: bytes
    first: bool = True
    last: bool = True
    joins: bool = False


def expand(spec: str) -> list[str]:
    """Files named by one spec: a file, a directory (recursive) or a glob; 'builtin:SPLIT' as is."""
    if spec.startswith("builtin:"):
        return [spec]
    if any(ch in spec for ch in "*?["):
        files = storage.glob(spec)
        if not files:
            raise UserError(f"{spec}: the pattern matches no files")
        return files
    target = storage.path(spec)
    try:
        exists = target.exists()
        is_dir = exists and target.is_dir()
    except Exception as e:  # object stores raise their own errors for an unreachable bucket
        raise UserError(f"{spec}: cannot reach it ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if is_dir:
        files = storage.list_files(spec)
        if not files:
            raise UserError(f"{spec}: the directory holds no files")
        return files
    if not exists:
        raise UserError(f"{spec}: no such file or directory")
    return [spec]


def chunk_at_lines(data: bytes, chunk_bytes: int) -> list[bytes]:
    """Consecutive pieces of at most `chunk_bytes`, cut after a newline where one is in reach, else
    at a UTF-8 character boundary."""
    pieces, start = [], 0
    while len(data) - start > chunk_bytes:
        cut = data.rfind(b"\n", start, start + chunk_bytes) + 1
        cut = cut if cut > start else _char_start(data, start + chunk_bytes, start + 1)
        pieces.append(data[start:cut])
        start = cut
    pieces.append(data[start:])
    return pieces


def _char_start(data: bytes, at: int, lowest: int) -> int:
    """`at`, moved back (at most 3 bytes, not below `lowest`) to the start of a UTF-8 character."""
    for cut in range(at, max(at - 3, lowest) - 1, -1):
        if cut >= len(data) or data[cut] & 0xC0 != 0x80:
            return cut
    return at


def _document_pieces(document: bytes, read_bytes: int, cut: bool) -> list[Piece]:
    """One document held whole (a JSONL line, a record) as pieces of at most `read_bytes`."""
    parts = chunk_at_lines(document, read_bytes) if cut and read_bytes else [document]
    return [Piece(part, first=i == 0, last=i == len(parts) - 1, joins=i > 0) for i, part in enumerate(parts) if part]


class _TextFile:
    """Units of a text file: consecutive byte ranges cut after a separator or a line end."""

    def __init__(self, path: str, separator: str, chunk_bytes: int, read_bytes: int):
        self.path, self.separator, self.chunk_bytes = path, separator.encode(), chunk_bytes
        self.size = storage.size(path)
        self.unit_bytes = read_bytes or max(self.size, 1)
        # Under half a unit, so that every unit is left with bytes of its own.
        self.search = min(LINE_SEARCH, max(self.unit_bytes // 2, 1))
        self.units = math.ceil(self.size / self.unit_bytes)
        self.nbytes = self.size

    def _cut(self, buffer: bytes, base: int, nominal: int) -> int:
        """Where the unit that nominally starts at `nominal` starts: after the first separator (else
        line end) that ends at or past it within the search distance, else at a character start."""
        at, sep = nominal - base, self.separator
        if sep:
            found = buffer.find(sep, at - len(sep), at + self.search)
            if found >= 0:
                return base + found + len(sep)
        found = buffer.find(b"\n", at - 1, at + self.search)
        if found >= 0:
            return base + found + 1
        return base + _char_start(buffer, at, at - 3)

    def read(self, unit: int) -> list[Piece]:
        lo, hi = unit * self.unit_bytes, min((unit + 1) * self.unit_bytes, self.size)
        base = max(lo - max(4, len(self.separator)), 0)  # room to look back for a separator or a character start
        buffer = storage.read_range(self.path, base, min(hi + self.search, self.size))
        start = 0 if unit == 0 else self._cut(buffer, base, lo)
        end = self.size if hi >= self.size else self._cut(buffer, base, hi)
        text = buffer[start - base:end - base]
        sep = self.separator
        starts_document = start == 0 or bool(sep) and buffer[:start - base].endswith(sep)
        ends_document = end == self.size or bool(sep) and text.endswith(sep)
        parts = text.split(sep) if sep else [text]
        pieces = []
        for i, part in enumerate(parts):
            first, last = starts_document or i > 0, ends_document or i < len(parts) - 1
            if self.chunk_bytes:  # every chunk is a document of its own
                pieces += [Piece(chunk) for chunk in chunk_at_lines(part, self.chunk_bytes) if chunk]
            elif part:
                pieces.append(Piece(part, first, last, joins=not first))
        return pieces


class _JsonlFile:
    """Units of a JSONL file: the lines that start in each byte range; a line is a document."""

    def __init__(self, path: str, field: str, read_bytes: int, cut: bool):
        self.path, self.field, self.cut = path, field, cut
        self.size = storage.size(path)
        self.read_bytes = read_bytes
        self.unit_bytes = read_bytes or max(self.size, 1)
        self.units = math.ceil(self.size / self.unit_bytes)
        self.nbytes = self.size

    def records(self, unit: int) -> Iterator[tuple[int, dict]]:
        """(byte offset, parsed record) of each non-blank line starting in the unit."""
        lo, hi = unit * self.unit_bytes, min((unit + 1) * self.unit_bytes, self.size)
        if lo > 0:  # the first line start at or after lo
            newline = storage.read_range(self.path, lo - 1, hi).find(b"\n")
            if newline < 0 or lo + newline >= hi:
                return
            lo += newline
        try:
            with storage.open_file(self.path) as f:
                f.seek(lo)
                position = lo
                while position < hi:
                    line = f.readline()
                    if not line:
                        break
                    if line.strip():
                        yield position, self._parse(line, position)
                    position += len(line)
        except OSError as e:
            raise UserError(f"{self.path}: cannot read: {e.strerror or e}") from None

    def _parse(self, line: bytes, position: int) -> dict:
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{self.path}: the line at byte {position} is not valid JSON ({e})") from None
        if not isinstance(record, dict) or not isinstance(record.get(self.field), str):
            raise UserError(f"{self.path}: the line at byte {position} has no string field {self.field!r}")
        return record

    def text(self, record: dict, field: str) -> bytes:
        return record[field].encode("utf-8", errors="surrogateescape")

    def read(self, unit: int) -> list[Piece]:
        return [piece for _, record in self.records(unit)
                for piece in _document_pieces(self.text(record, self.field), self.read_bytes, self.cut)]


class _Documents:
    """Units that are whole documents: ArrayRecord records, or documents already in memory."""

    def __init__(self, documents, read_bytes: int, cut: bool, nbytes: int):
        self.documents, self.read_bytes, self.cut = documents, read_bytes, cut
        self.units, self.nbytes = len(documents), nbytes

    def read(self, unit: int) -> list[Piece]:
        return _document_pieces(bytes(self.documents[unit]), self.read_bytes, self.cut)


def _jsonl_groups(path: str, field: str, group_field: str, read_bytes: int, cut: bool) -> dict[str, _Documents]:
    """A JSONL file split by the value of `group_field`, one source each (the file is read whole)."""
    reader = _JsonlFile(path, field, 0, cut)
    groups: dict[str, list[bytes]] = {}
    for position, record in reader.records(0):
        if not isinstance(record.get(group_field), str):
            raise UserError(f"{path}: the line at byte {position} has no string field {group_field!r} to group by")
        groups.setdefault(record[group_field], []).append(reader.text(record, field))
    return {f"{path}#{group_field}={value}": _Documents(docs, read_bytes, cut, sum(map(len, docs)))
            for value, docs in sorted(groups.items())}


def held_out_mask(hashes: np.ndarray, sizes: np.ndarray, fraction: float) -> np.ndarray:
    """Which documents of one file are held out, from a hash of each in 0..9999: a stable choice by
    content (the same text is held out wherever it appears), plus the file's lowest-hashed document
    where that picks none of two or more, so that every file, and so every language, is evaluated.
    That one is at least a quarter of the file's largest: a file cut into units of `chunk_bytes`
    ends each unit in a scrap, which would otherwise be all that is evaluated of it."""
    mask = hashes < fraction * 10000
    if len(hashes) > 1 and not mask.any():
        candidates = np.flatnonzero(4 * sizes >= sizes.max())
        mask[candidates[np.argmin(hashes[candidates])]] = True
    return mask


class DocumentSource:
    """Random access over the units of several files; grain reads it as a data source, an element
    being (unit number, its pieces).

    Text files split at `separator` and then into documents of at most `chunk_bytes` (0: whole).
    With `holdout` > 0 and `split` "train" or "eval", each piece is on one side by a hash of its
    content (a document read in one piece, the usual case, is held out whole); choosing reads every
    file once. `cut=False` keeps records and JSONL documents whole (compressed window records are
    not text). With `group_field`, a JSONL file is one source per value of that field (its path
    then ends in "#FIELD=VALUE"), so scores come out per value, e.g. per language.
    """

    def __init__(self, specs: list[str], separator: str = "", jsonl_field: str = "text", chunk_bytes: int = 0,
                 read_bytes: int = 1 << 18, cut: bool = True, holdout: float = 0.0, split: str = "all",
                 group_field: str = ""):
        if not specs:
            raise UserError("no data given")
        if read_bytes and read_bytes < 64 or chunk_bytes < 0:
            raise UserError(f"data.read_bytes={read_bytes} must be 0 (files whole) or at least 64, and "
                            f"data.chunk_bytes={chunk_bytes} not negative")
        self.paths: list[str] = []
        self._files: list = []
        for spec in specs:
            for path in expand(spec):
                if group_field and path.endswith(JSONL_SUFFIXES):
                    named = _jsonl_groups(path, jsonl_field, group_field, read_bytes, cut)
                else:
                    named = {path: self._open(path, separator, jsonl_field, chunk_bytes, read_bytes, cut)}
                self.paths += list(named)
                self._files += list(named.values())
        self._starts = np.cumsum([0] + [f.units for f in self._files])
        self.split = split if holdout > 0 else "all"
        self._kept = None  # per file: which pieces of each unit are on this side of the holdout
        self.split_size = (0, 0)  # with a holdout: (pieces, bytes) on this side, over every file
        if holdout > 0 and split != "all":
            chosen = [self._choose(f, holdout, split) for f in range(len(self._files))]
            self._kept = [(kept, counts) for kept, counts, _ in chosen]
            self.split_size = (sum(size[0] for *_, size in chosen), sum(size[1] for *_, size in chosen))
        if not any(True for f in range(len(self.paths)) for _ in self.pieces(f)):
            raise UserError(f"{', '.join(specs)}: no documents" + (f" on the {split} side of the holdout"
                                                                   if self._kept else " (every file is empty)"))

    @staticmethod
    def _open(path: str, separator: str, jsonl_field: str, chunk_bytes: int, read_bytes: int, cut: bool):
        if path.startswith("builtin:"):
            try:
                documents = [text for _, text in builtin_documents(path.split(":", 1)[1])]
            except ValueError as e:
                raise UserError(f"{path}: {e}") from None
            return _Documents(documents, read_bytes, cut, sum(map(len, documents)))
        if path.endswith(ARRAY_RECORD_SUFFIXES):
            try:
                records = ArrayRecordDataSource([path])
            except Exception as e:  # array_record raises bare RuntimeErrors on bad files
                raise UserError(f"{path}: not a readable ArrayRecord file ({e})") from None
            return _Documents(records, read_bytes, cut, storage.size(path))
        if path.endswith(JSONL_SUFFIXES):
            reader = _JsonlFile(path, jsonl_field, read_bytes, cut)
            for _ in reader.records(0):  # a file that is not JSONL fails now, not mid-training
                pass
            return reader
        return _TextFile(path, separator, chunk_bytes, read_bytes)

    def _choose(self, file_number: int, fraction: float, split: str) -> tuple[list[set[int]], list[int], tuple[int, int]]:
        """Per unit of one file, the pieces on this side of the holdout; each unit's piece count; and
        the (pieces, bytes) of the file on this side."""
        reader = self._files[file_number]
        counts, hashes, sizes = [], [], []
        for unit in range(reader.units):
            pieces = reader.read(unit)
            counts.append(len(pieces))
            hashes += [zlib.crc32(p.data) % 10000 for p in pieces]
            sizes += [len(p.data) for p in pieces]
        sizes = np.array(sizes, np.int64)
        keep = held_out_mask(np.array(hashes, np.int64), sizes, fraction) == (split == "eval")
        starts = np.cumsum([0] + counts)
        kept = [set(np.flatnonzero(keep[starts[u]:starts[u + 1]]).tolist()) for u in range(reader.units)]
        return kept, counts, (int(keep.sum()), int(sizes[keep].sum()))

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def nbytes(self) -> int:
        """Bytes of the files read (before any holdout), for mixing by share of bytes."""
        return sum(f.nbytes for f in self._files)

    def units_of(self, file_number: int) -> range:
        return range(int(self._starts[file_number]), int(self._starts[file_number + 1]))

    def __getitem__(self, index: int) -> tuple[int, list[Piece]]:
        index = int(index)
        file_number = int(np.searchsorted(self._starts, index, side="right")) - 1
        return index, self._read(file_number, index - int(self._starts[file_number]))

    def _read(self, file_number: int, unit: int) -> list[Piece]:
        pieces = self._files[file_number].read(unit)
        if self._kept is None:
            return pieces
        kept, counts = self._kept[file_number]

        def predecessor_kept(i: int) -> bool:  # else the piece starts a stream of its own
            return i - 1 in kept[unit] if i else unit > 0 and counts[unit - 1] - 1 in kept[unit - 1]

        return [dataclasses.replace(pieces[i], joins=pieces[i].joins and predecessor_kept(i))
                for i in sorted(kept[unit])]

    def pieces(self, file_number: int) -> Iterator[Piece]:
        """The pieces of one file, in order."""
        for unit in range(self._files[file_number].units):
            yield from self._read(file_number, unit)

    def documents(self) -> Iterator[bytes]:
        """Every document whole, in order (pieces joined): for tools that need whole texts."""
        for file_number in range(len(self.paths)):
            parts = []
            for piece in self.pieces(file_number):
                if parts and not piece.joins:
                    yield b"".join(parts)
                    parts = []
                parts.append(piece.data)
                if piece.last:
                    yield b"".join(parts)
                    parts = []
            if parts:
                yield b"".join(parts)


def open_split(data: DataConfig, split: str, specs: list[str] | None = None, group_field: str = "",
               text: bool = True) -> DocumentSource:
    """The "train" or "eval" documents of a data config (of `specs` instead of its own if given);
    with data.holdout > 0 the two splits share no document. `text=False`: records stay whole."""
    specs = specs if specs is not None else (data.train if split == "train" else data.eval)
    return DocumentSource(specs, data.separator, data.jsonl_field, data.chunk_bytes, data.read_bytes, text,
                          data.holdout, split, group_field)


def open_train(data: DataConfig, text: bool = True) -> DocumentSource | list[DocumentSource]:
    """The training documents: one pool, or with data.train_weights one source per data.train
    entry, to be mixed by those byte shares."""
    if not data.train_weights:
        return open_split(data, "train", text=text)
    if len(data.train_weights) != len(data.train) or min(data.train_weights) <= 0:
        raise UserError(f"data.train_weights={data.train_weights} needs one positive share per data.train entry "
                        f"({len(data.train)}: {', '.join(data.train)})")
    return [open_split(data, "train", [spec], text=text) for spec in data.train]
