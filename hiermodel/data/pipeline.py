"""The grain input pipeline: documents -> shuffled per-process slice -> words -> packed rows -> batches."""

import dataclasses
from typing import Callable, Iterator

import grain
import numpy as np

from hiermodel.config import DataConfig
from hiermodel.data.documents import Document
from hiermodel.data.packing import RowBuilder, chunk_for_scoring
from hiermodel.data.sources import DocumentSource, Piece
from hiermodel.errors import UserError

ToDocument = Callable[[bytes, bool, bool], Document]  # (bytes, first, last): an encoding's `document`


def check_shapes(config: DataConfig) -> None:
    if config.row_tokens < 2 * (config.max_word_bytes + 1):
        raise UserError(f"data.row_tokens={config.row_tokens} must be at least 2 * (data.max_word_bytes + 1)")
    if config.row_words < 4:
        raise UserError(f"data.row_words={config.row_words} must be at least 4")
    if config.shuffle_rows < 0:
        raise UserError(f"data.shuffle_rows={config.shuffle_rows} must be 0 or more")


@dataclasses.dataclass
class _Read:
    """A piece as read: where it sits (source, unit, index in the unit, whether the unit's last),
    the parent's state before the group of units it came in and its position there, and the piece
    as tokens."""

    source: int
    unit: int
    index: int
    unit_end: bool
    parent_state: dict
    position: int
    piece: Piece
    document: Document

    def followed_by(self, other: "_Read") -> bool:
        """Whether `other` continues this piece's document directly."""
        if not other.piece.joins or other.source != self.source:
            return False
        return (other.unit == self.unit and other.index == self.index + 1
                or other.unit == self.unit + 1 and other.index == 0 and self.unit_end)


class _PackIterator(grain.DatasetIterator):
    """Greedy packing of documents into rows; a document continues in the next row, and across the
    pieces it was read in, so rows do not depend on where a document was cut when read in order.

    A document in progress is held as its unpacked words (`_view`) joined from the pieces read so
    far, at least a row's worth unless it ends sooner. The state is where the first piece not yet
    fully packed was read (the parent's state before its unit, its index) and how many of its words
    are packed: resuming reads one unit and converts at most a few pieces, wherever the run stopped.
    """

    def __init__(self, parent: grain.DatasetIterator, row_tokens: int, row_words: int):
        super().__init__(parent)
        self._builder = RowBuilder(row_tokens, row_words)
        self._need_words, self._need_tokens = row_words + 1, row_tokens + 1
        self._reset()

    def _reset(self):
        self._group, self._group_state, self._next = None, None, 0  # the pieces of the group of units being read
        self._peeked = None  # a piece read ahead that is not part of the document in progress
        self._document: list[_Read] = []  # pieces of the document in progress not yet fully packed
        self._packed = 0  # words of _document[0] packed
        self._view, self._used, self._complete = None, 0, False

    def _read(self) -> _Read | None:
        if self._peeked is not None:
            read, self._peeked = self._peeked, None
            return read
        while self._group is None or self._next >= len(self._group):
            self._group_state = self._parent.get_state()
            try:
                self._group = self._flatten(next(self._parent))
            except StopIteration:
                self._group = None
                return None
            self._next = 0
        source, unit, index, unit_end, piece, document = self._group[self._next]
        self._next += 1
        return _Read(source, unit, index, unit_end, self._group_state, self._next - 1, piece, document)

    @staticmethod
    def _flatten(group: list) -> list[tuple]:
        return [(source, unit, i, i == len(converted) - 1, piece, document)
                for source, unit, converted in group for i, (piece, document) in enumerate(converted)]

    def _fill(self) -> Document | None:
        """The unpacked words of the document in progress (starting one if none is), with at least
        a row's worth of words and tokens unless the document ends sooner; None at the end."""
        if self._view is None:
            read = self._read()
            if read is None:
                return None
            self._document, self._packed = [read], 0
            self._view, self._used, self._complete = read.document, 0, read.piece.last
        view = self._view
        while not self._complete and (view.num_words - self._used < self._need_words
                                      or view.word_starts[-1] - view.word_starts[self._used] < self._need_tokens):
            read = self._read()
            if read is None or not self._document[-1].followed_by(read):
                self._peeked, self._complete = read, True
                break
            self._document.append(read)
            self._complete = read.piece.last
            view = self._view = Document.join([view.words(self._used, view.num_words), read.document])
            self._used = 0
        return view

    def _consume(self, words: int):
        self._used += words
        self._packed += words
        while self._document and self._packed >= self._document[0].document.num_words:
            self._packed -= self._document.pop(0).document.num_words
        if self._complete and self._used == self._view.num_words:
            self._view = None

    def __next__(self) -> dict[str, np.ndarray]:
        builder = self._builder
        while True:
            view = self._fill()
            if view is None:
                if builder.empty:
                    raise StopIteration
                return builder.finish()
            remaining = view.num_words - self._used
            taken = builder.words_that_fit(view.word_lengths[self._used:self._used + self._need_words])
            piece = view.words(self._used, self._used + taken)
            if len(piece.tokens) >= 2:  # a lone token has no target
                builder.add(piece)
                self._consume(taken)
                if taken == remaining:
                    continue
            elif builder.empty:
                self._consume(remaining)  # a one-token remainder: nothing to learn from it
                continue
            return builder.finish()

    def get_state(self) -> dict:
        if self._document:
            head = self._document[0]
            return {"parent": head.parent_state, "piece": head.position, "packed": self._packed}
        if self._peeked is not None:
            return {"parent": self._peeked.parent_state, "piece": self._peeked.position, "packed": 0}
        if self._group is not None and self._next < len(self._group):
            return {"parent": self._group_state, "piece": self._next, "packed": 0}
        return {"parent": self._parent.get_state(), "piece": 0, "packed": 0}

    def set_state(self, state: dict) -> None:
        self._builder.finish()
        self._parent.set_state(state["parent"])
        self._reset()
        self._group_state = state["parent"]
        try:
            self._group = self._flatten(next(self._parent))
        except StopIteration:
            return
        self._next = state["piece"]
        if state["packed"]:
            self._fill()
            self._used = self._packed = state["packed"]


class PackIterDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, row_tokens: int, row_words: int):
        super().__init__(parent)
        self._row_tokens, self._row_words = row_tokens, row_words

    def __iter__(self) -> _PackIterator:
        return _PackIterator(self._parent.__iter__(), self._row_tokens, self._row_words)


def shards_of_process(config: DataConfig, process_index: int, process_count: int) -> tuple[range, int]:
    """(this process's data shards, the number of shards): every shard packs its own slice of the
    documents into its own rows, so the global batch depends on data.shards, not on how many
    processes read them."""
    shards = config.shards or process_count
    if shards % process_count:
        raise UserError(f"data.shards={shards} does not split evenly over {process_count} processes")
    mine = shards // process_count
    return range(process_index * mine, (process_index + 1) * mine), shards


def mixture_weights(shares: list[float], sources: list[DocumentSource]) -> list[float]:
    """Per-unit mixing weights that give each source its share of the *bytes* trained on: a share
    divided by the source's mean unit size (from its files' sizes, so nothing is read)."""
    return [share / max(source.nbytes / len(source), 1.0) for share, source in zip(shares, sources)]


def _converter(to_document: ToDocument, source_number: int):
    def convert(unit: tuple[int, list[Piece]]):
        index, pieces = unit
        return source_number, index, [(p, to_document(p.data, p.first, p.last)) for p in pieces]
    return convert


def train_dataset(config: DataConfig, source: DocumentSource | list[DocumentSource], to_document: ToDocument,
                  seed: int, local_batch: int, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Infinite batches of packed rows for one process (its shards' rows, in shard order);
    reshuffled every epoch. Several sources are mixed by data.train_weights, as byte shares.

    Units are shuffled, so a document longer than a unit is trained on in pieces that each start
    where the previous one stopped, not after it; with data.shuffle=false it is packed whole.
    """
    check_shapes(config)
    sources = source if isinstance(source, list) else [source]
    mine, shards = shards_of_process(config, process_index, process_count)
    if local_batch % len(mine):
        raise UserError(f"{local_batch} rows per process do not split over its {len(mine)} data shards")
    for s in sources:
        if len(s) < shards:
            raise UserError(f"{', '.join(s.paths)}: {len(s)} units of data.read_bytes={config.read_bytes} cannot "
                            f"feed {shards} data shards; lower data.read_bytes or data.shards")
    weights = mixture_weights(config.train_weights, sources) if len(sources) > 1 else None
    units = []
    for i, s in enumerate(sources):
        ds = grain.MapDataset.source(s)
        units.append((ds.shuffle(seed=seed + i) if config.shuffle else ds).map(_converter(to_document, i)))
    # Units are read and converted one at a time in the thread that packs them (which runs a few
    # batches ahead of training), so what is held is a unit, whatever the document size. Reader
    # threads were slower here: splitting words holds the GIL (1 KB documents: 0.94 MB/s with two
    # threads against 1.37 with none; 64 KB: 2.49 against 3.30).
    read = grain.ReadOptions(num_threads=0)

    # Small units travel in groups of about data.read_bytes: grain's cost per element is then paid
    # per group, not per (say) 1 KB file.
    groups = [max(1, config.read_bytes // max(s.nbytes // len(s), 1)) if config.read_bytes else 1 for s in sources]
    if weights is not None:
        weights = [w / g for w, g in zip(weights, groups)]

    def shard(index: int) -> grain.IterDataset:
        streams = [ds[index::shards].batch(g, batch_fn=list).repeat(None) for ds, g in zip(units, groups)]
        mixed = streams[0] if weights is None else grain.MapDataset.mix(streams, weights)
        packed = PackIterDataset(mixed.to_iter_dataset(read), config.row_tokens, config.row_words)
        if config.shuffle and config.shuffle_rows > 1:
            # Seeded by the shard, not the process, so the global batch does not depend on how
            # many processes read the shards.
            packed = grain.experimental.WindowShuffleIterDataset(packed, window_size=config.shuffle_rows,
                                                                 seed=seed + index)
        return packed.batch(local_batch // len(mine), drop_remainder=True)

    if len(mine) == 1:
        batches = shard(mine[0])
    else:
        batches = grain.experimental.ZipIterDataset([shard(i) for i in mine]).map(
            lambda parts: {k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
    return grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=4)


def _documents_in_order(source: DocumentSource, file_number: int, to_document: ToDocument) -> Iterator[Iterator[Document]]:
    """The documents of one file in order, each as the consecutive parts it was read in. A part of
    a document without the part before it (the other side of a holdout) starts with BOS like a
    document, so that its first byte is scored too."""
    pieces = source.pieces(file_number)
    head = next(pieces, None)

    def parts() -> Iterator[Document]:
        nonlocal head
        starts = True
        while True:
            piece, head = head, next(pieces, None)
            yield to_document(piece.data, starts, piece.last)
            starts = False
            if head is None or not head.joins:
                return

    while head is not None:
        document = parts()
        yield document
        for _ in document:  # whatever the caller left unread
            pass


def scoring_batches(config: DataConfig, source: DocumentSource, to_document: ToDocument,
                    batch_size: int, max_rows: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Rows that score every token of every document once, in order, in fixed-size batches.

    Padding rows are all zero (nothing scored). `max_rows` > 0 stops after that many rows.
    """
    check_shapes(config)
    builder = RowBuilder(config.row_tokens, config.row_words)
    rows, emitted = [], 0

    def flush():
        nonlocal rows
        while len(rows) < batch_size:
            rows.append(RowBuilder(config.row_tokens, config.row_words).finish())
        batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        rows = []
        return batch

    for file_number in range(len(source.paths)):
        for parts in _documents_in_order(source, file_number, to_document):
            for piece, context in chunk_for_scoring(parts, config.row_tokens, config.row_words):
                if builder.words_that_fit(piece.word_lengths) < piece.num_words:
                    rows.append(builder.finish())
                    emitted += 1
                    if max_rows and emitted >= max_rows:
                        yield flush()
                        return
                    if len(rows) == batch_size:
                        yield flush()
                builder.add(piece, context, tag=file_number)
    if not builder.empty:
        rows.append(builder.finish())
    if rows:
        yield flush()
