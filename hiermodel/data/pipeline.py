"""The grain input pipeline: documents -> shuffled per-process slice -> words -> packed rows -> batches."""

from typing import Callable, Iterator

import grain
import numpy as np

from hiermodel.config import DataConfig
from hiermodel.data.documents import Document
from hiermodel.data.packing import RowBuilder, chunk_for_scoring
from hiermodel.data.sources import DocumentSource
from hiermodel.errors import UserError


def check_shapes(config: DataConfig) -> None:
    if config.row_tokens < 2 * (config.max_word_bytes + 1):
        raise UserError(f"data.row_tokens={config.row_tokens} must be at least 2 * (data.max_word_bytes + 1)")
    if config.row_words < 4:
        raise UserError(f"data.row_words={config.row_words} must be at least 4")


class _PackIterator(grain.DatasetIterator):
    """Greedy packing that continues a long document in the next row.

    Its state is the parent's state before the document in progress plus how many of that
    document's words are already packed, so a restore rebuilds exactly the next row.
    """

    def __init__(self, parent: grain.DatasetIterator, row_tokens: int, row_words: int):
        super().__init__(parent)
        self._builder = RowBuilder(row_tokens, row_words)
        self._document: Document | None = None
        self._offset = 0  # words of the current document already packed
        self._parent_state = None  # the parent's state before the current document

    def _next_document(self) -> bool:
        self._parent_state = self._parent.get_state()
        try:
            self._document = next(self._parent)
        except StopIteration:
            self._document = None
            return False
        self._offset = 0
        return True

    def __next__(self) -> dict[str, np.ndarray]:
        builder = self._builder
        while True:
            if self._document is None and not self._next_document():
                if builder.empty:
                    raise StopIteration
                return builder.finish()
            doc, offset = self._document, self._offset
            taken = builder.words_that_fit(doc.word_lengths[offset:])
            piece = doc.words(offset, offset + taken)
            if len(piece.tokens) >= 2:  # a lone token has no target
                builder.add(piece)
                self._offset = offset + taken
                if self._offset == doc.num_words:
                    self._document = None
                    continue
            elif builder.empty:
                self._document = None  # a one-token remainder: nothing to learn from it
                continue
            return builder.finish()

    def get_state(self) -> dict:
        if self._document is None:
            return {"parent": self._parent.get_state(), "offset": -1}
        return {"parent": self._parent_state, "offset": self._offset}

    def set_state(self, state: dict) -> None:
        self._builder.finish()
        self._parent.set_state(state["parent"])
        self._document = None
        if state["offset"] >= 0:
            self._next_document()
            self._offset = state["offset"]


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


def mixture_weights(shares: list[float], sources: list[DocumentSource], sample: int = 1000) -> list[float]:
    """Per-document mixing weights that give each source its share of the *bytes* trained on:
    a share divided by the source's mean document size (from up to `sample` documents)."""
    means = []
    for source in sources:
        indices = np.linspace(0, len(source) - 1, min(sample, len(source))).astype(int)
        means.append(max(float(np.mean([len(source[int(i)]) for i in indices])), 1.0))
    return [share / mean for share, mean in zip(shares, means)]


def train_dataset(config: DataConfig, source: DocumentSource | list[DocumentSource],
                  to_document: Callable[[bytes], Document], seed: int, local_batch: int, process_index: int = 0,
                  process_count: int = 1) -> grain.IterDataset:
    """Infinite batches of packed rows for one process (its shards' rows, in shard order);
    reshuffled every epoch. Several sources are mixed by data.train_weights, as byte shares."""
    check_shapes(config)
    sources = source if isinstance(source, list) else [source]
    mine, shards = shards_of_process(config, process_index, process_count)
    if local_batch % len(mine):
        raise UserError(f"{local_batch} rows per process do not split over its {len(mine)} data shards")
    for s in sources:
        if len(s) < shards:
            raise UserError(f"{', '.join(s.paths)}: {len(s)} training documents cannot feed {shards} data shards")
    weights = mixture_weights(config.train_weights, sources) if len(sources) > 1 else None
    documents = []
    for i, s in enumerate(sources):
        ds = grain.MapDataset.source(s)
        documents.append(ds.shuffle(seed=seed + i) if config.shuffle else ds)

    def shard(index: int) -> grain.IterDataset:
        streams = [ds[index::shards].repeat(None) for ds in documents]
        mixed = streams[0] if weights is None else grain.MapDataset.mix(streams, weights)
        rows = mixed.map(to_document).to_iter_dataset()
        return PackIterDataset(rows, config.row_tokens, config.row_words).batch(local_batch // len(mine),
                                                                                 drop_remainder=True)

    if len(mine) == 1:
        batches = shard(mine[0])
    else:
        batches = grain.experimental.ZipIterDataset([shard(i) for i in mine]).map(
            lambda parts: {k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
    return grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=4)


def scoring_batches(config: DataConfig, source: DocumentSource, to_document: Callable[[bytes], Document],
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
        for index in source.documents_of(file_number):
            document = to_document(source[index])
            for piece, context in chunk_for_scoring(document, config.row_tokens, config.row_words):
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
