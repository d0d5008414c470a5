import dataclasses
import json
import zlib

import numpy as np
import pytest

from hiermodel.config import DataConfig
from hiermodel.data.documents import ByteEncoding
from hiermodel.data.pipeline import scoring_batches, train_dataset
from hiermodel.data.shards import write_shards
from hiermodel.data.sources import DocumentSource, Piece, chunk_at_lines, open_split, open_train
from hiermodel.errors import UserError
from hiermodel.text.words import BOS_ID, split_words

SMALL = DataConfig(row_tokens=256, row_words=64, max_word_bytes=32)
BYTES = ByteEncoding(SMALL.max_word_bytes).document


def segments_of(batch):
    """Each segment's tokens and word lengths, in row order."""
    out = []
    for row in range(batch["tokens"].shape[0]):
        segments, words = batch["segments"][row], batch["words"][row]
        for seg in np.unique(segments[segments > 0]):
            at = segments == seg
            out.append((batch["tokens"][row][at], np.bincount(words[at])[np.unique(words[at])]))
    return out


def test_chunks_cut_after_newlines_and_lose_nothing():
    data = b"line one\nline two is longer\n" + b"x" * 50 + b"\nend"
    pieces = chunk_at_lines(data, 20)
    assert b"".join(pieces) == data and all(len(p) <= 20 for p in pieces)
    assert pieces[0] == b"line one\n" and pieces[1] == b"line two is longer\n" and pieces[2] == b"x" * 20
    assert chunk_at_lines(b"short", 20) == [b"short"]


@pytest.mark.parametrize("fraction", [0.05, 0.005])
def test_holdout_splits_every_file_of_the_corpus_without_overlap(corpus, fraction):
    files = str(corpus / "*.txt")
    config = DataConfig(train=[files], eval=[files], chunk_bytes=8192, holdout=fraction)
    train, held_out = open_split(config, "train"), open_split(config, "eval")
    everything = DocumentSource([files], chunk_bytes=8192)
    train_docs, eval_docs, all_docs = (list(s.documents()) for s in (train, held_out, everything))
    assert not set(train_docs) & set(eval_docs) and set(train_docs) | set(eval_docs) == set(all_docs)
    assert held_out.split_size == (len(eval_docs), sum(map(len, eval_docs)))  # what training reports
    assert train.split_size == (len(train_docs), sum(map(len, train_docs)))
    # Even where the share is too small to pick a document of every file by hash alone.
    assert all(any(True for _ in held_out.pieces(f)) for f in range(len(held_out.paths)))
    assert {path.rsplit("/", 1)[1][:2] for path in held_out.paths} == {"en", "de", "fr", "es", "fi", "ja", "zh"}
    assert len(eval_docs) / len(all_docs) < fraction + len(held_out.paths) / len(all_docs)
    assert len(eval_docs) / len(all_docs) > 0.5 * fraction


def test_a_file_whose_hash_picks_nothing_holds_out_a_whole_piece_not_a_scrap(tmp_path):
    # Units of `read_bytes` cut into `chunk_bytes` pieces end in scraps; with this text the
    # file's lowest-hashed piece is one, 80 bytes.
    path = tmp_path / "book.txt"
    path.write_text("".join(f"line {i} of file 1: " + "word " * (i % 13) + "\n" for i in range(400)))
    config = DataConfig(train=[str(path)], eval=[str(path)], chunk_bytes=512, read_bytes=512, holdout=0.002)
    pieces = list(DocumentSource([str(path)], chunk_bytes=512, read_bytes=512).documents())
    lowest = min(pieces, key=lambda p: zlib.crc32(p) % 10000)
    assert len(lowest) < 128 and all(zlib.crc32(p) % 10000 >= 20 for p in pieces)
    (held_out,) = open_split(config, "eval").documents()
    assert held_out != lowest and 4 * len(held_out) >= max(map(len, pieces))
    assert held_out == min((p for p in pieces if 4 * len(p) >= 512), key=lambda p: zlib.crc32(p) % 10000)
    assert held_out not in set(open_split(config, "train").documents())


def test_sources_read_files_directories_globs_jsonl_and_separators(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_bytes(b"first\n\nsecond")
    (tmp_path / "d" / ".hidden").write_bytes(b"skip me")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "json doc"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert list(DocumentSource([str(tmp_path / "d")]).documents()) == [b"first\n\nsecond"]
    split = DocumentSource([str(tmp_path / "d" / "*.txt")], separator="\n\n")
    assert list(split.documents()) == [b"first", b"second"]
    both = DocumentSource([str(tmp_path / "b.jsonl"), str(tmp_path / "d")])
    assert list(both.documents()) == [b"json doc", b"two", b"first\n\nsecond"]
    assert both[0] == (0, [Piece(b"json doc"), Piece(b"two")]) and list(both.units_of(1)) == [1]


def test_arrayrecord_shards_round_trip(tmp_path):
    source = DocumentSource(["builtin:eval"])
    paths, count = write_shards(source, tmp_path / "shards", num_shards=3)
    assert len(paths) == 3 and not list((tmp_path / "shards").glob("*.partial"))
    shards = DocumentSource([str(tmp_path / "shards")])
    assert count == len(shards) and sorted(shards.documents()) == sorted(source.documents())


def test_bad_sources_get_clear_errors(tmp_path):
    with pytest.raises(UserError, match="no-such: no such file"):
        DocumentSource([str(tmp_path / "no-such")])
    with pytest.raises(UserError, match="matches no files"):
        DocumentSource([str(tmp_path / "*.none")])
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(UserError, match="no documents"):
        DocumentSource([str(tmp_path / "empty.txt")])
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(UserError, match=r"bad.jsonl: the line at byte 15 is not valid JSON"):
        DocumentSource([str(tmp_path / "bad.jsonl")])
    (tmp_path / "field.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(UserError, match=r"field.jsonl: the line at byte 0 has no string field 'text'"):
        DocumentSource([str(tmp_path / "field.jsonl")])
    (tmp_path / "bad.arrayrecord").write_bytes(b"not an array record")
    with pytest.raises(UserError, match="bad.arrayrecord: not a readable ArrayRecord"):
        DocumentSource([str(tmp_path / "bad.arrayrecord")])


def test_packed_rows_rebuild_every_document_with_whole_words():
    source = DocumentSource(["builtin:eval"])
    in_packing_order = dataclasses.replace(SMALL, shuffle_rows=0)
    iterator = iter(train_dataset(in_packing_order, source, BYTES, seed=0, local_batch=4))
    # Pieces of one document are consecutive: concatenating them restores it, word for word.
    stream_tokens, stream_words = [], []
    for _ in range(40):
        batch = next(iterator)
        assert batch["tokens"].shape == (4, 256) and batch["word_segments"].shape == (4, 64)
        for tokens, lengths in segments_of(batch):
            stream_tokens.append(tokens)
            stream_words.append(lengths)
        # A target is scored only inside its own segment; padding is never scored.
        mask, seg = batch["loss_mask"], batch["segments"]
        assert np.all(mask[:, :-1] <= (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0))
        assert np.all(mask[:, -1] == 0)
    iterator.close()
    tokens = np.concatenate(stream_tokens)
    lengths = np.concatenate(stream_words)
    starts = np.flatnonzero(tokens == BOS_ID)
    documents = list(source.documents())
    for begin, end in zip(starts[:-1], starts[1:]):
        data = tokens[begin + 1:end].astype(np.uint8).tobytes()
        assert data in documents
    # Word boundaries in rows are exactly the splitter's.
    doc = ByteEncoding(SMALL.max_word_bytes).document(documents[0])
    expected = [len(w) for w in split_words(documents[0], SMALL.max_word_bytes)]
    assert list(doc.word_lengths[1:]) == expected
    assert lengths.sum() == len(tokens)


def test_shuffling_is_deterministic_by_seed():
    source = DocumentSource(["builtin:eval"])
    first = lambda seed: next(iter(train_dataset(SMALL, source, BYTES, seed=seed, local_batch=2)))["tokens"]
    assert np.array_equal(first(1), first(1))
    assert not np.array_equal(first(1), first(2))


def test_sources_mix_by_byte_share_and_resume_exactly(tmp_path):
    (tmp_path / "short.txt").write_bytes(b"\n\n".join(b"aaaa " * 9 for _ in range(300)))  # 45-byte documents
    (tmp_path / "long.txt").write_bytes(b"\n\n".join(b"bbbb " * 80 for _ in range(40)))  # 400-byte documents
    config = DataConfig(train=[str(tmp_path / "short.txt"), str(tmp_path / "long.txt")], train_weights=[0.75, 0.25],
                        separator="\n\n", row_tokens=256, row_words=64, max_word_bytes=32, read_bytes=512)
    sources = open_train(config)
    assert [len(list(s.documents())) for s in sources] == [300, 40]

    def batches(count, restore_after=None):
        iterator, out = iter(train_dataset(config, sources, BYTES, 0, 4)), []
        for step in range(count):
            if step == restore_after:
                state = iterator.get_state()
                iterator.close()
                iterator = iter(train_dataset(config, sources, BYTES, 0, 4))
                iterator.set_state(state)
            out.append(next(iterator)["tokens"])
        iterator.close()
        return out

    tokens = np.concatenate(batches(40))
    a, b = (tokens == ord("a")).sum(), (tokens == ord("b")).sum()
    assert a / (a + b) == pytest.approx(0.75, abs=0.02)  # letters are 4/5 of both kinds of document
    for x, y in zip(batches(6), batches(6, restore_after=3)):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(UserError, match="one positive share per data.train entry"):
        open_train(DataConfig(train=config.train, train_weights=[1.0], separator="\n\n"))


def test_the_global_batch_depends_on_data_shards_not_on_processes():
    config = DataConfig(row_tokens=256, row_words=64, max_word_bytes=32, shards=4)
    source = DocumentSource(["builtin:eval"])

    def global_batches(processes: int, steps: int = 3, restore_after: int | None = None):
        iterators = [iter(train_dataset(config, source, BYTES, 0, 8 // processes, p, processes))
                     for p in range(processes)]
        batches = []
        for step in range(steps):
            if step == restore_after:  # each process restores its own state into a fresh iterator
                states = [it.get_state() for it in iterators]
                for it in iterators:
                    it.close()
                iterators = [iter(train_dataset(config, source, BYTES, 0, 8 // processes, p, processes))
                             for p in range(processes)]
                for it, state in zip(iterators, states):
                    it.set_state(state)
            batches.append(np.concatenate([next(it)["tokens"] for it in iterators]))
        for it in iterators:
            it.close()
        return batches

    one = global_batches(1)
    for processes, restore in [(2, None), (4, None), (2, 1)]:
        for a, b in zip(one, global_batches(processes, restore_after=restore)):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(UserError, match="data.shards=4 does not split evenly over 3 processes"):
        train_dataset(config, source, BYTES, 0, 2, 0, 3)


def test_processes_read_disjoint_slices_that_cover_an_epoch(tmp_path):
    docs = [f"document {i} says {'la ' * (i % 7)}".encode() for i in range(40)]
    (tmp_path / "docs.txt").write_bytes(b"\x1e".join(docs))
    source = DocumentSource([str(tmp_path / "docs.txt")], separator="\x1e", read_bytes=96)
    assert len(source) > 8
    seen = []
    for process in range(2):
        in_packing_order = dataclasses.replace(SMALL, shuffle_rows=0)
        iterator = iter(train_dataset(in_packing_order, source, BYTES, 0, 1, process_index=process, process_count=2))
        tokens = np.concatenate([next(iterator)["tokens"][0] for _ in range(12)])
        iterator.close()
        epoch = set()  # the documents up to the first repeat; a row may drop a last lone space
        for piece in np.split(tokens, np.flatnonzero(tokens == BOS_ID))[1:]:
            document = piece[1:][piece[1:] > 0].astype(np.uint8).tobytes().rstrip()
            if document in epoch:
                break
            epoch.add(document)
        seen.append(epoch)
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {d.rstrip() for d in docs}


def test_restored_iterator_continues_with_exactly_the_next_batch():
    source = DocumentSource(["builtin:train"])
    dataset = train_dataset(SMALL, source, BYTES, seed=3, local_batch=4)
    iterator = iter(dataset)
    for _ in range(7):
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(5)]
    resumed = iter(dataset)
    resumed.set_state(json.loads(json.dumps(state)))  # the state survives JSON, as in checkpoints
    for want in expected:
        got = next(resumed)
        assert all(np.array_equal(want[k], got[k]) for k in want)
    iterator.close()
    resumed.close()


def test_scoring_rows_score_every_byte_exactly_once(tmp_path):
    long_doc = ("word " * 700).encode() + "ünïcödé 日本語 \xff".encode("utf-8", "surrogateescape")
    (tmp_path / "long.txt").write_bytes(long_doc)
    (tmp_path / "short.txt").write_bytes(b"x")
    source = DocumentSource([str(tmp_path / "long.txt"), str(tmp_path / "short.txt"), "builtin:eval"])
    scored = np.zeros(3, np.int64)
    targets = {0: bytearray(), 1: bytearray()}
    for batch in scoring_batches(SMALL, source, BYTES, batch_size=4):
        at = batch["loss_mask"] > 0
        scored += np.bincount(batch["tags"][at], minlength=3)
        next_tokens = np.pad(batch["tokens"][:, 1:], ((0, 0), (0, 1)))
        for tag in (0, 1):
            targets[tag] += next_tokens[at & (batch["tags"] == tag)].astype(np.uint8).tobytes()
    eval_bytes = sum(len(piece.data) for piece in source.pieces(2))
    assert list(scored) == [len(long_doc), 1, eval_bytes]
    assert bytes(targets[0]) == long_doc and bytes(targets[1]) == b"x"


def test_real_corpus_packs_in_every_script(corpus):
    config = DataConfig(row_tokens=1024, row_words=256)
    files = sorted(str(p) for p in corpus.glob("*.txt"))
    source = DocumentSource(files, separator="\n\n")
    iterator = iter(train_dataset(config, source, ByteEncoding(config.max_word_bytes).document, seed=0, local_batch=8))
    for _ in range(10):
        batch = next(iterator)
        # Greedy: a row ends when the next word does not fit, by tokens or by words (CJK rows
        # reach row_words first).
        tokens_used, words_used = (batch["segments"] > 0).sum(1), (batch["word_segments"] > 0).sum(1)
        assert np.all((tokens_used > config.row_tokens - config.max_word_bytes - 1) | (words_used == config.row_words))
    iterator.close()


def test_end_of_text_ends_every_document_as_a_word_of_its_own_and_is_scored_once(tmp_path):
    from hiermodel.config import Config, ModelConfig
    from hiermodel.run import encoding
    from hiermodel.text.words import END_ID

    data = "Grüße, 日本\xff".encode("utf-8", "surrogateescape")
    plain, ended = ByteEncoding(100).document(data), ByteEncoding(100, end_of_text=True).document(data)
    assert list(ended.tokens) == list(plain.tokens) + [END_ID]
    assert list(ended.word_lengths) == list(plain.word_lengths) + [1]
    assert ended.token_bytes.sum() == plain.token_bytes.sum() == len(data)
    # Scoring: the end is a target of its own, with no bytes, after the last byte of every piece.
    (tmp_path / "long.txt").write_bytes(("word " * 300).encode())
    source = DocumentSource([str(tmp_path / "long.txt")])
    ends = nbytes = 0
    for batch in scoring_batches(SMALL, source, ByteEncoding(SMALL.max_word_bytes, True).document, batch_size=4):
        targets = np.pad(batch["tokens"][:, 1:], ((0, 0), (0, 1)))[batch["loss_mask"] > 0]
        ends += int((targets == END_ID).sum())
        nbytes += int((targets < 256).sum())
    assert (ends, nbytes) == (1, len(("word " * 300).encode()))
    config = Config(model=ModelConfig(kind="subword", tokenizer="x.json"), data=DataConfig(end_of_text=True))
    with pytest.raises(UserError, match="end_of_text needs a byte-level model"):
        encoding(config)
