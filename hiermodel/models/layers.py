"""Shared transformer layers: RMSNorm, RoPE, grouped-query attention, SwiGLU, pre-norm blocks.

Parameters carry logical axis names in their `axes` metadata; hiermodel/sharding.py maps them to
the mesh. Layers compute in the dtype of their inputs; softmax and norms run in float32.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from hiermodel.models.flash import computed_pairs as flash_pairs, flash_attention, supports as flash_supports
from hiermodel.models.splash import computed_pairs as splash_pairs, splash_attention, supports as splash_supports
from hiermodel.sharding import constrain

LOCAL_BLOCK = 64  # query block of sliding-window attention


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KeyGates:
    """Delete-gate values of the keys, [B, T], added to the (capped) attention logits, except
    for keys fewer than `recent` positions behind the query, read whatever their gate."""

    values_BxT: jax.Array
    cap: float = dataclasses.field(metadata={"static": True})
    recent: int = dataclasses.field(default=0, metadata={"static": True})

    def apply(self, logits, delta_BxSxL, values_BxL=None):
        """The capped logits [B, K, G, S, L] plus the keys' gate values, for queries S at the key
        distances delta_BxSxL; values_BxL stands in for values_BxT (a decoding cache's keys)."""
        values_Bx1xL = (self.values_BxT if values_BxL is None else values_BxL)[:, None, :]
        offsets_BxSxL = jnp.where(delta_BxSxL < self.recent, 0.0, values_Bx1xL) if self.recent else values_Bx1xL
        return self.cap * jnp.tanh(logits.astype(jnp.float32) / self.cap) + offsets_BxSxL[:, None, None]


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


def rope_frequencies(half: int, theta: float, scaling: tuple = ()):
    """Angular frequency of each rotated pair. scaling: (factor, low_freq_factor, high_freq_factor,
    original_context), Llama 3.1's stretch of the slow frequencies for longer contexts: wavelengths
    beyond original_context / low_freq_factor are divided by factor, those under
    original_context / high_freq_factor kept, and the band between blended."""
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    if not scaling:
        return freqs
    factor, low, high, original = scaling
    wavelengths = 2 * jnp.pi / freqs
    blend = jnp.clip((original / wavelengths - low) / (high - low), 0.0, 1.0)
    return (1 - blend) * freqs / factor + blend * freqs


def rope(x_BxTxHxDh, positions_BxT, theta: float, scaling: tuple = ()):
    """Rotary position embedding over the last dimension (split halves)."""
    half = x_BxTxHxDh.shape[-1] // 2
    angles_BxTxF = positions_BxT[..., None].astype(jnp.float32) * rope_frequencies(half, theta, scaling)
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


def _softmax_attend(logits, mask, values, out_spec: str, extra_zero: bool = False):
    """Masked softmax over the last axis, then the weighted values. extra_zero: softmax1, as if
    one more key with logit 0 and a zero value were present, so attending to nothing is possible."""
    if extra_zero:
        logits = jnp.where(mask, logits.astype(jnp.float32), -jnp.inf)
        top = jnp.maximum(jnp.max(logits, axis=-1, keepdims=True), 0.0)
        weights = jnp.exp(logits - top)
        probs = weights / (weights.sum(axis=-1, keepdims=True) + jnp.exp(-top))
    else:
        logits = jnp.where(mask, logits.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum(out_spec, probs.astype(values.dtype), values)


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


def gated_attention(q_BxTxKxGxDh, k_BxTxKxDh, v_BxTxKxDh, positions_BxT, segments_BxT, window: int,
                    gates: "KeyGates"):
    """Attention after a delete gate: capped logits plus each key's gate value, softmax1.

    Causality and the window follow positions, not indices, so it also runs on a compacted
    sequence (hard deletion) whose kept entries keep their original positions.
    """
    logits = jnp.einsum("btkgd,bskd->bkgts", q_BxTxKxGxDh, k_BxTxKxDh) * q_BxTxKxGxDh.shape[-1] ** -0.5
    delta_BxTxT = positions_BxT[:, :, None] - positions_BxT[:, None, :]
    logits = gates.apply(logits, delta_BxTxT)
    mask_BxTxT = (delta_BxTxT >= 0) & (segments_BxT[:, :, None] == segments_BxT[:, None, :])
    if window:
        mask_BxTxT &= delta_BxTxT < window
    return _softmax_attend(logits, mask_BxTxT[:, None, None], v_BxTxKxDh, "bkgts,bskd->btkgd", extra_zero=True)


# model.attention: "xla" is this file's attention (block-local when windowed, so it computes
# and is counted as T x window); "splash" the Pallas kernel of models/splash.py (TPU) and
# "flash" that of models/flash.py (GPU), each interpreted on other platforms (for tests).
# auto: splash on TPU, flash on a GPU in 16-bit (Triton computes float32 dots in TF32), else xla.
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "splash", "flash")


def resolve_attention(setting: str, dtype, platform: str | None = None) -> str:
    """The implementation `setting` means on `platform` (default: JAX's default backend)."""
    if setting != "auto":
        return setting
    platform = platform or jax.default_backend()
    if platform == "tpu":
        return "splash"
    return "flash" if platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"


def xla_attention(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, segments_BxT, window: int):
    """This file's attention: block-local over long windowed rows, else dense; [B, T, H, Dh]."""
    b, t, h, dh = q_BxTxHxDh.shape
    kv = k_BxTxKxDh.shape[2]
    q_BxTxKxGxDh = q_BxTxHxDh.reshape(b, t, kv, h // kv, dh)
    if uses_local_attention(t, window):
        out = local_attention(q_BxTxKxGxDh, k_BxTxKxDh, v_BxTxKxDh, segments_BxT, window, LOCAL_BLOCK)
    else:
        out = dense_attention(q_BxTxKxGxDh, k_BxTxKxDh, v_BxTxKxDh, segments_BxT, window)
    return out.reshape(b, t, h, dh)


def attention(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, segments_BxT, window: int, setting: str):
    """Causal attention within segments (windowed if window > 0) by the implementation `setting`
    names; auto, splash and flash choose per platform when the program is lowered, so a step
    compiled ahead of time for a TPU gets the kernel on any host."""
    t, dh = q_BxTxHxDh.shape[1], q_BxTxHxDh.shape[3]
    kernels = {}  # by the platform each is lowered for
    if setting in ("auto", "splash") and splash_supports(t):
        kernels["tpu"] = splash_attention
    if resolve_attention(setting, q_BxTxHxDh.dtype, "gpu") == "flash" and flash_supports(t, dh):
        kernels["cuda"] = flash_attention
    if not kernels:
        return xla_attention(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, segments_BxT, window)
    lowered = {platform: functools.partial(kernel, window=window, interpret=False)
               for platform, kernel in kernels.items()}
    # A kernel named by the setting runs interpreted on other platforms (the tests); auto runs XLA.
    named = {"splash": "tpu", "flash": "cuda"}.get(setting)
    elsewhere = functools.partial(kernels[named], window=window, interpret=True) if named in kernels else \
        functools.partial(xla_attention, window=window)
    return jax.lax.platform_dependent(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, segments_BxT, **lowered, default=elsewhere)


def uses_local_attention(length: int, window: int) -> bool:
    return bool(window) and length > window + LOCAL_BLOCK


def uses_kernel(length: int, head_dim: int, implementation: str) -> bool:
    """Whether the resolved `implementation` runs a Pallas kernel on rows of `length`."""
    return ((implementation == "splash" and splash_supports(length))
            or (implementation == "flash" and flash_supports(length, head_dim)))


def attention_score_pairs(length: int, window: int, implementation: str = "xla", head_dim: int = 0) -> int:
    """Query-key pairs the attention of one row of `length` computes, masked ones included
    (the kernels skip the blocks their mask empties; whether flash runs depends on `head_dim`)."""
    if uses_kernel(length, head_dim, implementation):
        return {"splash": splash_pairs, "flash": flash_pairs}[implementation](length, window)
    if not uses_local_attention(length, window):
        return length * length
    blocks = -(-length // LOCAL_BLOCK)
    keys = (-(-(window - 1) // LOCAL_BLOCK) + 1) * LOCAL_BLOCK
    return blocks * LOCAL_BLOCK * keys


class Attention(nnx.Module):
    """Grouped-query causal self-attention with RoPE, within segments, optionally windowed.
    bias: the query, key and value projections add a bias (Qwen2); rope_scaling: see
    rope_frequencies."""

    def __init__(self, dim: int, heads: int, kv_heads: int, theta: float, rngs: nnx.Rngs,
                 implementation: str = "auto", rope_scaling: tuple = (), bias: bool = False):
        if dim % heads or heads % kv_heads:
            raise ValueError(f"width {dim}, heads {heads}, kv heads {kv_heads} do not divide")
        head_dim = dim // heads
        self.wq = param(rngs, (dim, heads, head_dim), ("embed", "heads", None))
        self.wk = param(rngs, (dim, kv_heads, head_dim), ("embed", "kv_heads", None))
        self.wv = param(rngs, (dim, kv_heads, head_dim), ("embed", "kv_heads", None))
        self.wo = param(rngs, (heads, head_dim, dim), ("heads", None, "embed"), fan_in=dim)
        if bias:
            self.bq = nnx.Param(jnp.zeros((heads, head_dim), jnp.float32), axes=("heads", None))
            self.bk = nnx.Param(jnp.zeros((kv_heads, head_dim), jnp.float32), axes=("kv_heads", None))
            self.bv = nnx.Param(jnp.zeros((kv_heads, head_dim), jnp.float32), axes=("kv_heads", None))
        self.theta, self.rope_scaling, self.bias = theta, tuple(rope_scaling), bias
        self.implementation = implementation

    def _project(self, x_BxTxD, positions_BxT):
        """Queries and keys (rotated) and values of each position."""
        q_BxTxHxDh = jnp.einsum("btd,dhk->bthk", x_BxTxD, self.wq[...])
        k_BxTxKxDh = jnp.einsum("btd,dhk->bthk", x_BxTxD, self.wk[...])
        v_BxTxKxDh = jnp.einsum("btd,dhk->bthk", x_BxTxD, self.wv[...])
        if self.bias:
            q_BxTxHxDh += self.bq[...].astype(q_BxTxHxDh.dtype)
            k_BxTxKxDh += self.bk[...].astype(k_BxTxKxDh.dtype)
            v_BxTxKxDh += self.bv[...].astype(v_BxTxKxDh.dtype)
        return (rope(q_BxTxHxDh, positions_BxT, self.theta, self.rope_scaling),
                rope(k_BxTxKxDh, positions_BxT, self.theta, self.rope_scaling), v_BxTxKxDh)

    def __call__(self, x_BxTxD, positions_BxT, segments_BxT, window: int = 0, gates: "KeyGates | None" = None):
        q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh = self._project(x_BxTxD, positions_BxT)
        b, t, h, dh = q_BxTxHxDh.shape
        if gates is None:
            out_BxTxHxDh = attention(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, segments_BxT, window, self.implementation)
        else:
            kv = k_BxTxKxDh.shape[2]
            out_BxTxHxDh = gated_attention(q_BxTxHxDh.reshape(b, t, kv, h // kv, dh), k_BxTxKxDh, v_BxTxKxDh,
                                           positions_BxT, segments_BxT, window, gates).reshape(b, t, h, dh)
        return jnp.einsum("bthk,hkd->btd", out_BxTxHxDh, self.wo[...])

    def extend(self, x_BxSxD, positions_BxS, cache: dict, window: int = 0, gates: "KeyGates | None" = None):
        """Attention of S new positions (one document per row, each row at its own positions)
        over the cache and themselves; returns the output and the cache with their keys and
        values (and, after a delete gate, their gate values: -inf for a hard-deleted key). A
        position at or past the cache's end is padding: computed, never stored."""
        q_BxSxHxDh, k_BxSxKxDh, v_BxSxKxDh = self._project(x_BxSxD, positions_BxS)
        cache = {**cache, "k": write_at(cache["k"], k_BxSxKxDh, positions_BxS),
                 "v": write_at(cache["v"], v_BxSxKxDh, positions_BxS)}
        if gates is not None:
            cache["gate"] = write_at(cache["gate"], gates.values_BxT, positions_BxS)
        b, s, h, dh = q_BxSxHxDh.shape
        keys, values, gate_values = cache["k"], cache["v"], cache.get("gate")
        length, span = keys.shape[1], window + s - 1  # the slots any of the S queries can see
        if window and span < length:
            # Only the window behind the row's first new position: per step, cost of the window, not of the row.
            start_B = jnp.clip(positions_BxS[:, 0] - window + 1, 0, length - span)
            window_of = jax.vmap(lambda c, start: jax.lax.dynamic_slice_in_dim(c, start, span, 0))
            keys, values = window_of(keys, start_B), window_of(values, start_B)
            gate_values = None if gates is None else window_of(gate_values, start_B)
            slots_BxL = start_B[:, None] + jnp.arange(span)
        else:
            slots_BxL = jnp.arange(length)[None]
        delta_BxSxL = positions_BxS[:, :, None] - slots_BxL[:, None, :]
        allowed_BxSxL = (delta_BxSxL >= 0) & ((delta_BxSxL < window) if window else True)
        q_BxSxKxGxDh = q_BxSxHxDh.reshape(b, s, keys.shape[2], -1, dh)
        logits = jnp.einsum("btkgd,bskd->bkgts", q_BxSxKxGxDh, keys.astype(q_BxSxHxDh.dtype)) * dh ** -0.5
        if gates is not None:
            logits = gates.apply(logits, delta_BxSxL, gate_values)
        out = _softmax_attend(logits, allowed_BxSxL[:, None, None], values.astype(q_BxSxHxDh.dtype),
                              "bkgts,bskd->btkgd", extra_zero=gates is not None)
        return jnp.einsum("bthk,hkd->btd", out.reshape(b, s, h, dh), self.wo[...]), cache


def write_at(buffer_BxLx, new_BxSx, positions_BxS):
    """`buffer` with new[b, s] in slot positions[b, s], where each row's positions are consecutive
    and then padding (L or more), which is dropped: rows of a batch may carry different numbers
    of new positions. One block write per row (a scatter costs more on CPU)."""
    length, s = buffer_BxLx.shape[1], new_BxSx.shape[1]

    def write_row(buffer_Lx, new_Sx, positions_S):
        start = jnp.clip(positions_S[0], 0, length - s)
        slots_S = start + jnp.arange(s)
        source_S = jnp.clip(slots_S - positions_S[0], 0, s - 1)  # the new entry each slot would take
        landed_S = positions_S[source_S] == slots_S
        landed = landed_S.reshape((s,) + (1,) * (new_Sx.ndim - 1))
        block = jnp.where(landed, new_Sx[source_S].astype(buffer_Lx.dtype),
                          jax.lax.dynamic_slice_in_dim(buffer_Lx, start, s, 0))
        return jax.lax.dynamic_update_slice_in_dim(buffer_Lx, block, start, 0)

    return jax.vmap(write_row)(buffer_BxLx, new_BxSx, positions_BxS)


def empty_cache(batch: int, length: int, kv_heads: int, head_dim: int, dtype) -> dict:
    """Keys and values of `length` positions for incremental decoding; slot i holds position i."""
    zeros = jnp.zeros((batch, length, kv_heads, head_dim), dtype)
    return {"k": zeros, "v": zeros}


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
                 rngs: nnx.Rngs, attention: str = "auto", rope_scaling: tuple = (), bias: bool = False):
        self.attn_norm = RMSNorm(dim, eps)
        self.attn = Attention(dim, heads, kv_heads, theta, rngs, attention, rope_scaling, bias)
        self.mlp_norm = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, mlp_dim, rngs)

    def __call__(self, x_BxTxD, positions_BxT, segments_BxT, window: int = 0, gates: "KeyGates | None" = None):
        x_BxTxD = x_BxTxD + self.attn(self.attn_norm(x_BxTxD), positions_BxT, segments_BxT, window, gates)
        x_BxTxD = x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD))
        return constrain(x_BxTxD, ("batch", "length", None))

    def extend(self, x_BxSxD, positions_BxS, cache: dict, window: int = 0, gates: "KeyGates | None" = None):
        """The block over S new positions with a key/value cache (incremental decoding)."""
        attended, cache = self.attn.extend(self.attn_norm(x_BxSxD), positions_BxS, cache, window, gates)
        x_BxSxD = x_BxSxD + attended
        return x_BxSxD + self.mlp(self.mlp_norm(x_BxSxD)), cache


# What the backward pass keeps of each block's forward; everything else is recomputed.
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    # Weight matmuls are kept; attention scores and elementwise work are recomputed.
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # As full, but each layer's input waits for the backward in host memory, not on the device:
    # the copies overlap the next layers' compute (where the platform has a separate host memory).
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=["layer_input"],
        offload_src="device", offload_dst="pinned_host"),
    # As full, but the attention kernels' forward outputs (the attention and its softmax
    # statistics, the size of one activation) are kept, so the backward does not run the
    # forward kernel again. Without a kernel (the XLA attention) this is full.
    "save_attention": lambda primitive, *_, **__: primitive.name == "pallas_call",
}
RECOMPUTE_ALL = ("full", "offload", "save_attention")  # the policies that keep no weight matmul's result


def run_blocks(blocks, x_BxTxD, *args, remat: str = "none", scan: bool = False):
    """Apply a stack of identical blocks, each called as block(x, *args).

    remat: "none", or a REMAT_POLICIES name. scan: one lax.scan over the layers (weights stacked
    per call, so checkpoints do not depend on it) instead of an unrolled loop: the program, and
    its compile time, stay the size of one layer.
    """
    if not len(blocks):
        return x_BxTxD
    graphdef, _ = nnx.split(blocks[0])
    layers = [nnx.split(block)[1] for block in blocks]

    def layer(x, weights):
        return nnx.merge(graphdef, weights)(checkpoint_name(x, "layer_input"), *args), None

    if remat != "none":
        layer = jax.checkpoint(layer, policy=REMAT_POLICIES[remat], prevent_cse=not scan)
    if scan:
        stacked = jax.tree.map(lambda *w: jnp.stack(w), *layers)
        return jax.lax.scan(layer, x_BxTxD, stacked)[0]
    for weights in layers:
        x_BxTxD = layer(x_BxTxD, weights)[0]
    return x_BxTxD


def block_flops(length: int, dim: int, heads: int, kv_heads: int, mlp_dim: int, window: int = 0,
                recompute: str | None = None, causal_pairs: bool = False, attention: str = "xla") -> int:
    """Matmul FLOPs of one Block's forward over one row of `length` positions, as computed; with
    `recompute` (a model.remat value), only what the backward pass computes beyond two forwards
    (the remat's recompute, and a kernel's rescoring). causal_pairs:
    attention over only the query-key pairs the causal mask and window keep, each once (model
    FLOPs), instead of every pair the kernel computes (attention: the resolved model.attention)."""
    head_dim = dim // heads
    inputs = dim * heads * head_dim + 2 * dim * kv_heads * head_dim + 2 * dim * mlp_dim  # q, k, v, gate, up
    attention_out, mlp_out = heads * head_dim * dim, mlp_dim * dim
    if causal_pairs:  # query t keeps min(t + 1, reach) keys
        reach = min(window or length, length)
        pairs = length * reach - reach * (reach - 1) // 2
    else:
        pairs = attention_score_pairs(length, window, attention, head_dim)
    scores_and_values = 2 * 2 * heads * head_dim * pairs
    if recompute is None:
        return 2 * (inputs + attention_out + mlp_out) * length + scores_and_values
    # Gradients need the inputs of every matmul, and the MLP's norm the sum the attention's
    # output feeds; only the MLP's output (the next block's saved input) is not recomputed.
    everything = 2 * (inputs + attention_out) * length + scores_and_values
    kernel = uses_kernel(length, head_dim, attention)
    # A kernel's backward (one kernel for dQ, one for dK and dV) computes the scores and dP in
    # each: 7 attention matmuls where autodiff's backward has 4.
    rescored = 3 * scores_and_values // 2 if kernel else 0
    policy = {"none": 0, "save_dots": scores_and_values, "full": everything, "offload": everything,
              "save_attention": everything - scores_and_values if kernel else everything}
    return policy[recompute] + rescored
