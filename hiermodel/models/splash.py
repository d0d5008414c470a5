"""TPU attention without materialised scores: Pallas splash attention with this codebase's masks.

Causal (or a causal sliding window) within segments, as layers.dense_attention computes it, but
block by block in VMEM: blocks the mask empties are skipped, and nothing of size T x T is ever
written to HBM. Grouped-query attention runs as one multi-query kernel per key/value head. Off
TPU the same kernel runs in Pallas' interpreter (exact, slow: for tests).
"""

import functools

import jax
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from hiermodel.models.blockwise import computed_pairs as blockwise_pairs, per_shard

BLOCKS = (512, 256, 128)  # tried in this order; the first that divides the row is used


def supports(length: int) -> bool:
    """TPU blocks are multiples of 128 positions (its vector lanes); shorter or uneven rows, which
    are cheap anyway, keep the XLA attention."""
    return length % BLOCKS[-1] == 0


def block_size(length: int) -> int:
    """The kernel's query and key block for rows of `length`: large blocks keep the MXU busy, but
    a row of one block would skip nothing of the causal mask."""
    return next((b for b in BLOCKS if length % b == 0 and length // b >= 2), BLOCKS[-1])


def _kernel(length: int, window: int, query_heads: int, interpret: bool):
    """One multi-query kernel over `query_heads` heads that share a key/value head. Built in the
    trace that uses it (its block tables are constants of that program); splash caches the
    tables' numpy form, so a model's layers share them."""
    shape = (length, length)
    mask = splash.LocalMask(shape, (window - 1, 0), 0) if window and window < length else splash.CausalMask(shape)
    b = block_size(length)
    blocks = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                               block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    return splash.make_splash_mqa_single_device(splash.MultiHeadMask([mask] * query_heads), block_sizes=blocks,
                                                interpret=interpret)


def _attend(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, segments_BxT, window: int, interpret: bool):
    b, t, h, dh = q_BxTxHxDh.shape
    kv = k_BxTxKxDh.shape[2]
    kernel = _kernel(t, window, h // kv, interpret)
    q_BxKxGxTxDh = (q_BxTxHxDh * dh ** -0.5).reshape(b, t, kv, h // kv, dh).transpose(0, 2, 3, 1, 4)
    k_BxKxTxDh, v_BxKxTxDh = (x.transpose(0, 2, 1, 3) for x in (k_BxTxKxDh, v_BxTxKxDh))

    def one_row(q_KxGxTxDh, k_KxTxDh, v_KxTxDh, segments_T):
        ids = splash.SegmentIds(segments_T, segments_T)
        return jax.vmap(lambda q, k, v: kernel(q, k, v, ids))(q_KxGxTxDh, k_KxTxDh, v_KxTxDh)

    out_BxKxGxTxDh = jax.vmap(one_row)(q_BxKxGxTxDh, k_BxKxTxDh, v_BxKxTxDh, segments_BxT)
    return out_BxKxGxTxDh.transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh).astype(q_BxTxHxDh.dtype)


def splash_attention(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, segments_BxT, window: int, interpret: bool):
    """Attention of each row over its own causal (windowed) segment, [B, T, H, Dh], per shard."""
    attend = functools.partial(_attend, window=window, interpret=interpret)
    return per_shard(attend, q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, segments_BxT)


def computed_pairs(length: int, window: int) -> int:
    """Query-key pairs the kernel computes over one row (see blockwise.computed_pairs)."""
    b = block_size(length)
    return blockwise_pairs(length, window, b, b)
