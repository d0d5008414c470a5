"""The integer arithmetic coder and Equal-Info windows: exact codewords, the delay rule, round trips."""

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hiermodel.compress import coder, windows
from hiermodel.compress.predictor import CDF_BITS
from hiermodel.errors import UserError
from hiermodel.text.words import BOS_ID

CORPUS = Path("/work/shared/corpus")
FAST = settings(max_examples=25, deadline=None)


def cdf_from_frequencies(frequencies_Hx256: np.ndarray) -> np.ndarray:
    """Integer CDFs with total 2**CDF_BITS and every byte at least 1."""
    room = (1 << CDF_BITS) - 256
    counts = 1 + frequencies_Hx256 * room // frequencies_Hx256.sum(1, keepdims=True)
    counts[np.arange(len(counts)), counts.argmax(1)] += (1 << CDF_BITS) - counts.sum(1)
    return np.concatenate([np.zeros((len(counts), 1), np.int64), np.cumsum(counts, 1)], 1)


class HashedOrder2:
    """Reference predictor: a fixed CDF per hashed pair of the tokens last fed at positions
    p - 1 and p (BOS before position 0)."""

    BUCKETS = 4099

    def __init__(self, frequencies_Hx256: np.ndarray, max_context: int = 4096):
        self.cdf_Hx257 = cdf_from_frequencies(frequencies_Hx256.astype(np.int64))
        self.max_context = max_context

    @classmethod
    def skewed(cls, seed: int = 0, max_context: int = 4096):
        """Random CDFs; most contexts have one favourite byte, some with probability near 1."""
        rng = np.random.default_rng(seed)
        frequencies = rng.integers(1, 50, (cls.BUCKETS, 256))
        peaks = rng.choice([0, 2_000, 100_000, 10_000_000], cls.BUCKETS)
        frequencies[np.arange(cls.BUCKETS), rng.integers(0, 256, cls.BUCKETS)] += peaks
        return cls(frequencies, max_context)

    @classmethod
    def trained(cls, text: bytes, max_context: int = 4096):
        """Counts of each byte after each hashed pair of bytes in `text`, and (as every window starts
        with BOS) after BOS and after BOS plus each byte."""
        data = np.frombuffer(text, np.uint8).astype(np.int64)
        frequencies = np.ones((cls.BUCKETS, 256), np.int64)
        np.add.at(frequencies, (cls.bucket(data[:-2], data[1:-1]), data[2:]), 64)
        np.add.at(frequencies, (cls.bucket(BOS_ID, data[:-1]), data[1:]), 64)
        np.add.at(frequencies, (cls.bucket(BOS_ID, BOS_ID), data), 64)
        return cls(frequencies, max_context)

    @classmethod
    def bucket(cls, previous, token):
        return (previous * 263 + token) % cls.BUCKETS

    def start(self, batch):
        return np.full((batch, self.max_context + 1), BOS_ID, np.int64)  # column p + 1: position p

    def step(self, state, tokens_B, positions_B):
        rows_B = np.arange(len(tokens_B))
        state[rows_B, positions_B + 1] = tokens_B
        return state, self.cdf_Hx257[self.bucket(state[rows_B, positions_B], state[rows_B, positions_B + 1])]


def brute_codeword(low: int, size: int, bits: int):
    """The spec, literally: the shortest l <= bits with a dyadic interval inside, lowest first."""
    for length in range(bits + 1):
        shift = coder.STATE_BITS - length
        b = -(-low // (1 << shift))
        if (b + 1) << shift <= low + size:
            return b << (bits - length)
    return None


def reference_encode(predictor, data: bytes, bits: int, delay: bool = True):
    """One row, Python integers, the spec step by step: [(codeword, bytes)] per window."""
    capacity, out, start = predictor.max_context - 1, [], 0
    while start < len(data):
        state, cdf = predictor.step(predictor.start(1), np.array([BOS_ID]), np.array([0]))
        low, size, codes = 0, 1 << coder.STATE_BITS, []
        while start + len(codes) < len(data) and len(codes) < capacity:
            symbol, c = data[start + len(codes)], [int(v) for v in cdf[0]]
            below, through = size * c[symbol] >> CDF_BITS, size * c[symbol + 1] >> CDF_BITS
            code = brute_codeword(low + below, through - below, bits)
            if code is None:
                break
            low, size = low + below, through - below
            codes.append(code)
            state, cdf = predictor.step(state, np.array([symbol]), np.array([len(codes)]))
        kept = codes.index(codes[-1]) + 1 if delay else len(codes)
        out.append((codes[-1], kept))
        start += kept
    return out


def as_pairs(record):
    return list(zip(record.windows.tolist(), record.window_bytes.tolist()))


def round_trip(predictor, documents, bits, batch=16, segment_bytes=None, decode_batch=5):
    records = windows.encode_documents(predictor, documents, bits, batch, segment_bytes)
    for record, document in zip(records, documents):
        assert record.windows.dtype == np.uint32 and int(record.windows.max(initial=0)) < 1 << bits
        assert record.window_bytes.min(initial=1) >= 1 and record.window_bytes.sum() == len(document)
    decoded = windows.decode_documents(predictor, [r.windows for r in records], bits, decode_batch)
    assert windows.require_decodable(decoded) == list(documents)
    for record, doc in zip(records, decoded):
        np.testing.assert_array_equal(doc.window_bytes, record.window_bytes)
    return records


@FAST
@given(st.integers(0, (1 << 46) - 1), st.integers(0, 1 << 46), st.integers(16, 32))
def test_codeword_is_the_shortest_dyadic_interval_inside(low, size, bits):
    size = min(size, (1 << 46) - low)
    got = int(coder.codeword(np.array([low]), np.array([size]), bits)[0])
    expected = brute_codeword(low, size, bits)
    assert got == (coder.NO_CODEWORD if expected is None else expected)


def test_codeword_on_constructed_intervals():
    # [2**45, 2**46) is the dyadic interval "1"; one below it only "10" fits, with the same padding.
    low_B = np.array([1 << 45, (1 << 45) - 1, 3 << 40, 12345, 0])
    size_B = np.array([1 << 45, 1 << 45, 1 << 30, (1 << 14) - 1, 1 << 46])
    np.testing.assert_array_equal(coder.codeword(low_B, size_B, 16), [1 << 15, 1 << 15, 3 << 10, -1, 0])
    assert coder.codeword(np.array([5 << 14]), np.array([1 << 14]), 32)[0] == 5


@FAST
@given(st.integers(0, 2**32 - 1), st.integers(1 << 14, 1 << 46), st.integers(0, 2**46))
def test_narrow_partitions_the_interval_and_symbol_at_inverts_it(seed, size, point):
    rng = np.random.default_rng(seed)
    cdf_1x257 = cdf_from_frequencies(rng.integers(1, 1 << rng.integers(1, 20), (1, 256)))
    low = int(rng.integers(0, (1 << 46) - size + 1))
    low_B, size_B = np.full(256, low), np.full(256, size)
    sub_low_B, sub_size_B = coder.narrow(low_B, size_B, np.repeat(cdf_1x257, 256, 0), np.arange(256))
    assert (sub_size_B >= 1).all() and sub_low_B[0] == low and (sub_low_B[1:] == sub_low_B[:-1] + sub_size_B[:-1]).all()
    assert sub_low_B[-1] + sub_size_B[-1] == low + size
    point = low + point % size
    symbol = int(coder.symbol_at(low_B[:1], size_B[:1], cdf_1x257, np.array([point]))[0])
    assert sub_low_B[symbol] <= point < sub_low_B[symbol] + sub_size_B[symbol]


@pytest.mark.parametrize("bits", [15, 33, 0, 16.0, True, "16"])
def test_window_bits_outside_16_to_32_are_refused(bits):
    with pytest.raises(ValueError, match="window bits must"):
        coder.check_window_bits(bits)
    with pytest.raises(ValueError, match="window bits must"):
        windows.encode_documents(HashedOrder2.skewed(), [b"abc"], bits)
    assert coder.check_window_bits(np.int64(24)) == 24


@pytest.mark.parametrize("bits", [16, 24, 32])
def test_batched_encoder_matches_the_one_row_reference(bits):
    predictor = HashedOrder2.skewed(seed=bits)
    rng = np.random.default_rng(bits)
    documents = [rng.choice(8, 400).astype(np.uint8).tobytes() + bytes(rng.integers(0, 256, 100, np.uint8)),
                 b"", b"x", bytes(300), b"\xc0\xff\xfe\x80 invalid UTF-8 \xed\xa0\x80"]
    records = round_trip(predictor, documents, bits)
    for record, document in zip(records, documents):
        assert as_pairs(record) == reference_encode(predictor, document, bits)
    assert len(records[1].windows) == 0 and as_pairs(records[2]) == reference_encode(predictor, b"x", bits)


@FAST
@given(st.lists(st.binary(max_size=300), max_size=6), st.sampled_from([16, 24, 32]), st.integers(1, 9),
       st.integers(0, 3))
def test_random_bytes_round_trip_for_any_batch_size(documents, bits, batch, seed):
    round_trip(HashedOrder2.skewed(seed), documents, bits, batch=batch, decode_batch=batch + 3)


def test_windows_do_not_depend_on_batch_size_and_stop_at_segment_ends():
    predictor = HashedOrder2.skewed(seed=5)
    rng = np.random.default_rng(5)
    documents = [rng.choice(4, n).astype(np.uint8).tobytes() for n in (1000, 3, 0, 777, 64)]
    whole = [as_pairs(r) for r in round_trip(predictor, documents, 16, batch=3)]
    assert whole == [as_pairs(r) for r in round_trip(predictor, documents, 16, batch=64)]
    segmented = round_trip(predictor, documents, 16, batch=7, segment_bytes=100)
    for record, document in zip(segmented, documents):
        ends = np.cumsum(record.window_bytes)
        assert set(range(100, len(document), 100)) <= set(ends.tolist())  # a window ends at each cut
        pieces = [document[i:i + 100] for i in range(0, len(document), 100)]
        assert as_pairs(record) == sum((reference_encode(predictor, p, 16) for p in pieces), [])


def test_windows_hold_at_most_max_context_minus_one_bytes():
    predictor = HashedOrder2.skewed(seed=1, max_context=4)
    data = bytes(np.random.default_rng(1).choice(2, 2000).astype(np.uint8))
    record = round_trip(predictor, [data], 32, batch=4)[0]
    assert record.window_bytes.max() == 3
    assert as_pairs(record) == reference_encode(predictor, data, 32)


def test_greedy_rule_is_ambiguous_and_the_delay_rule_is_not():
    """x = a + t and y = a + d + t, where byte d is nearly certain after a, get the same greedy codewords."""
    predictor, bits = HashedOrder2.skewed(seed=0), 16
    rng = np.random.default_rng(0)

    def greedy(z):
        return reference_encode(predictor, z, bits, delay=False)

    found = None
    for _ in range(200):
        a, t = bytes(rng.integers(0, 256, 1, np.uint8)), bytes(rng.integers(0, 256, 3, np.uint8))
        for d in range(256):
            x, y = a + t, a + bytes([d]) + t
            if [c for c, _ in greedy(x)] == [c for c, _ in greedy(y)]:
                found = x, y
                break
        if found:
            break
    assert found, "no greedy collision found"
    x, y = found
    # The same codewords, but the first window covers one byte of x and two of y: a decoder cannot tell.
    assert x != y and greedy(x)[0][1] == 1 and greedy(y)[0][1] == 2
    assert greedy(x)[1:] == greedy(y)[1:]
    records = round_trip(predictor, [x, y], bits)
    assert [c for c, _ in as_pairs(records[0])] != [c for c, _ in as_pairs(records[1])]
    assert as_pairs(records[1])[:2] == [(greedy(y)[0][0], 1), reference_encode(predictor, y[1:], bits)[0]]


def test_undecodable_windows_are_reported_with_their_document_and_index():
    predictor, bits = HashedOrder2.skewed(seed=2), 16
    candidates = np.arange(0, 1 << bits, 37, dtype=np.uint32)
    per_window = windows.decode_documents(predictor, [candidates], bits, batch_size=64)[0].window_bytes
    invalid, valid = candidates[per_window < 0], candidates[per_window > 0]
    assert len(invalid) and len(valid) and not (per_window == 0).any()
    # A decodable window's bytes encode back to exactly that window.
    valid_bytes = windows.decode_documents(predictor, [[w] for w in valid[:50]], bits)
    assert [r.windows.tolist() for r in windows.encode_documents(predictor, [d.data for d in valid_bytes], bits)] \
        == [[w] for w in valid[:50].tolist()]
    good = windows.encode_documents(predictor, [b"hello", b"world"], bits)
    documents = [good[0].windows, np.concatenate([good[1].windows[:1], invalid[:2], good[1].windows[1:]])]
    decoded = windows.decode_documents(predictor, documents, bits)
    assert decoded[0].data == b"hello" and len(decoded[0].invalid_windows) == 0
    assert decoded[1].invalid_windows.tolist() == [1, 2] and decoded[1].data == b"world"
    with pytest.raises(windows.UndecodableWindowError, match="document 1, window 1 \\(and 1 more\\)") as error:
        windows.require_decodable(decoded)
    assert isinstance(error.value, UserError) and (error.value.document, error.value.window) == (1, 1)
    with pytest.raises(ValueError, match="lie in"):
        windows.decode_documents(predictor, [np.array([1 << bits])], bits)


def test_progress_and_summary():
    predictor = HashedOrder2.skewed(seed=3)
    documents = [bytes(100_000), b"abc"]
    seen = []
    records = windows.encode_documents(predictor, documents, 16, 128, segment_bytes=1000, progress=seen.append)
    assert seen[-1] == 100_003 and seen == sorted(seen) and len(seen) >= 2
    summary = windows.summarize(records, 16)
    assert summary.bytes_in == 100_003 and summary.windows_out == sum(len(r.windows) for r in records)
    assert summary.bits_per_byte == 16 * summary.windows_out / 100_003
    assert summary.bytes_per_window == 100_003 / summary.windows_out
    decoded_seen = []
    windows.decode_documents(predictor, [r.windows for r in records], 16, 128, progress=decoded_seen.append)
    assert decoded_seen[-1] == 100_003


def test_multi_script_text_round_trips():
    if not CORPUS.is_dir():
        pytest.skip(f"{CORPUS} is absent")
    samples = [path.read_bytes()[:3000] for path in sorted(CORPUS.glob("*.txt"))]
    predictor = HashedOrder2.trained(b"".join(samples))
    records = round_trip(predictor, samples + [samples[0][1:777]], 16, batch=8, segment_bytes=1024, decode_batch=32)
    summary = windows.summarize(records, 16)
    assert summary.bytes_per_window > 2  # the trained model does compress
