"""Window records on disk and M2's view of them: round trips, bad records, token splitting."""

import numpy as np
import pytest

from hiermodel.data import window_records
from hiermodel.errors import UserError


def record(n=50, bits=16, seed=0):
    rng = np.random.default_rng(seed)
    return window_records.WindowRecord(bits, rng.integers(0, 1 << bits, n, dtype=np.uint32), rng.integers(1, 9, n).astype(np.int32))


@pytest.mark.parametrize("bits", [16, 24, 32])
def test_records_round_trip(bits):
    original = record(bits=bits)
    back = window_records.unpack(window_records.pack(original))
    assert back.window_bits == bits
    np.testing.assert_array_equal(back.windows, original.windows)
    np.testing.assert_array_equal(back.window_bytes, original.window_bytes)
    empty = window_records.unpack(window_records.pack(window_records.WindowRecord(bits, np.zeros(0, np.uint32), np.zeros(0, np.int32))))
    assert len(empty.windows) == 0


def test_bad_records_are_named_and_refused():
    data = window_records.pack(record())
    for bad, message in [(b"hello world, plain text", "not an Equal-Info-Window record"),
                         (data[:-3], "truncated"), (b"EI", "too short"),
                         (data[:3] + bytes([9]) + data[4:], "format 9")]:
        with pytest.raises(UserError, match=message) as error:
            window_records.unpack(bad, "shard-0 record 7")
        assert "shard-0 record 7" in str(error.value)


@pytest.mark.parametrize("bits,token_bits", [(16, 16), (16, 8), (24, 8), (32, 16)])
def test_windows_split_into_tokens_and_back(bits, token_bits):
    windows = record(bits=bits).windows
    tokens = window_records.window_tokens(windows, bits, token_bits)
    assert len(tokens) == len(windows) * bits // token_bits and tokens.max() < 1 << token_bits
    np.testing.assert_array_equal(window_records.tokens_to_windows(tokens, bits, token_bits), windows)
    if token_bits == 8 and bits == 16:
        assert tokens[0] == windows[0] >> 8 and tokens[1] == windows[0] & 0xFF


def test_m2_documents_carry_the_raw_bytes_of_each_window():
    original = record(bits=16)
    doc = window_records.WindowEncoding(16, 8).document(window_records.pack(original))
    assert doc.tokens[0] == 256 and len(doc.tokens) == 1 + 2 * len(original.windows)
    assert doc.token_bytes.sum() == original.window_bytes.sum()
    np.testing.assert_array_equal(doc.token_bytes[1::2], original.window_bytes)
    with pytest.raises(UserError, match="model.window_bits=24"):
        window_records.WindowEncoding(24, 8).document(window_records.pack(original))
