"""What the Equal-Info-Window coder needs from a model: integer next-byte CDFs, step by step.

The coder and the model meet only here. A predictor is batched and incremental: every call
feeds one token per row at that row's position and returns, per row, the CDF of the byte that
follows. Position 0 holds BOS_ID: windows reset M1 by feeding from position 1 again, which
overwrites the row's context from there on.

Exactness contract: a row's CDF is a pure function of the tokens that row was last fed at
positions 0..position. It must not depend on the batch size, on other rows, on tokens left at
higher positions by earlier windows, on the device count or on the platform; otherwise decoding
breaks. CDFs are int64 [B, 257] with cdf[:, 0] == 0,
cdf[:, 256] == 2**CDF_BITS and every step at least 1.
"""

from typing import Any, Protocol

import numpy as np

CDF_BITS = 14  # beta: each byte keeps probability at least 2**-14


class Predictor(Protocol):
    max_context: int  # positions a row can hold: BOS plus at most max_context - 1 bytes

    def start(self, batch: int) -> Any:
        """A fresh state for `batch` rows."""

    def step(self, state: Any, tokens_B: np.ndarray, positions_B: np.ndarray) -> tuple[Any, np.ndarray]:
        """Feed tokens_B (int32) at positions_B (int32); returns the new state and CDFs [B, 257]."""
