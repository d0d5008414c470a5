"""M1 in integers: a bit-exact inference path for the byte LM behind Equal-Info Windows.

Float logits change with the batch size, padding, device count, platform and cache path; the
coder needs CDFs that never do (REFERENCE.md section 3). `quantize` turns a trained float ByteLM
into an IntegerLM whose inference is integer arithmetic only, so no summation order, fused
multiply-add or transcendental function can change a result:

- Weights are int8 per output column; activations are int8 before every matmul, and every
  matmul accumulates int8 x int8 products in int32.
- Every rescaling is an integer multiply and a rounding shift, m / 2**s. Quantisation picks one
  free scale at each site (a weight column's, a free activation's) so that m / 2**s is the exact
  ratio of scales, and m is small enough that no product leaves int32.
- RMSNorm shifts each row to 11 or 12 bits, sums squares in int32, takes an integer square root
  by bisection and one reciprocal per row; its gain is folded into the following weights.
  Divisions are per row (norms, softmax totals); elements are multiplied by the reciprocal.
- exp is 2**-(y / 256) for y in 1/256 bits: a 256-entry table of one octave, shifted by whole
  octaves (softmax of attention and of the next-byte distribution). SiLU is a table over the
  quantised gate, RoPE's cos and sin are tables per position; all were built in float64 when
  quantising and are stored with the model.
- The residual stream is int32 at one scale (the calibrated maximum at 2**18).

The saved .npz (format FORMAT_VERSION) holds every integer and their fingerprint; compressor and
decompressor that load the same file compute the same CDFs on any machine.
"""

import dataclasses
import hashlib
import json
import math
import typing
import zipfile
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hiermodel import storage
from hiermodel.compress.predictor import CDF_BITS
from hiermodel.errors import UserError
from hiermodel.models.layers import dense_attention, rope
from hiermodel.text.words import BOS_ID, VOCAB_SIZE

FORMAT_VERSION = 1
DEFAULT_MAX_CONTEXT = 64  # BOS and 63 bytes: a 16-bit window holds about 5
MAX_CONTEXT_LIMIT = 4096  # attention totals stay below 2**31 up to 2**16 positions
BYTES = 256  # the symbols with probability: BOS and the reserved id never occur as data
INT8_MAX = 127
INT32_MAX = 2**31 - 1
EXP_FRACTION_BITS = 8  # exp is tabulated in steps of 1/256 bit
EXP_ONE_BITS = 15  # exp(0) = 2**15
LOGIT_UNIT = math.log(2.0) / 2**EXP_FRACTION_BITS  # nats per step of the integer logits and scores
ROPE_BITS = 14
UNIT_BITS = 15  # a normalised row (|x| / rms <= 1) and attention shares are fractions of 2**15
RESIDUAL_BITS = 18  # the calibrated residual maximum; coarser leaves requantisation more room
RESIDUAL_LIMIT = 2**29  # the stream saturates here: a sum with any requantised output fits int32
LOGIT_LIMIT = 2**24  # |integer logits| (2**16 bits, far past any real logit): differences fit int32
GATE_STEPS = 2048  # SiLU table: the gate in 2048 steps either side of zero up to its calibrated maximum
SILU_LIMIT = 2**12 - 1
UP_LIMIT = 2**11
CDF_TOTAL = 2**CDF_BITS
CDF_SHARED = CDF_TOTAL - BYTES  # what is shared out by probability after each byte's 1
CALIBRATION_ROWS = 1024


@dataclasses.dataclass(frozen=True)
class ModelShape:
    layers: int
    dim: int
    heads: int
    kv_heads: int
    mlp_dim: int
    max_context: int

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def position_flops(self) -> int:
        """Matmul FLOPs of one position, averaged over a full causal row of max_context (an upper
        bound for the short contexts of windows): what the coder is charged per M1 step."""
        from hiermodel.models.layers import block_flops

        block = block_flops(self.max_context, self.dim, self.heads, self.kv_heads, self.mlp_dim)
        return self.layers * block // self.max_context + 2 * self.dim * BYTES


def _pytree(cls):
    return jax.tree_util.register_dataclass(dataclasses.dataclass(frozen=True)(cls))


@_pytree
class Requant:
    """out = round(x * mult / 2**shift), per channel (or one for all); shift >= 1."""

    mult: jax.Array
    shift: jax.Array


@_pytree
class QLinear:
    weight: jax.Array  # int8 [..., in, out]
    requant: Requant  # from the int32 accumulator to the output's scale


@_pytree
class QBlocks:
    """The transformer blocks, each array stacked over layers (leading axis)."""

    attn_norm: Requant  # x / rms(x) at 2**15 to int8, per channel (the norm's gain folded in later)
    wqkv: QLinear  # queries, keys, values: one matmul
    scores: Requant  # from q.k to logit steps (scalar per layer)
    wo: QLinear
    mlp_norm: Requant
    w_gate_up: QLinear  # gate (to SiLU table indices) and up, one matmul
    silu_table: jax.Array  # [layers, 2 * GATE_STEPS + 1]
    hidden: Requant  # silu * up to int8
    w_down: QLinear


@_pytree
class IntegerLM:
    """A quantised ByteLM: integer arrays and their static shape."""

    shape: ModelShape = dataclasses.field(metadata={"static": True})
    embed: jax.Array  # int32 [vocab, dim] at the residual scale
    blocks: QBlocks
    norm: Requant
    head: QLinear  # the 256 byte columns, to logit steps
    rope_cos: jax.Array  # int32 [max_context, head_dim / 2], times 2**ROPE_BITS
    rope_sin: jax.Array
    exp_table: jax.Array  # int32 [2**EXP_FRACTION_BITS]: 2**15 * 2**-(i / 256)

    def fingerprint(self) -> str:
        """sha256 of the shape and every integer: equal fingerprints, equal CDFs."""
        digest = hashlib.sha256(json.dumps(dataclasses.asdict(self.shape), sort_keys=True).encode())
        for name, array in sorted(_named_arrays(self).items()):
            array = np.ascontiguousarray(array)
            digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
            digest.update(array.tobytes())
        return digest.hexdigest()

    def save(self, path: str | Path) -> None:
        header = {"format": FORMAT_VERSION, "shape": dataclasses.asdict(self.shape), "fingerprint": self.fingerprint()}
        with open(path, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, header=np.frombuffer(json.dumps(header).encode(), np.uint8), **_named_arrays(self))

    @classmethod
    def load(cls, path: str | Path) -> "IntegerLM":
        """The model saved at `path`, or a UserError naming the file."""
        return _load(str(path))

    @classmethod
    def from_run(cls, run_dir: str, max_context: int = DEFAULT_MAX_CONTEXT,
                 calibration: Sequence[bytes] | None = None) -> "IntegerLM":
        """Quantise the latest checkpoint of a byte run (calibrated on `calibration` documents,
        by default the built-in training text)."""
        from hiermodel.run import load_params

        config, _, _, params = load_params(run_dir)
        return quantize(params, config, calibration, max_context)


# ---------------------------------------------------------------------------------------------
# Integer arithmetic


def _round_shift(x, shift):
    """round(x / 2**shift), halves up, for shift >= 1, without overflowing x's range."""
    return ((x >> (shift - 1)) + 1) >> 1


def _requant(x, requant: Requant):
    return _round_shift(x * requant.mult, requant.shift)


def _isqrt(n):
    """floor(sqrt(n)) for 0 <= n < 2**30, bit by bit (float sqrt may be approximate on a GPU)."""
    root = jnp.zeros_like(n)
    for bit in range(14, -1, -1):
        candidate = root | (1 << bit)
        root = jnp.where(candidate * candidate <= n, candidate, root)
    return root


def _int8(x):
    return jnp.clip(x, -INT8_MAX, INT8_MAX).astype(jnp.int8)


def _matmul(x_int8, weight_int8):
    return jnp.matmul(x_int8, weight_int8, preferred_element_type=jnp.int32)


def _exp_neg(steps, exp_table):
    """2**15 * 2**-(steps / 256) for steps >= 0: a fraction of an octave from the table, then
    whole octaves by shifting (16 or more leave 0)."""
    fraction = steps & (2**EXP_FRACTION_BITS - 1)
    octaves = jnp.minimum(steps >> EXP_FRACTION_BITS, 16)
    return exp_table[fraction] >> octaves


def _norm_bits(dim: int) -> int:
    """Bits a row keeps before squaring: dim * 2**(2 * bits) <= 2**30."""
    return (30 - math.ceil(math.log2(dim))) // 2


def _normalize(h_BxTxD, norm: Requant):
    """RMSNorm without its gain (folded into the next weights), as int8 at per-channel scales.
    Scaling a row does not change its direction, so each is first brought to _norm_bits bits,
    whatever its magnitude, and its sum of squares fits int32; then x / root <= 1 at 2**15."""
    bits = _norm_bits(h_BxTxD.shape[-1])
    peak = jnp.max(jnp.abs(h_BxTxD), axis=-1, keepdims=True)
    excess = (32 - jax.lax.clz(peak)) - bits
    x = jnp.where(excess > 0, _round_shift(h_BxTxD, jnp.maximum(excess, 1)), h_BxTxD << jnp.maximum(-excess, 0))
    root = jnp.maximum(_isqrt(jnp.sum(x * x, axis=-1, keepdims=True)), 1)  # >= every |x|
    unit = _round_shift(x * (2**30 // root), 30 - UNIT_BITS)
    return _int8(_requant(unit, norm))


def _rope(x_BxTxHxDh, cos_BxTxF, sin_BxTxF):
    """Rotate split halves by the position's tabulated angle; a rotation keeps the pair's norm,
    which quantisation kept within 127."""
    x1, x2 = jnp.split(x_BxTxHxDh, 2, axis=-1)
    cos, sin = cos_BxTxF[:, :, None, :], sin_BxTxF[:, :, None, :]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return _int8(_round_shift(rotated, ROPE_BITS))


def _project(x_int8, linear: QLinear):
    return _requant(_matmul(x_int8, linear.weight), linear.requant)


def _layer(blocks: QBlocks, index: int) -> QBlocks:
    return jax.tree.map(lambda a: a[index], blocks)


def _qkv(model: IntegerLM, block: QBlocks, h_BxTxD, positions_BxT):
    """Queries, keys (both rotated) and values of new positions, int8 [B, T, heads, head_dim]."""
    shape = model.shape
    b, t, _ = h_BxTxD.shape
    qkv = jnp.clip(_project(_normalize(h_BxTxD, block.attn_norm), block.wqkv), -INT8_MAX, INT8_MAX)
    rotating = shape.heads + shape.kv_heads  # queries then keys, one rotation for both
    rotated = _rope(qkv[..., :rotating * shape.head_dim].reshape(b, t, rotating, shape.head_dim),
                    model.rope_cos[positions_BxT], model.rope_sin[positions_BxT])
    v = qkv[..., rotating * shape.head_dim:].astype(jnp.int8).reshape(b, t, shape.kv_heads, shape.head_dim)
    return rotated[:, :, :shape.heads], rotated[:, :, shape.heads:], v


def _scores(q_BxKxGxTxDh, keys_BxKxDhxL):
    """q.k in int32 [B, K, G, T, L] as a fused multiply-reduce: on CPU, XLA's batched dots of
    these small per-row matrices are several times slower."""
    products = q_BxKxGxTxDh[..., None].astype(jnp.int32) * keys_BxKxDhxL[:, :, None, None].astype(jnp.int32)
    return jnp.sum(products, axis=-2)


def _mix(shares_BxKxGxTxL, values_BxKxLxDh):
    """sum of share * value over positions in int32 [B, K, G, T, Dh], written as one sum of
    per-position terms, which XLA on CPU fuses into a loop faster than its reduction."""
    values = values_BxKxLxDh[:, :, None, None].astype(jnp.int32)
    return sum(shares_BxKxGxTxL[..., slot, None] * values[..., slot, :] for slot in range(values.shape[-2]))


def _attend(model: IntegerLM, block: QBlocks, q_BxTxHxDh, keys_BxKxDhxL, values_BxKxLxDh, allowed_BxTxL):
    """Softmax attention in integers: scores to 1/256-bit steps below the row's maximum, the
    tabulated exp, shares of 2**15 (rounded down, so they sum to at most 2**15), then the
    values' weighted sum, rounded (it stays within int8)."""
    b, t, h, dh = q_BxTxHxDh.shape
    kv = keys_BxKxDhxL.shape[1]
    q_BxKxGxTxDh = q_BxTxHxDh.reshape(b, t, kv, h // kv, dh).transpose(0, 2, 3, 1, 4)
    scores_BxKxGxTxL = _scores(q_BxKxGxTxDh, keys_BxKxDhxL)
    allowed = allowed_BxTxL[:, None, None]
    top = jnp.max(jnp.where(allowed, scores_BxKxGxTxL, -INT32_MAX), axis=-1, keepdims=True)
    below = _requant(jnp.where(allowed, top - scores_BxKxGxTxL, 0), block.scores)
    weights_BxKxGxTxL = jnp.where(allowed, _exp_neg(below, model.exp_table), 0)
    total = jnp.sum(weights_BxKxGxTxL, axis=-1, keepdims=True)  # >= 2**15, from the top score
    shares = (weights_BxKxGxTxL * (2**30 // total)) >> (30 - UNIT_BITS)
    mixed_BxKxGxTxDh = _mix(shares, values_BxKxLxDh)
    out = _round_shift(mixed_BxKxGxTxDh, UNIT_BITS).astype(jnp.int8)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h * dh)


def _add_residual(h, delta):
    return jnp.clip(h + delta, -RESIDUAL_LIMIT, RESIDUAL_LIMIT)


def _mlp(block: QBlocks, x_BxTxD):
    gate, up = jnp.split(_project(x_BxTxD, block.w_gate_up), 2, axis=-1)
    gate = jnp.clip(gate, -GATE_STEPS, GATE_STEPS)
    up = jnp.clip(up, -UP_LIMIT, UP_LIMIT)
    hidden = _int8(_requant(block.silu_table[gate + GATE_STEPS] * up, block.hidden))
    return _project(hidden, block.w_down)


def _finish_block(model: IntegerLM, block: QBlocks, h_BxTxD, q, keys, values, allowed_BxTxL):
    attended = _attend(model, block, q, keys, values, allowed_BxTxL)
    h_BxTxD = _add_residual(h_BxTxD, _project(attended, block.wo))
    return _add_residual(h_BxTxD, _mlp(block, _normalize(h_BxTxD, block.mlp_norm)))


def _frequencies(model: IntegerLM, h_BxTxD):
    """Next-byte frequencies [B, T, 256] summing to 2**14 (int16): 1 per byte, the rest shared
    in proportion to the tabulated exp of the logits (rounded down), what rounding left over
    to the most likely byte (the first of equals)."""
    logits = jnp.clip(_project(_normalize(h_BxTxD, model.norm), model.head), -LOGIT_LIMIT, LOGIT_LIMIT)
    top = jnp.max(logits, axis=-1, keepdims=True)
    weights = _exp_neg(top - logits, model.exp_table)
    total = jnp.sum(weights, axis=-1, keepdims=True)  # 2**15 (the top byte) to 2**23
    frequencies = 1 + ((weights * (CDF_SHARED * 2**16 // total)) >> 16)
    left_over = CDF_TOTAL - jnp.sum(frequencies, axis=-1, keepdims=True)
    byte = jnp.arange(BYTES)
    top_byte = jnp.min(jnp.where(logits == top, byte, BYTES), axis=-1, keepdims=True)
    return (frequencies + jnp.where(byte == top_byte, left_over, 0)).astype(jnp.int16)


def cumulative(frequencies) -> np.ndarray:
    """CDFs [..., 257] (int64) of frequencies [..., 256]: exact integer sums, on the host (twice
    as fast as XLA's cumsum on CPU)."""
    frequencies = np.asarray(frequencies)
    cdf = np.zeros(frequencies.shape[:-1] + (BYTES + 1,), np.int64)
    cdf[..., 1:] = frequencies
    return np.cumsum(cdf, axis=-1, out=cdf)  # in place in int64: ten times faster than from int16


@jax.jit
def _sequence_frequencies(model: IntegerLM, tokens_BxT):
    b, t = tokens_BxT.shape
    positions_BxT = jnp.broadcast_to(jnp.arange(t), (b, t))
    causal_BxTxT = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    h = model.embed[tokens_BxT]
    for index in range(model.shape.layers):
        block = _layer(model.blocks, index)
        q, k, v = _qkv(model, block, h, positions_BxT)
        h = _finish_block(model, block, h, q, k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3), causal_BxTxT)
    return _frequencies(model, h)


def sequence_cdfs(model: IntegerLM, tokens_BxT) -> np.ndarray:
    """CDFs [B, T, 257] of whole rows from position 0 at once, without a cache: the same
    integers as the predictor's steps."""
    if np.shape(tokens_BxT)[1] > model.shape.max_context:
        raise ValueError(f"rows of {np.shape(tokens_BxT)[1]} tokens: at most max_context={model.shape.max_context}")
    return cumulative(_sequence_frequencies(model, jnp.asarray(tokens_BxT, jnp.int32)))


# ---------------------------------------------------------------------------------------------
# The predictor


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PredictorState:
    """Keys and values of every row's positions (slot i holds position i), per layer."""

    keys: jax.Array  # int8 [layers, padded batch, kv_heads, head_dim, max_context]
    values: jax.Array  # int8 [layers, padded batch, kv_heads, max_context, head_dim]
    batch: int = dataclasses.field(metadata={"static": True})


def _spans(max_context: int) -> list[int]:
    """How many cache slots a step attends over: the first of these above every row's position.
    Slots past a row's position weigh exactly 0, so the span changes speed, never a result."""
    return sorted({min(2**i, max_context) for i in range(3, max_context.bit_length() + 1)})


def _predict_step(model: IntegerLM, keys, values, tokens_B, positions_B, span: int):
    slots_L = jnp.arange(span)
    rows_B = jnp.arange(tokens_B.shape[0])
    allowed_Bx1xL = (slots_L <= positions_B[:, None])[:, None, :]  # later slots hold stale positions
    h = model.embed[tokens_B][:, None, :]
    for index in range(model.shape.layers):
        block = _layer(model.blocks, index)
        q, k, v = _qkv(model, block, h, positions_B[:, None])
        keys = keys.at[index, rows_B, :, :, positions_B].set(k[:, 0])
        values = values.at[index, rows_B, :, positions_B, :].set(v[:, 0])
        h = _finish_block(model, block, h, q, keys[index, ..., :span], values[index, :, :, :span], allowed_Bx1xL)
    return keys, values, _frequencies(model, h)[:, 0]


class IntegerPredictor:
    """The Predictor of hiermodel.compress.predictor for an IntegerLM: one jitted call per byte
    for the whole batch, rows sharded over `devices` (default: the first device).

    step consumes the state it is given (its buffers are reused): keep only the returned one.
    `positions` counts the rows fed past position 0: the coder's work, as BOS at position 0 is
    the same for every window (idle rows of a batch sit there too).
    """

    def __init__(self, model: IntegerLM, devices: Sequence[jax.Device] | None = None):
        self.shape = model.shape
        self.max_context = model.shape.max_context
        mesh = Mesh(np.array(list(devices or jax.devices()[:1])), ("rows",))
        self._mesh, self._devices = mesh, mesh.size
        self._rows = NamedSharding(mesh, P("rows"))
        self._cache = NamedSharding(mesh, P(None, "rows"))
        self._model = jax.device_put(model, NamedSharding(mesh, P()))
        self._step = jax.jit(_predict_step, donate_argnums=(1, 2), static_argnames="span")
        self._spans = _spans(self.max_context)
        self.positions = 0

    def start(self, batch: int) -> PredictorState:
        padded = -(-batch // self._devices) * self._devices
        shape = self.shape
        rows = (shape.layers, padded, shape.kv_heads)
        zeros = lambda *slot: jax.device_put(np.zeros(rows + slot, np.int8), self._cache)
        return PredictorState(zeros(shape.head_dim, shape.max_context), zeros(shape.max_context, shape.head_dim), batch)

    def step(self, state: PredictorState, tokens_B: np.ndarray, positions_B: np.ndarray):
        """Feed each row its token at its position: the new state and the next byte's CDFs."""
        tokens_B, positions_B = np.asarray(tokens_B, np.int32), np.asarray(positions_B, np.int32)
        if tokens_B.shape != (state.batch,) or positions_B.shape != (state.batch,):
            raise ValueError(f"tokens {tokens_B.shape} and positions {positions_B.shape}: the state has "
                             f"{state.batch} rows")
        if state.batch and not (0 <= tokens_B.min() and tokens_B.max() < VOCAB_SIZE):
            raise ValueError(f"tokens must lie in [0, {VOCAB_SIZE})")
        if state.batch and not (0 <= positions_B.min() and positions_B.max() < self.max_context):
            raise ValueError(f"positions must lie in [0, {self.max_context}) (max_context)")
        self.positions += int(np.count_nonzero(positions_B))
        pad = state.keys.shape[1] - state.batch
        put = lambda a: jax.device_put(np.pad(a, (0, pad)) if pad else a, self._rows)
        span = next(s for s in self._spans if s > positions_B.max(initial=0))
        with jax.set_mesh(self._mesh):  # its own, whatever mesh the caller trains or generates on
            keys, values, frequencies = self._step(self._model, state.keys, state.values, put(tokens_B),
                                                   put(positions_B), span=span)
        return PredictorState(keys, values, state.batch), cumulative(np.asarray(frequencies)[:state.batch])


# ---------------------------------------------------------------------------------------------
# Quantisation


def _multipliers(ratio, budget: int, round_up: bool, site: str):
    """(m, s) with m <= budget and 1 <= s <= 30, m / 2**s the closest to `ratio` from above
    (round_up) or below, m as large as the budget allows. The caller moves a free scale to make
    m / 2**s exact, so requantising loses nothing but the final rounding."""
    ratio = np.maximum(np.asarray(ratio, np.float64), 1e-30)
    shift = np.clip(np.floor(np.log2(budget / ratio)), 1, 30)
    mult = (np.ceil if round_up else np.floor)(ratio * 2.0**shift)
    if np.any(mult < 1) or np.any(mult > budget):
        raise ValueError(f"{site}: scale ratio {float(ratio.min()):.3g}..{float(ratio.max()):.3g} "
                         f"cannot be requantised in int32")
    return mult.astype(np.int64), shift.astype(np.int64)


def _accumulator_budget(fan_in: int) -> int:
    """The largest multiplier of an int8 x int8 accumulator over fan_in terms within int32."""
    return INT32_MAX // (INT8_MAX * INT8_MAX * fan_in)


def _quantize_linear(weight_IxO, in_scale_I, out_scale_O, site: str):
    """int8 weights per output column, at a column scale moved up (by under 2% for fan-ins up
    to 1024) so that the requantisation from the accumulator to out_scale is exact."""
    real_IxO = np.asarray(in_scale_I, np.float64).reshape(-1, 1) * weight_IxO  # per input step
    out_scale_O = np.broadcast_to(np.asarray(out_scale_O, np.float64), real_IxO.shape[1:])
    column_scale0 = np.abs(real_IxO).max(axis=0) / INT8_MAX
    mult, shift = _multipliers(column_scale0 / out_scale_O, _accumulator_budget(real_IxO.shape[0]), True, site)
    column_scale = mult / 2.0**shift * out_scale_O
    weight = np.rint(real_IxO / column_scale)
    assert np.abs(weight).max() <= INT8_MAX, site
    return {"weight": weight.astype(np.int8), "requant": {"mult": mult, "shift": shift}}


def _quantize_norm(peaks_D, dim: int):
    """(the Requant from x / rms at 2**15 to int8, the per-channel scales of that int8) for the
    calibrated peaks of x / rms; each scale moved up to make the requantisation exact."""
    unit_scale = math.sqrt(dim) / 2**UNIT_BITS  # x / root is x / rms / sqrt(dim)
    mult, shift = _multipliers(unit_scale / (_floored(peaks_D) / INT8_MAX), 2**16 - 1, False, "RMSNorm")
    return {"mult": mult, "shift": shift}, unit_scale * 2.0**shift / mult


def _floored(peaks):
    """Calibrated peaks with a floor, so a channel that never moved still gets a sane scale."""
    peaks = np.asarray(peaks, np.float64)
    return np.maximum(peaks, max(1e-3 * peaks.max(), 1e-6))


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _quantize_block(weights: dict, stats: dict, shape: ModelShape, residual_scale: float) -> dict:
    d, h, kv, dh, f = shape.dim, shape.heads, shape.kv_heads, shape.head_dim, shape.mlp_dim
    attn = weights["attn"]
    attn_norm, attn_in_scale = _quantize_norm(stats["attn_in"], d)
    gain = np.asarray(weights["attn_norm"]["scale"], np.float64)[:, None]
    q_scale = stats["q"] / INT8_MAX
    # The key scale is the free one of the scores: picked so that q.k to logit steps is exact.
    score_budget = INT32_MAX // (2 * INT8_MAX * INT8_MAX * dh)
    score_ratio = q_scale * (stats["k"] / INT8_MAX) / math.sqrt(dh) / LOGIT_UNIT
    score_mult, score_shift = _multipliers(score_ratio, score_budget, True, "attention scores")
    k_scale = score_mult / 2.0**score_shift * math.sqrt(dh) * LOGIT_UNIT / q_scale
    v_scale = _floored(stats["v"]) / INT8_MAX  # per channel; the attended output keeps it
    qkv = np.concatenate([attn["wq"].reshape(d, h * dh), attn["wk"].reshape(d, kv * dh),
                          attn["wv"].reshape(d, kv * dh)], axis=1)
    qkv_scale = np.concatenate([np.full(h * dh, q_scale), np.full(kv * dh, k_scale), v_scale])
    block = {
        "attn_norm": attn_norm,
        "wqkv": _quantize_linear(gain * qkv, attn_in_scale, qkv_scale, "queries, keys and values"),
        "scores": {"mult": score_mult, "shift": score_shift},
        "wo": _quantize_linear(attn["wo"].reshape(h * dh, d), np.tile(v_scale.reshape(kv, 1, dh), (1, h // kv, 1)),
                               residual_scale, "wo"),
    }
    mlp = weights["mlp"]
    mlp_norm, mlp_in_scale = _quantize_norm(stats["mlp_in"], d)
    gain = np.asarray(weights["mlp_norm"]["scale"], np.float64)[:, None]
    gate_step = max(float(stats["gate"]), 1e-6) / GATE_STEPS
    silu_scale = _silu(GATE_STEPS * gate_step) / SILU_LIMIT
    silu_table = np.rint(_silu(np.arange(-GATE_STEPS, GATE_STEPS + 1) * gate_step) / silu_scale)
    up_scale = _floored(stats["up"]) / UP_LIMIT
    # The hidden scale is the free one here: moved down so that silu * up to int8 is exact.
    hidden_budget = INT32_MAX // (SILU_LIMIT * UP_LIMIT)
    hidden_ratio = silu_scale * up_scale / (_floored(stats["hidden"]) / INT8_MAX)
    hidden_mult, hidden_shift = _multipliers(hidden_ratio, hidden_budget, False, "SwiGLU hidden")
    hidden_scale = silu_scale * up_scale * 2.0**hidden_shift / hidden_mult
    return block | {
        "mlp_norm": mlp_norm,
        "w_gate_up": _quantize_linear(gain * np.concatenate([mlp["w_gate"], mlp["w_up"]], axis=1), mlp_in_scale,
                                      np.concatenate([np.full(f, gate_step), up_scale]), "gate and up"),
        "silu_table": silu_table.astype(np.int64),
        "hidden": {"mult": hidden_mult, "shift": hidden_shift},
        "w_down": _quantize_linear(mlp["w_down"], hidden_scale, residual_scale, "w_down"),
    }


def _rope_tables(shape: ModelShape, theta: float):
    half = shape.head_dim // 2
    angles = np.arange(shape.max_context)[:, None] * theta ** (-np.arange(half) / half)
    return np.rint(np.cos(angles) * 2**ROPE_BITS), np.rint(np.sin(angles) * 2**ROPE_BITS)


def _pure_params(model_or_params) -> dict:
    if isinstance(model_or_params, nnx.Module):
        model_or_params = nnx.to_pure_dict(nnx.state(model_or_params, nnx.Param))
    return jax.tree.map(lambda a: np.asarray(a, np.float64), model_or_params)


def _model_shape(model_config, max_context: int) -> ModelShape:
    if model_config.kind != "byte" or model_config.gate.layer:
        raise UserError(f"model.kind={model_config.kind!r}{' with a delete gate' if model_config.gate.layer else ''}: "
                        "only an ungated byte model (model.kind=byte) can be M1")
    window = model_config.byte_window
    if not 2 <= max_context <= MAX_CONTEXT_LIMIT or (window and max_context > window):
        raise UserError(f"max_context={max_context}: use 2 to {MAX_CONTEXT_LIMIT}, at most model.byte_window")
    return ModelShape(model_config.backbone_layers, model_config.backbone_dim, model_config.backbone_heads,
                      model_config.backbone_kv_heads, model_config.backbone_mlp_dim, max_context)


def quantize(model_or_params, config, calibration: Sequence[bytes] | None = None,
             max_context: int = DEFAULT_MAX_CONTEXT) -> IntegerLM:
    """The IntegerLM of a float ByteLM (module or parameter dict) and its Config (or ModelConfig),
    its activation ranges calibrated on rows of max_context - 1 bytes of the `calibration`
    documents (default: the built-in training text). Runs once, on any device: the saved
    result, not this function, is what must be the same on both sides of a coder."""
    model_config = getattr(config, "model", config)
    shape = _model_shape(model_config, max_context)
    params = _pure_params(model_or_params)
    if calibration is None:
        from hiermodel.data.builtin import builtin_documents

        calibration = [text for _, text in builtin_documents("train")]
    stats = _calibrate(params, model_config, calibration, max_context - 1)
    residual_scale = max(float(stats["residual"]), np.abs(params["embed"]).max()) / 2**RESIDUAL_BITS
    blocks = [_quantize_block(params["blocks"][i], {k: v[i] for k, v in stats["layers"].items()}, shape,
                              residual_scale) for i in range(shape.layers)]
    final_norm, final_in_scale = _quantize_norm(stats["final_in"], shape.dim)
    gain = np.asarray(params["norm"]["scale"], np.float64)[:, None]
    cos, sin = _rope_tables(shape, model_config.rope_theta)
    named = {
        "embed": np.rint(params["embed"] / residual_scale),
        "blocks": jax.tree.map(lambda *a: np.stack(a), *blocks),
        "norm": final_norm,
        "head": _quantize_linear(gain * params["head"][:, :BYTES], final_in_scale, LOGIT_UNIT, "head"),
        "rope_cos": cos, "rope_sin": sin,
        "exp_table": np.rint(2.0**EXP_ONE_BITS * 2.0 ** (-np.arange(2**EXP_FRACTION_BITS) / 2**EXP_FRACTION_BITS)),
    }
    return _from_tree(IntegerLM, named, shape)


def _from_tree(cls, tree: dict, shape: ModelShape):
    """The dataclass `cls` from nested dicts of arrays: int8 weights, int32 everything else."""
    hints = typing.get_type_hints(cls)
    fields = {}
    for field in dataclasses.fields(cls):
        if field.metadata.get("static"):
            fields[field.name] = shape
        elif dataclasses.is_dataclass(hints[field.name]):
            fields[field.name] = _from_tree(hints[field.name], tree[field.name], shape)
        else:
            array = np.asarray(tree[field.name])
            dtype = np.int8 if field.name == "weight" else np.int32
            assert np.all(array == array.astype(dtype)), f"{cls.__name__}.{field.name} does not fit {dtype}"
            fields[field.name] = jnp.asarray(array.astype(dtype))
    return cls(**fields)


def _named_arrays(model: IntegerLM) -> dict[str, np.ndarray]:
    flat, _ = jax.tree_util.tree_flatten_with_path(model)
    return {".".join(str(key.name) for key in path): np.asarray(leaf) for path, leaf in flat}


def _nested(named: dict) -> dict:
    tree = {}
    for name, array in named.items():
        *parents, leaf = name.split(".")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = array
    return tree


def _load(path: str) -> IntegerLM:
    what = f"{path}: not an integer M1 file (made by IntegerLM.save)"
    try:
        with storage.open_file(path) as f, np.load(f, allow_pickle=False) as archive:
            named = {name: archive[name] for name in archive.files}
        header = json.loads(named.pop("header").tobytes())
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, UnicodeDecodeError) as e:
        raise UserError(f"{what} ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(header, dict) or "format" not in header:
        raise UserError(what)
    if header["format"] != FORMAT_VERSION:
        raise UserError(f"{path}: integer M1 format {header['format']}; this hiermodel reads format {FORMAT_VERSION}")
    try:
        shape = ModelShape(**header["shape"])
        model = _from_tree(IntegerLM, _nested(named), shape)
    except (KeyError, TypeError, AssertionError) as e:
        raise UserError(f"{what} (missing or malformed array: {e})") from None
    if set(_named_arrays(model)) != set(named) or model.fingerprint() != header.get("fingerprint"):
        raise UserError(f"{path}: corrupt integer M1 file: its arrays do not match its fingerprint")
    return model


# ---------------------------------------------------------------------------------------------
# The float model, for calibration and comparison


def _unit_rms(x, eps: float):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def _peak(x, valid_BxT, axes=(0, 1)):
    """max |x| over valid positions, per remaining axis."""
    return jnp.max(jnp.where(valid_BxT.reshape(valid_BxT.shape + (1,) * (x.ndim - 2)), jnp.abs(x), 0), axis=axes)


def _pair_norms(x_BxTxHxDh):
    x1, x2 = jnp.split(x_BxTxHxDh, 2, axis=-1)
    return jnp.sqrt(x1 * x1 + x2 * x2)


def float_forward(params: dict, model_config, tokens_BxT, valid_BxT=None):
    """ByteLM's logits [B, T, V] in float32 (rows within model.byte_window), and the activation
    peaks over valid positions that quantisation calibrates on."""
    eps, theta = model_config.norm_eps, model_config.rope_theta
    b, t = tokens_BxT.shape
    valid_BxT = jnp.ones((b, t), bool) if valid_BxT is None else valid_BxT
    positions_BxT = jnp.broadcast_to(jnp.arange(t), (b, t))
    segments_BxT = jnp.zeros((b, t), jnp.int32)
    h = params["embed"][tokens_BxT]
    residual, layers = _peak(h, valid_BxT, (0, 1, 2)), []
    for index in range(len(params["blocks"])):
        block, attn, mlp = params["blocks"][index], params["blocks"][index]["attn"], params["blocks"][index]["mlp"]
        y = _unit_rms(h, eps)
        x = y * block["attn_norm"]["scale"]
        q = jnp.einsum("btd,dhk->bthk", x, attn["wq"])
        k = jnp.einsum("btd,dhk->bthk", x, attn["wk"])
        v = jnp.einsum("btd,dhk->bthk", x, attn["wv"])
        heads, kv, dh = q.shape[2], k.shape[2], q.shape[3]
        out = dense_attention(rope(q, positions_BxT, theta).reshape(b, t, kv, heads // kv, dh),
                              rope(k, positions_BxT, theta), v, segments_BxT, 0)
        stats = {"attn_in": _peak(y, valid_BxT), "q": _peak(_pair_norms(q), valid_BxT, (0, 1, 2, 3)),
                 "k": _peak(_pair_norms(k), valid_BxT, (0, 1, 2, 3)), "v": _peak(v.reshape(b, t, -1), valid_BxT)}
        h = h + jnp.einsum("bthk,hkd->btd", out.reshape(b, t, heads, dh), attn["wo"])
        y = _unit_rms(h, eps)
        x = y * block["mlp_norm"]["scale"]
        gate, up = x @ mlp["w_gate"], x @ mlp["w_up"]
        hidden = jax.nn.silu(gate) * up
        h = h + hidden @ mlp["w_down"]
        residual = jnp.maximum(residual, _peak(h, valid_BxT, (0, 1, 2)))
        layers.append(stats | {"mlp_in": _peak(y, valid_BxT), "gate": _peak(gate, valid_BxT, (0, 1, 2)),
                               "up": _peak(up, valid_BxT), "hidden": _peak(hidden, valid_BxT)})
    y = _unit_rms(h, eps)
    logits = (y * params["norm"]["scale"]) @ params["head"]
    stats = {"residual": residual, "final_in": _peak(y, valid_BxT),
             "layers": jax.tree.map(lambda *a: jnp.stack(a), *layers)}
    return logits, stats


def _context_rows(documents: Sequence[bytes], context: int):
    """Every document cut into pieces of `context` bytes, as rows [R, context + 1] of BOS, the
    bytes, padding; and the bytes per row."""
    pieces = [doc[i:i + context] for doc in documents for i in range(0, len(doc), context)]
    rows = np.full((len(pieces), context + 1), BOS_ID, np.int32)
    for row, piece in zip(rows, pieces):
        row[1:len(piece) + 1] = np.frombuffer(piece, np.uint8)
    return rows, np.array([len(p) for p in pieces], np.int32)


def _valid(lengths_R, context: int):
    return np.arange(context)[None, :] < lengths_R[:, None]


def _calibrate(params: dict, model_config, documents: Sequence[bytes], context: int) -> dict:
    rows, lengths = _context_rows(documents, context)
    if not len(rows):
        raise UserError("quantisation needs calibration text; the documents given are empty")
    chosen = np.linspace(0, len(rows) - 1, min(len(rows), CALIBRATION_ROWS)).astype(int)
    rows, lengths = rows[chosen], lengths[chosen]
    forward = jax.jit(lambda p, tokens, valid: float_forward(p, model_config, tokens, valid)[1])
    float32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    peaks = None
    for start in range(0, len(rows), 256):
        part = slice(start, start + 256)
        inputs_valid = np.arange(context + 1)[None, :] <= lengths[part, None]  # BOS and every byte
        found = forward(float32, rows[part], inputs_valid)
        peaks = found if peaks is None else jax.tree.map(jnp.maximum, peaks, found)
    return jax.tree.map(lambda a: np.asarray(a, np.float64), peaks)


def _bits_per_byte(row_bits, documents: Sequence[bytes], context: int, batch: int) -> float:
    """Bits per byte over the documents cut into rows of `context` bytes, each from a fresh
    context (BOS), as Equal-Info windows reset M1; row_bits(tokens [B, T], targets [B, T]) gives
    the bits of each target."""
    rows, lengths = _context_rows(documents, context)
    total = 0.0
    for start in range(0, len(rows), batch):
        part, valid = rows[start:start + batch], _valid(lengths[start:start + batch], context)
        bits = np.asarray(row_bits(part[:, :-1], np.where(valid, part[:, 1:], 0)), np.float64)
        total += float(bits[valid].sum())
    return total / max(int(lengths.sum()), 1)


def integer_bits_per_byte(model: IntegerLM, documents: Sequence[bytes], context: int | None = None,
                          batch: int = 256) -> float:
    """What coding the documents costs with the integer CDFs, in bits per byte, with the context
    reset every `context` bytes (default max_context - 1)."""
    context = context or model.shape.max_context - 1
    if not 1 <= context < model.shape.max_context:
        raise ValueError(f"context={context}: at most max_context - 1 = {model.shape.max_context - 1}")

    def row_bits(tokens, targets):
        frequencies = np.asarray(_sequence_frequencies(model, jnp.asarray(tokens)))
        return CDF_BITS - np.log2(np.take_along_axis(frequencies, targets[..., None], -1)[..., 0])

    return _bits_per_byte(row_bits, documents, context, batch)


def float_bits_per_byte(model_or_params, config, documents: Sequence[bytes], context: int,
                        batch: int = 256) -> float:
    """The float model's bits per byte under the same context resets, its probabilities
    renormalised over the 256 bytes (as the integer CDFs are)."""
    model_config = getattr(config, "model", config)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), _pure_params(model_or_params))

    @jax.jit
    def row_bits(params, tokens, targets):
        logits = float_forward(params, model_config, tokens)[0][..., :BYTES]
        nats = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], -1)[..., 0]
        return nats / math.log(2.0)

    return _bits_per_byte(lambda tokens, targets: row_bits(params, tokens, targets), documents, context, batch)
