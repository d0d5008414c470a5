"""GPU attention without materialised scores: a Pallas (Triton) flash kernel with this codebase's
masks.

Causal (or a causal sliding window) within segments, as layers.dense_attention computes it:
each query block walks only the key blocks its causal window can reach, keeps a running softmax
in registers, and writes the output and its log-sum-exp; nothing of size T x T, no mask and no
bias gradient reaches memory. The backward recomputes the scores block by block (one kernel for
dK and dV, one for dQ). Grouped-query attention reads each key/value head once per query head
through the block index, with no copies. Off GPU the same kernels run in Pallas' interpreter
(exact, slow: for tests). The block size is a safe choice for head dims up to 128, not tuned on
hardware.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from hiermodel.models.blockwise import computed_pairs as blockwise_pairs, per_shard

BLOCK = 64  # query and key positions per block, forward and backward
LOG2_E = math.log2(math.e)  # scores go to base 2: exp2 is the GPU's native exponential
NEG = -1e30  # a running maximum that is finite, so a fully masked block gives exp2(-inf) = 0, not NaN


def supports(length: int, head_dim: int) -> bool:
    """Triton tiles are powers of two of at least 16, and BLOCK is sized for head dims up to
    128; other shapes keep the XLA attention."""
    return length % BLOCK == 0 and 16 <= head_dim <= 128 and head_dim & (head_dim - 1) == 0


def computed_pairs(length: int, window: int) -> int:
    """Query-key pairs the kernel computes over one row (see blockwise.computed_pairs)."""
    return blockwise_pairs(length, window, BLOCK, BLOCK)


def _allowed(q_block, k_block, q_segments, k_segments, window: int):
    """[BLOCK, BLOCK]: causal, within the window, same segment."""
    delta = (q_block * BLOCK + jnp.arange(BLOCK))[:, None] - (k_block * BLOCK + jnp.arange(BLOCK))[None, :]
    allowed = (delta >= 0) & (q_segments[:, None] == k_segments[None, :])
    return allowed & (delta < window) if window else allowed


def _key_blocks(q_block, window: int):
    """The key blocks [first, end) some query of `q_block` reaches."""
    first = jnp.maximum(q_block * BLOCK - window + 1, 0) // BLOCK if window else 0
    return first, q_block + 1


def _query_blocks(k_block, window: int, blocks: int):
    """The query blocks [first, end) that reach some key of `k_block`."""
    end = jnp.minimum((k_block * BLOCK + BLOCK + window - 2) // BLOCK + 1, blocks) if window else blocks
    return k_block, end


def _log2_probs(q, k, q_block, k_block, q_segments, k_segments, window: int, scale: float):
    """Scores in base 2, masked entries -inf."""
    s = plgpu.dot(q, k.T) * (scale * LOG2_E)
    return jnp.where(_allowed(q_block, k_block, q_segments, k_segments, window), s, -jnp.inf)


def _forward_kernel(q_ref, k_ref, v_ref, segments_ref, out_ref, lse_ref, *, window: int, scale: float):
    i = pl.program_id(2)
    q = q_ref[...]
    q_segments = segments_ref[pl.ds(i * BLOCK, BLOCK)]

    def step(j, carry):
        acc, top, total = carry
        keys = pl.ds(pl.multiple_of(j * BLOCK, BLOCK), BLOCK)
        s = _log2_probs(q, k_ref[keys, :], i, j, q_segments, segments_ref[keys], window, scale)
        new_top = jnp.maximum(top, s.max(axis=-1))
        p = jnp.exp2(s - new_top[:, None])
        rescale = jnp.exp2(top - new_top)
        acc = acc * rescale[:, None] + plgpu.dot(p.astype(v_ref.dtype), v_ref[keys, :])
        return acc, new_top, total * rescale + p.sum(axis=-1)

    first, end = _key_blocks(i, window)
    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((BLOCK,), NEG, jnp.float32), jnp.zeros((BLOCK,), jnp.float32))
    acc, top, total = lax.fori_loop(first, end, step, init)
    out_ref[...] = (acc / total[:, None]).astype(out_ref.dtype)  # total > 0: a query always sees itself
    lse_ref[...] = top + jnp.log2(total)


def _dkdv_kernel(q_ref, k_ref, v_ref, segments_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                 window: int, scale: float):
    j = pl.program_id(2)
    k, v = k_ref[...], v_ref[...]
    k_segments = segments_ref[pl.ds(j * BLOCK, BLOCK)]

    def step(i, carry):
        dk, dv = carry
        queries = pl.ds(pl.multiple_of(i * BLOCK, BLOCK), BLOCK)
        q, do = q_ref[queries, :], do_ref[queries, :]
        s = _log2_probs(q, k, i, j, segments_ref[queries], k_segments, window, scale)
        p = jnp.exp2(s - lse_ref[queries][:, None])
        dv += plgpu.dot(p.astype(do.dtype).T, do)
        ds = p * (plgpu.dot(do, v.T) - delta_ref[queries][:, None])
        return dk + plgpu.dot(ds.astype(q.dtype).T, q), dv

    first, end = _query_blocks(j, window, q_ref.shape[0] // BLOCK)
    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(first, end, step, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, segments_ref, do_ref, lse_ref, delta_ref, dq_ref, *, window: int, scale: float):
    i = pl.program_id(2)
    q, do = q_ref[...], do_ref[...]
    q_segments = segments_ref[pl.ds(i * BLOCK, BLOCK)]
    lse, delta = lse_ref[...], delta_ref[...]

    def step(j, dq):
        keys = pl.ds(pl.multiple_of(j * BLOCK, BLOCK), BLOCK)
        k = k_ref[keys, :]
        s = _log2_probs(q, k, i, j, q_segments, segments_ref[keys], window, scale)
        p = jnp.exp2(s - lse[:, None])
        ds = p * (plgpu.dot(do, v_ref[keys, :].T) - delta[:, None])
        return dq + plgpu.dot(ds.astype(k.dtype), k)

    first, end = _key_blocks(i, window)
    dq = lax.fori_loop(first, end, step, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _specs(t, h, kv, dh):
    """Block specs over the grid (row, query head, block): one block of a head, a whole row of
    a head (the query head's key/value head where `of_kv`), a row of segments, a block or a row
    of per-head statistics."""
    group = h // kv
    block = lambda of_kv=False: pl.BlockSpec((None, BLOCK, None, dh),
                                             lambda r, n, i: (r, i, n // group if of_kv else n, 0))
    row = lambda of_kv=False: pl.BlockSpec((None, t, None, dh), lambda r, n, i: (r, 0, n // group if of_kv else n, 0))
    return dict(block=block, row=row, segments=pl.BlockSpec((None, t), lambda r, n, i: (r, 0)),
                stat_block=pl.BlockSpec((None, None, BLOCK), lambda r, n, i: (r, n, i)),
                stat_row=pl.BlockSpec((None, None, t), lambda r, n, i: (r, n, 0)))


def _call(kernel, name, grid, in_specs, out_specs, out_shape, interpret, dh):
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                          compiler_params=plgpu.CompilerParams(num_warps=4 if dh <= 64 else 8, num_stages=2),
                          interpret=interpret, name=name)


def _forward(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, segments_BxT, window, interpret):
    b, t, h, dh = q_BxTxHxDh.shape
    spec = _specs(t, h, k_BxTxKxDh.shape[2], dh)
    kernel = functools.partial(_forward_kernel, window=window, scale=dh ** -0.5)
    return _call(kernel, "flash_forward", (b, h, t // BLOCK),
                 [spec["block"](), spec["row"](True), spec["row"](True), spec["segments"]],
                 [spec["block"](), spec["stat_block"]],
                 [jax.ShapeDtypeStruct(q_BxTxHxDh.shape, q_BxTxHxDh.dtype),
                  jax.ShapeDtypeStruct((b, h, t), jnp.float32)],
                 interpret, dh)(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, segments_BxT)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, segments_BxT, window, interpret):
    return _forward(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, segments_BxT, window, interpret)[0]


def _flash_forward(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, segments_BxT, window, interpret):
    out_BxTxHxDh, lse_BxHxT = _forward(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, segments_BxT, window, interpret)
    return out_BxTxHxDh, (q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, segments_BxT, out_BxTxHxDh, lse_BxHxT)


def _flash_backward(window, interpret, residuals, dout_BxTxHxDh):
    q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, segments_BxT, out_BxTxHxDh, lse_BxHxT = residuals
    b, t, h, dh = q_BxTxHxDh.shape
    kv = k_BxTxKxDh.shape[2]
    spec = _specs(t, h, kv, dh)
    delta_BxHxT = jnp.einsum("bthd,bthd->bht", out_BxTxHxDh.astype(jnp.float32), dout_BxTxHxDh.astype(jnp.float32))
    args = (q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, segments_BxT, dout_BxTxHxDh.astype(q_BxTxHxDh.dtype), lse_BxHxT,
            delta_BxHxT)
    grid, scale = (b, h, t // BLOCK), dh ** -0.5
    # dK and dV per query head (float32 where a key/value head's group sums them afterwards).
    per_head = jax.ShapeDtypeStruct((b, t, h, dh), k_BxTxKxDh.dtype if kv == h else jnp.float32)
    dk_BxTxHxDh, dv_BxTxHxDh = _call(
        functools.partial(_dkdv_kernel, window=window, scale=scale), "flash_dkdv", grid,
        [spec["row"](), spec["block"](True), spec["block"](True), spec["segments"], spec["row"](),
         spec["stat_row"], spec["stat_row"]],
        [spec["block"](), spec["block"]()], [per_head, per_head], interpret, dh)(*args)
    dq_BxTxHxDh = _call(
        functools.partial(_dq_kernel, window=window, scale=scale), "flash_dq", grid,
        [spec["block"](), spec["row"](True), spec["row"](True), spec["segments"], spec["block"](),
         spec["stat_block"], spec["stat_block"]],
        spec["block"](), jax.ShapeDtypeStruct(q_BxTxHxDh.shape, q_BxTxHxDh.dtype), interpret, dh)(*args)
    group_sum = lambda d_BxTxHxDh, like: d_BxTxHxDh.reshape(b, t, kv, h // kv, dh).sum(3).astype(like.dtype)
    return dq_BxTxHxDh, group_sum(dk_BxTxHxDh, k_BxTxKxDh), group_sum(dv_BxTxHxDh, v_BxTxKxDh), None


_flash.defvjp(_flash_forward, _flash_backward)


def flash_attention(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, segments_BxT, window: int, interpret: bool):
    """Attention of each row over its own causal (windowed) segment, [B, T, H, Dh], per shard."""
    attend = lambda q, k, v, s: _flash(q, k, v, s.astype(jnp.int32), window, interpret)
    return per_shard(attend, q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, segments_BxT)
