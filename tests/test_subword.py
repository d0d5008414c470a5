import math

import jax
import pytest
from hypothesis import given, settings, strategies as st

from hiermodel.config import MeshConfig
from hiermodel.data.documents import SubwordEncoding
from hiermodel.run import TOKENIZER_FILE, encoding
from hiermodel.data.sources import DocumentSource
from hiermodel.errors import UserError
from hiermodel.eval.score import make_score_fn, score_source
from hiermodel.text import subword
from hiermodel.text.words import split_words
from hiermodel.train import state as state_lib
from hiermodel.train.loop import train
from hiermodel.run import open_latest
from hiermodel.train.metrics import read_metrics
from hiermodel.sharding import make_mesh
from tests.conftest import micro_config
from tools import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe") / "bpe512.json"
    assert train_tokenizer.main(["builtin:train", "--vocab-size", "512", "--output", str(path),
                                 "--max-word-bytes", "32"]) == 0
    return path


@pytest.fixture(scope="module")
def encoder(tokenizer_file):
    return SubwordEncoding(subword.Subword.load(tokenizer_file), max_word_bytes=32)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")))
def test_any_bytes_round_trip_and_every_byte_is_covered_once(encoder, data):
    document = encoder.document(data)
    assert document.tokens[0] == encoder.bos_id and document.token_bytes[0] == 0
    assert encoder.tokenizer.decode(document.tokens[1:]) == data
    assert document.token_bytes.sum() == len(data)
    # Words are HAT's words: each word's ids decode to exactly that word.
    words = split_words(data, 32)
    assert [encoder.tokenizer.decode(document.words(i + 1, i + 2).tokens) for i in range(len(words))] == words


def test_corpus_text_of_every_script_round_trips_and_compresses(encoder, corpus):
    for path in sorted(corpus.glob("*.txt")):
        data = path.read_bytes()[:20000]
        document = encoder.document(data)
        assert encoder.tokenizer.decode(document.tokens[1:]) == data, path.name
    english = (corpus / "en_pride_and_prejudice.txt").read_bytes()[:20000]
    assert len(english) / (len(encoder.document(english).tokens) - 1) > 1.5  # bytes per token, 255 merges


def test_tokenizer_problems_are_clear_errors(tmp_path, tokenizer_file):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="bad.json"):
        subword.Subword.load(bad)
    config = micro_config(**{"model.kind": "subword", "model.vocab_size": 600, "model.tokenizer": tokenizer_file})
    with pytest.raises(UserError, match="512 ids but model.vocab_size=600"):
        encoding(config)
    with pytest.raises(UserError, match="model.tokenizer"):
        encoding(micro_config(**{"model.kind": "subword", "model.vocab_size": 512}))
    with pytest.raises(UserError, match="at least 258"):
        subword.train([b"abc"], 100, 32)


def test_subword_run_trains_keeps_its_tokenizer_and_scores_every_raw_byte(tmp_path, tokenizer_file):
    config = micro_config(run_dir=tmp_path / "run", **{"model.kind": "subword", "model.vocab_size": 512,
                                                       "model.tokenizer": tokenizer_file})
    train(config)
    run_dir = tmp_path / "run"
    assert (run_dir / TOKENIZER_FILE).read_bytes() == tokenizer_file.read_bytes()
    logged = [m for _, m in sorted(read_metrics(run_dir).items())]
    assert logged[-1]["loss"] < logged[0]["loss"]
    # Tokens cover several bytes each, so bits per byte are well below bits per token.
    assert logged[-1]["bpb"] < 0.6 * logged[-1]["loss"] / math.log(2)

    source = DocumentSource(["builtin:eval"])
    checkpointer, step, _ = open_latest(run_dir)
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    with jax.set_mesh(mesh):
        graphdef, abstract = state_lib.abstract_params(config, mesh)
        params = checkpointer.restore_params(step, abstract)
        checkpointer.close()
        score_fn = make_score_fn(graphdef, "float32", mesh, jax.tree.map(lambda p: p.sharding, params))
        result = score_source(score_fn, params, source, encoding(config).document, config.data, 8, mesh)
    documents = list(source.documents())
    assert result["bytes"] == sum(map(len, documents))
    assert 0 < result["bpb"] < 8
    # One scored token per BPE id of every document (its BOS is context, not scored).
    ids = sum(len(encoding(config).document(d).tokens) - 1 for d in documents)
    assert result["tokens"] == ids and result["bytes_per_token"] == result["bytes"] / ids > 1.5


def test_unigram_bits_per_byte_by_hand():
    from tools.unigram_bpb import unigram_bpb

    # Train counts: a x3, b x1 (+1 smoothing each over a 4-symbol vocabulary: total 8).
    bpb = unigram_bpb([b"aab", b"a"], [b"ab"], list, 4)
    assert bpb == pytest.approx(-(math.log2(4 / 8) + math.log2(2 / 8)) / 2)
