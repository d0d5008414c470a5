"""What the block-skipping attention kernels (models/splash.py on TPU, models/flash.py on GPU)
share: which query-key blocks they compute, and how they run per shard of a mesh."""

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from hiermodel.sharding import logical_spec


def computed_pairs(length: int, window: int, block_q: int, block_k: int) -> int:
    """Query-key pairs a kernel computes over one row: every pair of each (query block, key
    block) the causal mask and window do not empty (segments are data, so their empty blocks
    are not known ahead)."""
    q_start = np.arange(length // block_q)[:, None] * block_q
    k_start = np.arange(length // block_k)[None, :] * block_k
    reaches = k_start <= q_start + block_q - 1  # some key at or before some query
    if window and window < length:  # and some key within the window of some query
        reaches &= q_start - (k_start + block_k - 1) < window
    return int(reaches.sum()) * block_q * block_k


def per_shard(attend, q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, segments_BxT):
    """`attend` on each shard of the current mesh: rows split over the batch axes, heads over
    the tensor axis. A kernel sees only its shard, so it needs no collectives."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return attend(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, segments_BxT)
    sizes = dict(mesh.shape)
    heads_spec = logical_spec(("batch", "length", "heads", None), q_BxTxHxDh.shape, sizes)
    kv_spec = logical_spec(("batch", "length", "kv_heads", None), k_BxTxKxDh.shape, sizes)
    if heads_spec[2] != kv_spec[2]:  # both head counts must split over the tensor axis, or neither
        heads_spec, kv_spec = P(heads_spec[0]), P(kv_spec[0])
    return jax.shard_map(attend, in_specs=(heads_spec, kv_spec, kv_spec, P(heads_spec[0])), out_specs=heads_spec,
                         check_vma=False)(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, segments_BxT)
