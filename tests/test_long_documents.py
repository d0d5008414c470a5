"""Documents of any size: read in bounded units, packed and scored as if read whole, resumed exactly."""

import dataclasses
import json

import numpy as np
import pytest

from hiermodel.config import DataConfig
from hiermodel.data.documents import ByteEncoding, Document
from hiermodel.data.pipeline import scoring_batches, train_dataset
from hiermodel.data.sources import DocumentSource

ROWS = DataConfig(row_tokens=256, row_words=64, max_word_bytes=32, shuffle=False)
BYTES = ByteEncoding(ROWS.max_word_bytes, end_of_text=True).document


def book(lines: int = 900) -> bytes:
    """Multilingual lines of varied length, one paragraph without line ends, and a bad byte."""
    words = ["the", "Grüße,", "日本語の", "naïve", "x" * 40, "\xff", "déjà-vu", "ok."]
    text = [" ".join(words[(i * 7 + j) % len(words)] for j in range(i % 23)) for i in range(lines)]
    text.insert(lines // 2, "长" * 3000)  # 9 KB without a line end: cut at a character start
    return "\n".join(text).encode("utf-8", errors="surrogateescape") + b"\n"


def rows(source, config, batches, seed=0):
    iterator = iter(train_dataset(config, source, BYTES, seed, local_batch=2))
    out = [next(iterator) for _ in range(batches)]
    iterator.close()
    return out


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


@pytest.fixture
def long_text(tmp_path):
    path = tmp_path / "book.txt"
    path.write_bytes(book())
    return path


def test_units_cut_after_line_ends_and_rejoin_to_the_document(long_text):
    data = long_text.read_bytes()
    source = DocumentSource([str(long_text)], read_bytes=2048)
    assert len(source) == -(-len(data) // 2048)
    pieces = [p for i in range(len(source)) for p in source[i][1]]
    assert b"".join(p.data for p in pieces) == data and list(source.documents()) == [data]
    assert pieces[0].first and pieces[-1].last and not any(p.first or p.last for p in pieces[1:-1])
    assert all(p.joins for p in pieces[1:])
    # Every cut but those inside the long line follows a line end; those fall between characters.
    cuts = np.cumsum([len(p.data) for p in pieces])[:-1]
    assert sum(data[c - 1] != ord("\n") for c in cuts) >= 3
    assert all(data[c] & 0xC0 != 0x80 for c in cuts)
    assert max(len(p.data) for p in pieces) <= 2048 + 1024
    # Pieces converted one by one join to the whole document's words: the HAT splitter always ends
    # a word at a line end, and between two CJK characters.
    whole = BYTES(data)
    joined = Document.join([BYTES(p.data, p.first, p.last) for p in pieces])
    for name in ("tokens", "token_bytes", "word_lengths"):
        assert np.array_equal(getattr(whole, name), getattr(joined, name))


@pytest.mark.parametrize("kind", ["text", "jsonl", "separated"])
def test_a_long_document_packs_and_scores_as_if_read_whole(tmp_path, kind):
    data = book().replace("长".encode() * 3000, b"")  # every cut at a line end
    if kind == "jsonl":
        path = tmp_path / "pages.jsonl"
        path.write_text(json.dumps({"text": "a short page"}) + "\n"
                        + json.dumps({"text": data.decode("utf-8", "surrogateescape")}) + "\n")
        separator = ""
    else:
        path = tmp_path / "book.txt"
        separator = "\x1e" if kind == "separated" else ""
        path.write_bytes(data + (b"\x1esecond document\n\x1ethird" if separator else b""))
    whole = DocumentSource([str(path)], separator, read_bytes=0)
    cut = DocumentSource([str(path)], separator, read_bytes=1024)
    assert len(whole) == 1 and len(cut) > 20
    assert list(cut.documents()) == list(whole.documents())
    assert_same(rows(whole, ROWS, 40), rows(cut, ROWS, 40))
    assert_same(list(scoring_batches(ROWS, whole, BYTES, 4)), list(scoring_batches(ROWS, cut, BYTES, 4)))


@pytest.mark.parametrize("shuffle, shuffle_rows", [(False, 0), (True, 0), (True, 6)])
def test_resuming_inside_a_long_document_gives_exactly_the_next_batch(long_text, shuffle, shuffle_rows):
    config = dataclasses.replace(ROWS, shuffle=shuffle, shuffle_rows=shuffle_rows)
    source = DocumentSource([str(long_text)], read_bytes=2048)
    dataset = train_dataset(config, source, BYTES, seed=1, local_batch=2)
    iterator = iter(dataset)
    expected, states = [], []
    for _ in range(30):
        states.append(json.loads(json.dumps(iterator.get_state())))  # as a checkpoint keeps it
        expected.append(next(iterator))
    iterator.close()
    packer_states = [s for s in json.dumps(states).split('"packed": ')[1:]]
    assert sum(not s.startswith("0") for s in packer_states) > 10  # mostly inside a piece
    for at in (1, 7, 19, 29):
        resumed = iter(dataset)
        resumed.set_state(states[at])
        assert_same([next(resumed) for _ in range(len(expected) - at)], expected[at:])
        resumed.close()


def test_rows_are_shuffled_in_windows_that_mix_units(tmp_path):
    path = tmp_path / "numbered.txt"  # every row differs
    path.write_text("".join(f"line {i}: " + "word " * (i % 17) + "\n" for i in range(4000)))
    source = DocumentSource([str(path)], read_bytes=2048)
    window = 32

    def records(shuffle_rows):  # a row's every array, so a row whose arrays got mixed up differs
        batches = rows(source, dataclasses.replace(ROWS, shuffle=True, shuffle_rows=shuffle_rows), window)
        return [b"|".join(b[k][i].tobytes() for k in sorted(b)) for b in batches for i in range(2)]

    ordered, mixed = records(0), records(window)
    assert len(set(ordered)) == len(ordered)
    for start in (0, window):  # each window holds the rows packing made, in another order
        assert sorted(mixed[start:start + window]) == sorted(ordered[start:start + window])
        assert mixed[start:start + window] != ordered[start:start + window]
    # In packing order a batch is two consecutive rows; shuffled, most batches are not.
    position = {row: i for i, row in enumerate(ordered)}
    gaps = [abs(position[a] - position[b]) for a, b in zip(mixed[0::2], mixed[1::2])]
    assert sum(gap > 1 for gap in gaps) > len(gaps) // 2


def test_jsonl_lines_of_any_length_are_read_once(tmp_path):
    texts = [("page %d " % i) * (1 + (i * 37) % 400) + "\nend" for i in range(60)]
    path = tmp_path / "web.jsonl"
    path.write_text("".join(json.dumps({"text": t, "n": i}) + "\n" + ("\n" if i % 9 == 0 else "")
                            for i, t in enumerate(texts)))
    source = DocumentSource([str(path)], read_bytes=512)
    assert len(source) > 60  # long lines leave units where no line starts
    assert list(source.documents()) == [t.encode() for t in texts]
    assert max(len(p.data) for i in range(len(source)) for p in source[i][1]) <= 512


def test_text_that_is_not_utf8_trains_byte_for_byte(tmp_path):
    data = b"caf\xe9 na\xefve \xff\xfe\x00 ok\n" * 50
    (tmp_path / "latin1.txt").write_bytes(data)
    source = DocumentSource([str(tmp_path / "latin1.txt")], read_bytes=256)
    batch = rows(source, ROWS, 1)[0]
    tokens = batch["tokens"][0][batch["segments"][0] > 0]
    assert tokens[0] == 256 and tokens[1:40].astype(np.uint8).tobytes() == data[:39]


def test_holdout_splits_a_long_document_by_piece_without_overlap(long_text):
    train = DocumentSource([str(long_text)], read_bytes=1024, holdout=0.1, split="train")
    held_out = DocumentSource([str(long_text)], read_bytes=1024, holdout=0.1, split="eval")
    everything = [p.data for p in DocumentSource([str(long_text)], read_bytes=1024).pieces(0)]
    train_pieces, eval_pieces = list(train.pieces(0)), list(held_out.pieces(0))
    assert sorted(p.data for p in train_pieces + eval_pieces) == sorted(everything)
    assert 0 < len(eval_pieces) < 0.3 * len(everything)
    # A held-out piece whose predecessor trains does not join the one before it.
    order = {data: i for i, data in enumerate(everything)}
    for before, after in zip(eval_pieces, eval_pieces[1:]):
        assert after.joins == (order[after.data] == order[before.data] + 1)
    # Scoring the held-out side scores each of its bytes once.
    total = 0
    for batch in scoring_batches(ROWS, held_out, BYTES, 4):
        targets = np.pad(batch["token_bytes"][:, 1:], ((0, 0), (0, 1)))
        total += int(targets[batch["loss_mask"] > 0].sum())
    assert total == sum(len(p.data) for p in eval_pieces)
