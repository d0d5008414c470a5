"""Fixed-point arithmetic coding for Equal-Info windows: int64 only, vectorised over rows.

A row's coder state is an interval [low, low + range) of [0, 2**STATE_BITS). Narrowing by a byte
with an integer CDF of CDF_BITS precision multiplies range (<= 2**46) by a CDF value (<= 2**14):
every product stays below 2**61 (so does symbol_at's offset << CDF_BITS), so int64 never overflows. A window ends before its interval is
narrower than 2**(STATE_BITS - W) >= 2**CDF_BITS, so every byte keeps a non-empty sub-interval
and no renormalisation is needed.

A window's codeword is the shortest bit string b of length l <= W whose dyadic interval
[b * 2**(STATE_BITS - l), (b + 1) * 2**(STATE_BITS - l)) lies inside the row's interval, zero-padded
to W bits. Arrays hold the padded value; NO_CODEWORD marks an interval with no such string.
"""

import numpy as np

from hiermodel.compress.predictor import CDF_BITS

STATE_BITS = 46
# An interval of at least 2**-CDF_BITS of the state (any single byte) contains a dyadic interval
# of 2**-(CDF_BITS + 2), so this many bits always name a one-byte window.
MIN_WINDOW_BITS = CDF_BITS + 2
# A fitting window leaves range >= 2**(STATE_BITS - W); each byte's sub-interval is non-empty
# only while range >= 2**CDF_BITS.
MAX_WINDOW_BITS = STATE_BITS - CDF_BITS
NO_CODEWORD = -1


def check_window_bits(window_bits) -> int:
    """window_bits as an int, or a ValueError saying which values work and why."""
    if isinstance(window_bits, bool) or not isinstance(window_bits, (int, np.integer)):
        raise ValueError(f"window bits must be an integer, got {window_bits!r}")
    if not MIN_WINDOW_BITS <= window_bits <= MAX_WINDOW_BITS:
        raise ValueError(
            f"window bits must be in [{MIN_WINDOW_BITS}, {MAX_WINDOW_BITS}], got {window_bits}: with "
            f"{CDF_BITS}-bit CDFs a single byte needs up to {MIN_WINDOW_BITS} bits, and a "
            f"{STATE_BITS}-bit coder state keeps every byte codable only up to {MAX_WINDOW_BITS} bits")
    return int(window_bits)


def initial_interval(batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(low_B, range_B) of a fresh window: the whole state space."""
    return np.zeros(batch, np.int64), np.full(batch, 1 << STATE_BITS, np.int64)


def narrow(low_B: np.ndarray, range_B: np.ndarray, cdf_Bx257: np.ndarray,
           symbol_B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sub-interval of each row's interval that codes symbol_B under that row's CDF."""
    at_B = np.arange(len(symbol_B)) * cdf_Bx257.shape[1] + symbol_B
    cdf_flat = np.ascontiguousarray(cdf_Bx257).reshape(-1)
    below_B = (range_B * cdf_flat[at_B]) >> CDF_BITS
    through_B = (range_B * cdf_flat[at_B + 1]) >> CDF_BITS
    return low_B + below_B, through_B - below_B


def symbol_at(low_B: np.ndarray, range_B: np.ndarray, cdf_Bx257: np.ndarray,
              point_B: np.ndarray) -> np.ndarray:
    """The symbol whose sub-interval (as narrow cuts it) contains point_B, which must lie in the interval.

    (range * c >> CDF_BITS) <= offset holds exactly when c <= ((offset + 1) << CDF_BITS) - 1) // range,
    so one integer division per row turns the search into a binary search over the CDF itself.
    """
    limit_B = (((point_B - low_B + 1) << CDF_BITS) - 1) // range_B
    cdf_flat = np.ascontiguousarray(cdf_Bx257).reshape(-1)
    row_start_B = np.arange(len(limit_B)) * cdf_Bx257.shape[1]
    # cdf[0] = 0 <= limit < cdf[256] = 2**CDF_BITS: the answer is the last index in 0..255 with cdf <= limit.
    symbol_B = np.zeros(len(limit_B), np.int64)
    for half in (128, 64, 32, 16, 8, 4, 2, 1):
        probe_B = symbol_B + half
        symbol_B = np.where(cdf_flat[row_start_B + probe_B] <= limit_B, probe_B, symbol_B)
    return symbol_B


def codeword(low_B: np.ndarray, range_B: np.ndarray, window_bits: int) -> np.ndarray:
    """The W-bit padded codeword of each row's interval, or NO_CODEWORD where none has <= W bits.

    In units of 2**(STATE_BITS - W), a codeword of <= W bits is a dyadic interval inside the whole
    units [first, end) of the row's interval. The largest one lies against `split`, the multiple of
    the highest power of two in [first, end - 1]: ending there or starting there. (When [first, end)
    is itself dyadic, the half ending at split starts where it does: the same padded codeword.)
    Of two equally short ones the lower wins.
    """
    unit_bits = STATE_BITS - window_bits
    first_B = (low_B + (1 << unit_bits) - 1) >> unit_bits
    end_B = (low_B + range_B) >> unit_bits
    # `| 1` keeps split = first when the interval is a single unit.
    split_B = (end_B - 1) & -_highest_power((first_B ^ (end_B - 1)) | 1)
    below_B, above_B = split_B - first_B, end_B - split_B
    # Equal bit lengths: the xor of two numbers drops their common top bit, their and keeps it.
    lower_wins_B = (below_B >= above_B) | ((below_B ^ above_B) <= (below_B & above_B))
    start_B = np.where(lower_wins_B, split_B - _highest_power(below_B), split_B)
    return np.where(end_B > first_B, start_B, NO_CODEWORD)


def codeword_point(codeword_B: np.ndarray, window_bits: int) -> np.ndarray:
    """The start of the interval each W-bit codeword names: the decoder's target point."""
    return codeword_B.astype(np.int64) << (STATE_BITS - window_bits)


def _highest_power(x_B: np.ndarray) -> np.ndarray:
    """The highest power of two <= x for 0 <= x < 2**32 (0 for 0): smear the top bit right, keep it."""
    x_B = x_B | (x_B >> 1)
    for shift in (2, 4, 8, 16):
        x_B |= x_B >> shift
    return x_B - (x_B >> 1)
