import numpy as np
import pytest

from hiermodel.data.sources import DocumentSource
from hiermodel.errors import UserError
from hiermodel.eval.perturb import KINDS, Perturbation, PerturbedSource

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. Ünïcödé, 日本語, and bytes \xff\xfe.").encode("utf-8", "surrogateescape")
TEXT = TEXT.replace("\xff".encode(), b"\xff") * 20


def apply(kind, rate, seed=0, data=TEXT):
    return Perturbation(kind, rate).apply(data, np.random.default_rng(seed))


def chars(data: bytes) -> list[str]:
    return list(data.decode("utf-8", "surrogateescape"))


@pytest.mark.parametrize("kind", KINDS)
def test_zero_rate_is_identity_and_noise_is_seeded(kind):
    assert apply(kind, 0.0) == TEXT
    assert apply(kind, 0.1, seed=1) == apply(kind, 0.1, seed=1)
    assert apply(kind, 0.1, seed=1) != apply(kind, 0.1, seed=2)
    assert apply(kind, 0.1, data=b"") == b""


def test_each_kind_does_what_it_says():
    n = len(chars(TEXT))
    dropped, inserted = chars(apply("drop", 0.2)), chars(apply("insert", 0.2))
    assert 0.15 * n < n - len(dropped) < 0.25 * n and 0.15 * n < len(inserted) - n < 0.25 * n
    swapped = apply("swap", 0.2)
    assert sorted(chars(swapped)) == sorted(chars(TEXT)) and swapped != TEXT
    flipped = apply("case", 0.3)
    assert "".join(chars(flipped)).lower() == "".join(chars(TEXT)).lower() and flipped != TEXT
    spaced = apply("whitespace", 0.2)
    assert b"".join(spaced.split()) == b"".join(TEXT.split()) and spaced != TEXT
    # Bytes that are not UTF-8 survive as themselves.
    assert apply("swap", 0.2).count(b"\xff") == TEXT.count(b"\xff")


def test_perturbed_source_is_per_document_and_keeps_the_clean_source(tmp_path):
    (tmp_path / "a.txt").write_bytes(TEXT)
    (tmp_path / "b.txt").write_bytes(TEXT[:100] + b"\n\n" + TEXT[100:300])
    source = DocumentSource([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], separator="\n\n")
    noisy = PerturbedSource(source, Perturbation("drop", 0.3), seed=5)
    pieces = [list(noisy.pieces(f)) for f in range(2)]
    clean = [list(source.pieces(f)) for f in range(2)]
    assert noisy.clean is source and [len(p) for p in pieces] == [1, 2]
    again = list(PerturbedSource(source, Perturbation("drop", 0.3), seed=5).pieces(1))
    assert pieces[1][1] == again[1] and pieces[1][1].data != clean[1][1].data
    assert pieces[1][1].data != pieces[1][0].data[:len(pieces[1][1].data)]
    assert [(p.first, p.last) for p in pieces[1]] == [(p.first, p.last) for p in clean[1]]


@pytest.mark.parametrize("spec, message", [("drop", "KIND:RATE"), ("blur:0.1", "KIND:RATE"),
                                           ("drop:x", "not a number"), ("drop:1.5", "between 0 and 1")])
def test_bad_specs_are_clear_errors(spec, message):
    with pytest.raises(UserError, match=message):
        Perturbation.parse(spec)
    assert str(Perturbation.parse("swap:0.05")) == "swap:0.05"
