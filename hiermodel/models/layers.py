"""Shared transformer layers: RMSNorm, RoPE, grouped-query attention, SwiGLU, pre-norm blocks.

Parameters carry logical axis names in their `axes` metadata; train/sharding.py maps them to
the mesh. Layers compute in the dtype of their inputs; softmax and norms run in float32.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from hiermodel.train.sharding import constrain

LOCAL_BLOCK = 64  # query block of sliding-window attention


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple, fan_in: int | None = None) -> nnx.Param:
    """A weight with truncated-normal init scaled by 1/sqrt(fan_in) (the first dim by default)."""
    std = (fan_in or shape[0]) ** -0.5
    value = std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)
    return nnx.Param(value, axes=axes)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), axes=(None,))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope(x_BxTxHxDh, positions_BxT, theta: float):
    """Rotary position embedding over the last dimension (split halves)."""
    half = x_BxTxHxDh.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles_BxTxF = positions_BxT[..., None].astype(jnp.float32) * freqs
    sin, cos = jnp.sin(angles_BxTxF)[:, :, None, :], jnp.cos(angles_BxTxF)[:, :, None, :]
    x1, x2 = jnp.split(x_BxTxHxDh.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BxTxHxDh.dtype)


def attention_mask(segments_BxT, window: int = 0):
    """Causal, same-segment mask [B, T, T]; window > 0 limits how far back a query reaches."""
    t = jnp.arange(segments_BxT.shape[1])
    allowed_TxT = t[:, None] >= t[None, :]
    if window:
        allowed_TxT &= t[:, None] - t[None, :] < window
    same_BxTxT = segments_BxT[:, :, None] == segments_BxT[:, None, :]
    return same_BxTxT & allowed_TxT


def _softmax_attend(logits, mask, values, out_spec: str):
    logits = jnp.where(mask, logits.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(values.dtype)
    return jnp.einsum(out_spec, probs, values)


def _with_previous_blocks(x_BxNxCx, count: int, fill):
    """Along the key axis (2), each block followed by nothing but preceded by `count` earlier blocks."""
    pad = [(0, 0), (count, 0)] + [(0, 0)] * (x_BxNxCx.ndim - 2)
    padded = jnp.pad(x_BxNxCx, pad, constant_values=fill)
    n = x_BxNxCx.shape[1]
    return jnp.concatenate([padded[:, j:j + n] for j in range(count + 1)], axis=2)


def local_attention(q_BxTxKxGxDh, k_BxTxKxDh, v_BxTxKxDh, segments_BxT, window: int, block: int):
    """Causal sliding-window attention computed block by block: cost T * (window + block), not T^2."""
    b, t, kv, g, dh = q_BxTxKxGxDh.shape
    n = -(-t // block)
    pad = n * block - t
    if pad:
        q_BxTxKxGxDh = jnp.pad(q_BxTxKxGxDh, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
        k_BxTxKxDh, v_BxTxKxDh = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (k_BxTxKxDh, v_BxTxKxDh))
        segments_BxT = jnp.pad(segments_BxT, ((0, 0), (0, pad)), constant_values=-1)
    count = -(-(window - 1) // block)  # earlier blocks a query can reach
    q_BxNxCxKxGxDh = q_BxTxKxGxDh.reshape(b, n, block, kv, g, dh)
    k_BxNxSxKxDh = _with_previous_blocks(k_BxTxKxDh.reshape(b, n, block, kv, dh), count, 0)
    v_BxNxSxKxDh = _with_previous_blocks(v_BxTxKxDh.reshape(b, n, block, kv, dh), count, 0)
    q_index_NxC = jnp.arange(n * block).reshape(1, n, block)
    k_index_NxS = _with_previous_blocks(q_index_NxC, count, -window - 1)[0]
    segments_BxNxC = segments_BxT.reshape(b, n, block)
    k_segments_BxNxS = _with_previous_blocks(segments_BxNxC, count, -2)
    delta_NxCxS = q_index_NxC[0, :, :, None] - k_index_NxS[:, None, :]
    mask_BxNxCxS = ((delta_NxCxS >= 0) & (delta_NxCxS < window)
                    & (segments_BxNxC[..., None] == k_segments_BxNxS[:, :, None, :]))
    logits = jnp.einsum("bnckgd,bnskd->bnkgcs", q_BxNxCxKxGxDh, k_BxNxSxKxDh) * dh ** -0.5
    out = _softmax_attend(logits, mask_BxNxCxS[:, :, None, None], v_BxNxSxKxDh, "bnkgcs,bnskd->bnckgd")
    return out.reshape(b, n * block, kv, g, dh)[:, :t]


def dense_attention(q_BxTxKxGxDh, k_BxTxKxDh, v_BxTxKxDh, segments_BxT, window: int):
    logits = jnp.einsum("btkgd,bskd->bkgts", q_BxTxKxGxDh, k_BxTxKxDh) * q_BxTxKxGxDh.shape[-1] ** -0.5
    mask = attention_mask(segments_BxT, window)[:, None, None]
    return _softmax_attend(logits, mask, v_BxTxKxDh, "bkgts,bskd->btkgd")


def uses_local_attention(length: int, window: int) -> bool:
    return bool(window) and length > window + LOCAL_BLOCK


def attention_score_pairs(length: int, window: int) -> int:
    """Query-key pairs the attention of one row of `length` computes, masked ones included."""
    if not uses_local_attention(length, window):
        return length * length
    blocks = -(-length // LOCAL_BLOCK)
    keys = (-(-(window - 1) // LOCAL_BLOCK) + 1) * LOCAL_BLOCK
    return blocks * LOCAL_BLOCK * keys


class Attention(nnx.Module):
    """Grouped-query causal self-attention with RoPE, within segments, optionally windowed."""

    def __init__(self, dim: int, heads: int, kv_heads: int, theta: float, rngs: nnx.Rngs):
        if dim % heads or heads % kv_heads:
            raise ValueError(f"width {dim}, heads {heads}, kv heads {kv_heads} do not divide")
        head_dim = dim // heads
        self.wq = param(rngs, (dim, heads, head_dim), ("embed", "heads", None))
        self.wk = param(rngs, (dim, kv_heads, head_dim), ("embed", "kv_heads", None))
        self.wv = param(rngs, (dim, kv_heads, head_dim), ("embed", "kv_heads", None))
        self.wo = param(rngs, (heads, head_dim, dim), ("heads", None, "embed"), fan_in=dim)
        self.theta = theta

    def __call__(self, x_BxTxD, positions_BxT, segments_BxT, window: int = 0):
        q_BxTxHxDh = rope(jnp.einsum("btd,dhk->bthk", x_BxTxD, self.wq[...]), positions_BxT, self.theta)
        k_BxTxKxDh = rope(jnp.einsum("btd,dhk->bthk", x_BxTxD, self.wk[...]), positions_BxT, self.theta)
        v_BxTxKxDh = jnp.einsum("btd,dhk->bthk", x_BxTxD, self.wv[...])
        b, t, h, dh = q_BxTxHxDh.shape
        kv = k_BxTxKxDh.shape[2]
        q_BxTxKxGxDh = q_BxTxHxDh.reshape(b, t, kv, h // kv, dh)
        if uses_local_attention(t, window):
            out = local_attention(q_BxTxKxGxDh, k_BxTxKxDh, v_BxTxKxDh, segments_BxT, window, LOCAL_BLOCK)
        else:
            out = dense_attention(q_BxTxKxGxDh, k_BxTxKxDh, v_BxTxKxDh, segments_BxT, window)
        return jnp.einsum("bthk,hkd->btd", out.reshape(b, t, h, dh), self.wo[...])


class SwiGLU(nnx.Module):
    def __init__(self, dim: int, hidden: int, rngs: nnx.Rngs):
        self.w_gate = param(rngs, (dim, hidden), ("embed", "mlp"))
        self.w_up = param(rngs, (dim, hidden), ("embed", "mlp"))
        self.w_down = param(rngs, (hidden, dim), ("mlp", "embed"))

    def __call__(self, x_BxTxD):
        gate_BxTxF = jax.nn.silu(x_BxTxD @ self.w_gate[...])
        return (gate_BxTxF * (x_BxTxD @ self.w_up[...])) @ self.w_down[...]


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(norm x), then x + mlp(norm x)."""

    def __init__(self, dim: int, heads: int, kv_heads: int, mlp_dim: int, theta: float, eps: float,
                 rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(dim, eps)
        self.attn = Attention(dim, heads, kv_heads, theta, rngs)
        self.mlp_norm = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, mlp_dim, rngs)

    def __call__(self, x_BxTxD, positions_BxT, segments_BxT, window: int = 0):
        x_BxTxD = x_BxTxD + self.attn(self.attn_norm(x_BxTxD), positions_BxT, segments_BxT, window)
        x_BxTxD = x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD))
        return constrain(x_BxTxD, ("batch", "length", None))


def run_blocks(blocks, x_BxTxD, *args, remat: bool):
    """Apply a stack of blocks, each called as block(x, *args), rematerialised in the backward
    pass if asked."""
    for block in blocks:
        if remat:
            x_BxTxD = nnx.remat(lambda blk, x: blk(x, *args))(block, x_BxTxD)
        else:
            x_BxTxD = block(x_BxTxD, *args)
    return x_BxTxD


def block_flops(length: int, dim: int, heads: int, kv_heads: int, mlp_dim: int, window: int = 0) -> int:
    """Matmul FLOPs of one Block's forward over one row of `length` positions, as computed."""
    head_dim = dim // heads
    weights = 2 * dim * heads * head_dim + 2 * dim * kv_heads * head_dim + 3 * dim * mlp_dim
    scores_and_values = 2 * 2 * heads * head_dim * attention_score_pairs(length, window)
    return 2 * weights * length + scores_and_values
