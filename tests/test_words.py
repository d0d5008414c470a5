import pytest
from hypothesis import given, settings, strategies as st

from hiermodel.text.words import split_words


@given(st.binary(max_size=400), st.integers(4, 120))
@settings(max_examples=300, deadline=None)
def test_any_bytes_split_losslessly_within_the_limit(data, limit):
    words = split_words(data, limit)
    assert b"".join(words) == data
    assert all(0 < len(w) <= limit for w in words)


@given(st.text(max_size=300))
@settings(max_examples=300, deadline=None)
def test_any_text_splits_losslessly(text):
    data = text.encode("utf-8", errors="surrogateescape")
    assert b"".join(split_words(data)) == data


def test_released_model_conventions():
    assert split_words(b"Hello, world!") == [b"Hello,", b" world!"]
    assert split_words("  New\nline camelCase".encode()) == [b"  ", b"New", b"\n", b"line", b" camel", b"Case"]
    assert split_words("日本語".encode()) == ["日".encode(), "本".encode(), "語".encode()]
    assert split_words(b"a" * 10, 4) == [b"aaaa", b"aaaa", b"aa"]


def test_invalid_utf8_bytes_become_single_byte_words():
    assert split_words(b"ab\xff\xc0 cd") == [b"ab", b"\xff", b"\xc0", b" cd"]


def test_real_text_in_every_language(corpus):
    for path in sorted(corpus.glob("*.txt")):
        data = path.read_bytes()[:200_000]
        words = split_words(data)
        assert b"".join(words) == data, path.name
        mean = len(data) / len(words)
        assert 1.5 < mean < 15, (path.name, mean)


def test_limit_below_one_character_is_rejected():
    with pytest.raises(ValueError, match="at least 4"):
        split_words(b"abc", 3)
