"""MrT5-style delete gates (REFERENCE.md section 2) for any causal stack of Blocks.

A gate after layer l scores every position: G = k * sigmoid(-(w . norm(h) + b)), in (k, 0).
Layers after it see G added to the logits of each key (soft deletion, training), or run only
on the positions with G > k / 2, compacted to a static capacity (hard deletion, inference).
Either way every position still gets an output for the loss: its own layer-l state plus the
deep update (final - layer-l state) of the last kept position (the soft mode's carry is hard
in the forward pass, soft in the backward unless `carry_gradient` is off), so the two modes
agree when gates saturate. The stack's last `full_layers` layers then run on every position again,
reading every position or (`full_keys`) only the kept ones (and the `full_recent` last ones).
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from hiermodel.config import GateConfig
from hiermodel.models.layers import KeyGates, RMSNorm, param, run_blocks, write_at

DELETION_MODES = ("soft", "hard")


class DeleteGate(nnx.Module):
    def __init__(self, dim: int, cfg: GateConfig, eps: float, rngs: nnx.Rngs):
        self.norm = RMSNorm(dim, eps)
        self.w = param(rngs, (dim, 1), ("embed", None))
        self.b = nnx.Param(jnp.full((1,), cfg.bias, jnp.float32), axes=(None,))
        self.cfg = cfg

    def __call__(self, h_BxNxD, tokens_BxN, keep_BxN, valid_BxN, noisy: bool = False):
        """Gate values [B, N] in float32: 0 where a position must stay (keep), k on padding.
        noisy: with cfg.noise, the learned score gets logistic noise (training only)."""
        k = self.cfg.k
        if self.cfg.mode == "random":
            deleted_BxN = jax.random.uniform(_content_key(tokens_BxN), tokens_BxN.shape) < self.cfg.target
            gates_BxN = jnp.where(deleted_BxN, k, 0.0)
        else:
            if self.cfg.detach:
                h_BxNxD = jax.lax.stop_gradient(h_BxNxD)
            score_BxN = (self.norm(h_BxNxD) @ self.w[...].astype(h_BxNxD.dtype))[..., 0].astype(jnp.float32)
            if noisy and self.cfg.noise:
                score_BxN += self.cfg.noise * jax.random.logistic(_content_key(tokens_BxN), score_BxN.shape)
            gates_BxN = k * jax.nn.sigmoid(-(score_BxN + self.b[...][0]))
        return jnp.where(valid_BxN, jnp.where(keep_BxN, 0.0, gates_BxN), k)


def _content_key(tokens_BxN):
    """A key seeded by the batch's content, so every batch draws differently, reproducibly."""
    return jax.random.fold_in(jax.random.key(0), jnp.sum(tokens_BxN * (jnp.arange(tokens_BxN.shape[1]) + 1)))


def passes(gates_BxN, k: float):
    """Which positions hard deletion keeps: gate values above k / 2."""
    return gates_BxN > k / 2


def key_offsets(gates_BxN, cfg: GateConfig):
    """What the gated layers add to each key's attention logits: its gate value, or with
    cfg.straight_through its hard decision (0 or k) carrying the gate value's gradient."""
    if not cfg.straight_through:
        return gates_BxN
    hard_BxN = jnp.where(passes(gates_BxN, cfg.k), 0.0, cfg.k)
    return gates_BxN + jax.lax.stop_gradient(hard_BxN - gates_BxN)


def capacity(length: int, cfg: GateConfig) -> int:
    """Positions hard deletion keeps per row: the target's share with some slack."""
    return min(length, math.ceil(length * (1.0 - cfg.target) * cfg.capacity_slack))


def gated_layers(cfg: GateConfig, depth: int) -> slice:
    """The layers of a `depth`-layer stack that run on the kept positions only."""
    return slice(cfg.layer, depth - cfg.full_layers)


def _carry_last_kept(kept_BxN, update_BxNxD, initial_BxD=None):
    """Each position's update becomes a kept-weighted running mix: kept 1 takes its own, kept 0
    repeats the previous (a causal copy of the last kept position's update when kept is 0 or 1).
    initial_BxD: the update carried in from before the first position."""
    decay_BxNx1 = (1.0 - kept_BxN)[..., None].astype(update_BxNxD.dtype)
    fresh_BxNxD = kept_BxN[..., None].astype(update_BxNxD.dtype) * update_BxNxD

    def combine(earlier, later):
        (a1, b1), (a2, b2) = earlier, later
        return a1 * a2, a2 * b1 + b2

    decay_BxNx1, carried_BxNxD = jax.lax.associative_scan(combine, (decay_BxNx1, fresh_BxNxD), axis=1)
    return carried_BxNxD if initial_BxD is None else carried_BxNxD + decay_BxNx1 * initial_BxD[:, None]


def reads_kept_keys(cfg: GateConfig) -> bool:
    """Whether the full layers read only the kept positions, through gate values."""
    return cfg.full_keys == "kept"


def _key_gates(cfg: GateConfig, gates_BxN, kept_BxN, dtype, recent: int = 0) -> KeyGates:
    """KeyGates of the gates' offsets, -inf where hard deletion dropped a key (when kept_BxN is given)."""
    offsets_BxN = key_offsets(gates_BxN, cfg)
    if kept_BxN is not None:
        offsets_BxN = jnp.where(kept_BxN, offsets_BxN, -jnp.inf)
    return KeyGates(offsets_BxN.astype(dtype), cfg.logit_cap, recent)


def _full_layer_gates(cfg: GateConfig, gates_BxN, kept_BxN, dtype) -> tuple:
    """The full layers' extra attention argument: none when they read every key, else KeyGates
    (hard when kept_BxN, the positions hard deletion kept, is given)."""
    if not reads_kept_keys(cfg):
        return ()
    return (_key_gates(cfg, gates_BxN, kept_BxN, dtype, cfg.full_recent),)


def run_gated(blocks, gate: DeleteGate, x_BxNxD, tokens_BxN, positions_BxN, segments_BxN, window: int,
              deletion: str, remat: str = "none", scan: bool = False, training: bool = False):
    """The stack with a delete gate after layer gate.cfg.layer (and its last gate.cfg.full_layers
    on every position again). Segment starts are always kept, so the carried update never crosses
    documents. training: the gate's score gets its training noise. Returns the output and the
    gate's statistics."""
    cfg = gate.cfg
    if deletion not in DELETION_MODES:
        raise ValueError(f"deletion={deletion!r}: use soft or hard")
    middle = gated_layers(cfg, len(blocks))
    h_BxNxD = run_blocks(blocks[:cfg.layer], x_BxNxD, positions_BxN, segments_BxN, window, remat=remat, scan=scan)
    valid_BxN = segments_BxN > 0
    starts_BxN = segments_BxN != jnp.pad(segments_BxN[:, :-1], ((0, 0), (1, 0)))
    gates_BxN = gate(h_BxNxD, tokens_BxN, starts_BxN & valid_BxN, valid_BxN, noisy=training)
    deleting = _soft_deletion if deletion == "soft" else _hard_deletion
    update_BxNxD, stats = deleting(blocks[middle], cfg, h_BxNxD, gates_BxN, valid_BxN, positions_BxN,
                                   segments_BxN, window, remat, scan)
    # What hard deletion dropped (overflow included) is gone, as in extend_gated.
    kept_BxN = stats["kept"] > 0 if deletion == "hard" else None
    out_BxNxD = run_blocks(blocks[middle.stop:], h_BxNxD + update_BxNxD, positions_BxN, segments_BxN, window,
                           *_full_layer_gates(cfg, gates_BxN, kept_BxN, h_BxNxD.dtype), remat=remat, scan=scan)
    return out_BxNxD, stats


def _soft_deletion(middle, cfg: GateConfig, h_BxNxD, gates_BxN, valid_BxN, positions_BxN, segments_BxN, window,
                   remat, scan):
    """Every position through the gated layers, deleted keys masked by their gate values; returns
    each position's carried deep update and the statistics."""
    deep_BxNxD = run_blocks(middle, h_BxNxD, positions_BxN, segments_BxN, window,
                            _key_gates(cfg, gates_BxN, None, h_BxNxD.dtype), remat=remat, scan=scan)
    kept_BxN = 1.0 - gates_BxN / cfg.k
    # The carry is hard in the forward pass, as at inference, with the soft weight's gradient
    # (straight through): a half-open gate must not pass half a deep update that hard
    # deletion would then take away.
    hard_BxN = passes(gates_BxN, cfg.k).astype(kept_BxN.dtype)
    carried_BxN = kept_BxN + jax.lax.stop_gradient(hard_BxN - kept_BxN) if cfg.carry_gradient else hard_BxN
    update_BxNxD = _carry_last_kept(carried_BxN, deep_BxNxD - h_BxNxD)
    return update_BxNxD, {"kept": kept_BxN, "gates": gates_BxN, "valid": valid_BxN}


def _hard_deletion(middle, cfg: GateConfig, h_BxNxD, gates_BxN, valid_BxN, positions_BxN, segments_BxN, window,
                   remat, scan):
    """The top-C passing positions, in their original order, through the gated layers; the rest
    are skipped. Returns each position's carried deep update and the statistics."""
    n, c = segments_BxN.shape[1], capacity(segments_BxN.shape[1], cfg)
    passing_BxN = valid_BxN & passes(gates_BxN, cfg.k)
    score_BxN = jnp.where(passing_BxN, gates_BxN, -jnp.inf)
    top_BxC = jax.lax.top_k(score_BxN, c)[1]
    # Kept positions first, in their original order: slot i holds the i-th kept position.
    order_BxC = jnp.sort(jnp.where(jnp.take_along_axis(passing_BxN, top_BxC, axis=1), top_BxC, n + top_BxC), axis=-1)
    chosen_BxC, top_BxC = order_BxC < n, order_BxC % n
    take = lambda a: jnp.take_along_axis(a, top_BxC.reshape(top_BxC.shape + (1,) * (a.ndim - 2)), axis=1)
    compact_BxCxD = take(h_BxNxD)
    segments_BxC = jnp.where(chosen_BxC, take(segments_BxN), -1)  # unused slots see only each other
    deep_BxCxD = run_blocks(middle, compact_BxCxD, take(positions_BxN), segments_BxC, window,
                            KeyGates(take(key_offsets(gates_BxN, cfg)).astype(h_BxNxD.dtype), cfg.logit_cap),
                            remat=remat, scan=scan)
    update_BxCxD = jnp.where(chosen_BxC[..., None], deep_BxCxD - compact_BxCxD, 0)
    kept_BxN = jax.vmap(lambda k, i, c: k.at[i].max(c))(jnp.zeros_like(valid_BxN), top_BxC, chosen_BxC)
    # Position t reads slot (number of kept positions up to t) - 1; before any, no update.
    slot_BxN = jnp.cumsum(kept_BxN, axis=1) - 1
    carried_BxNxD = jnp.take_along_axis(update_BxCxD, jnp.maximum(slot_BxN, 0)[..., None], axis=1)
    update_BxNxD = jnp.where((slot_BxN >= 0)[..., None], carried_BxNxD, 0)
    stats = {"kept": kept_BxN.astype(jnp.float32), "gates": gates_BxN, "valid": valid_BxN,
             "overflow": (passing_BxN & ~kept_BxN).sum(), "capacity": jnp.float32(c / n)}
    return update_BxNxD, stats


def empty_gated_caches(caches: list[dict], cfg: GateConfig, dim: int) -> list[dict]:
    """Key/value caches of a gated stack for extend_gated: the gated layers also keep their keys'
    gate values, and the first of them each position's carried update."""
    caches = [dict(c) for c in caches]
    b, length = caches[0]["k"].shape[:2]
    reading_gates = caches[cfg.layer:] if reads_kept_keys(cfg) else caches[gated_layers(cfg, len(caches))]
    for cache in reading_gates:
        cache["gate"] = jnp.zeros((b, length), jnp.float32)
    caches[cfg.layer]["update"] = jnp.zeros((b, length, dim), caches[0]["k"].dtype)
    return caches


def extend_gated(blocks, gate: DeleteGate, x_BxSxD, tokens_BxS, positions_BxS, caches: list[dict], window: int):
    """Hard deletion for incremental decoding: S new positions (one document per row, position 0
    its start; each row's consecutive, then padding) through the stack with caches. A deleted
    position's key is invisible to every later query (gate value -inf) and its output carries
    the last kept position's update: the same outputs as a hard-deletion forward with no overflow."""
    cfg = gate.cfg
    caches = list(caches)
    for i in range(cfg.layer):
        x_BxSxD, caches[i] = blocks[i].extend(x_BxSxD, positions_BxS, caches[i], window)
    gates_BxS = gate(x_BxSxD, tokens_BxS, positions_BxS == 0, jnp.ones_like(positions_BxS, bool))
    kept_BxS = passes(gates_BxS, cfg.k)
    key_gates = _key_gates(cfg, gates_BxS, kept_BxS, jnp.float32)
    middle = gated_layers(cfg, len(blocks))
    deep_BxSxD = x_BxSxD
    for i in range(middle.start, middle.stop):
        deep_BxSxD, caches[i] = blocks[i].extend(deep_BxSxD, positions_BxS, caches[i], window, key_gates)
    store = caches[cfg.layer]
    start_B = positions_BxS[:, 0]
    before_BxD = jnp.take_along_axis(store["update"], jnp.maximum(start_B - 1, 0)[:, None, None], axis=1)[:, 0]
    initial_BxD = jnp.where((start_B > 0)[:, None], before_BxD, 0)
    update_BxSxD = _carry_last_kept(kept_BxS, deep_BxSxD - x_BxSxD, initial_BxD)
    caches[cfg.layer] = {**store, "update": write_at(store["update"], update_BxSxD, positions_BxS)}
    out_BxSxD = x_BxSxD + update_BxSxD
    full_gates = _full_layer_gates(cfg, gates_BxS, kept_BxS, jnp.float32)
    for i in range(middle.stop, len(blocks)):
        out_BxSxD, caches[i] = blocks[i].extend(out_BxSxD, positions_BxS, caches[i], window, *full_gates)
    return out_BxSxD, caches


def gate_flops(dim: int, length: int) -> int:
    return 2 * dim * length


def forward(model: nnx.Module, batch: dict, deletion: str = "soft", training: bool = False):
    """(logits, gate statistics or None for an ungated model) of one forward; training: a
    training step's (the gate's score noisy, if configured)."""
    return model(batch, deletion=deletion, with_stats=True, training=training)


def deletion_counts(stats: dict | None, k: float) -> dict:
    """Sums over a batch: gated positions, deleted ones (G below k / 2, what hard deletion drops),
    and the soft deletion G / k. With stats None, zeros of the same structure."""
    if stats is None:
        return {name: jnp.zeros((), jnp.float32) for name in ("positions", "deleted", "deleted_soft")}
    valid_BxN = stats["valid"]
    return {"positions": valid_BxN.sum().astype(jnp.float32),
            "deleted": (~passes(stats["gates"], k) & valid_BxN).sum().astype(jnp.float32),
            "deleted_soft": ((stats["gates"] / k) * valid_BxN).sum()}
