"""The byte-level baseline: a decoder-only transformer over bytes, the same blocks as HAT's backbone.

It reads the `backbone_*` sizes of the model config and `byte_window` (0: full causal attention
within a document); the word arrays of a batch are ignored.
"""

import jax.numpy as jnp
from flax import nnx

from hiermodel.config import ModelConfig
from hiermodel.models.gates import (DeleteGate, empty_gated_caches, extend_gated, gate_flops, reads_kept_keys,
                                     run_gated)
from hiermodel.models.layers import Block, RMSNorm, block_flops, empty_cache, param, run_blocks
from hiermodel.text.words import VOCAB_SIZE


def backbone_block(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    """A block of the backbone-shaped stack (the byte and subword models, HAT's backbone)."""
    return Block(cfg.backbone_dim, cfg.backbone_heads, cfg.backbone_kv_heads, cfg.backbone_mlp_dim, cfg.rope_theta,
                 cfg.norm_eps, rngs, cfg.attention, cfg.rope_scaling.as_tuple(), cfg.attention_bias)


class TransformerLM(nnx.Module):
    """Decoder-only transformer over token ids: embedding, backbone-sized blocks, head."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, window: int, rngs: nnx.Rngs):
        self.cfg, self.window = cfg, window
        # Tied, the embedding is also the output layer, whose logits need weights of 1/sqrt(width).
        self.embed = param(rngs, (vocab_size, cfg.backbone_dim), ("vocab", "embed"),
                           fan_in=cfg.backbone_dim if cfg.tie_embeddings else 1)
        self.blocks = nnx.List([backbone_block(cfg, rngs) for _ in range(cfg.backbone_layers)])
        self.norm = RMSNorm(cfg.backbone_dim, cfg.norm_eps)
        if not cfg.tie_embeddings:
            self.head = param(rngs, (cfg.backbone_dim, vocab_size), ("embed", "vocab"))
        if cfg.gate.layer:
            self.gate = DeleteGate(cfg.backbone_dim, cfg.gate, cfg.norm_eps, rngs)

    def __call__(self, batch: dict, deletion: str = "soft", with_stats: bool = False, training: bool = False):
        """Next-token logits [B, T, V]: position t predicts token t+1. deletion: soft or hard, for
        a gated model (with_stats: also return its statistics, or None; training: a training step's)."""
        tokens_BxT, segments_BxT = batch["tokens"], batch["segments"]
        positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
        x_BxTxD = jnp.take(self.embed[...], tokens_BxT, axis=0)
        stats = None
        if self.cfg.gate.layer:
            x_BxTxD, stats = run_gated(self.blocks, self.gate, x_BxTxD, tokens_BxT, positions_BxT, segments_BxT,
                                       self.window, deletion, remat=self.cfg.remat_of("backbone"),
                                       scan=self.cfg.scan_layers, training=training)
        else:
            x_BxTxD = run_blocks(self.blocks, x_BxTxD, positions_BxT, segments_BxT, self.window,
                                 remat=self.cfg.remat_of("backbone"), scan=self.cfg.scan_layers)
        logits_BxTxV = self.logits(self.norm(x_BxTxD))
        return (logits_BxTxV, stats) if with_stats else logits_BxTxV

    def logits(self, x_BxTxD):
        head_DxV = self.embed[...].T if self.cfg.tie_embeddings else self.head[...]
        return (x_BxTxD @ head_DxV.astype(x_BxTxD.dtype)).astype(jnp.float32)

    def empty_cache(self, batch: int, length: int) -> list[dict]:
        cfg = self.cfg
        caches = [empty_cache(batch, length, cfg.backbone_kv_heads, cfg.backbone_dim // cfg.backbone_heads,
                              self.embed[...].dtype) for _ in range(cfg.backbone_layers)]
        return empty_gated_caches(caches, cfg.gate, cfg.backbone_dim) if cfg.gate.layer else caches

    def extend(self, tokens_BxS, positions_BxS, caches: list[dict]):
        """Next-token logits of S new tokens at the given positions, attending to the caches
        (incremental decoding, hard deletion for a gated model); returns the logits [B, S, V]
        and the updated caches."""
        x_BxSxD = jnp.take(self.embed[...], tokens_BxS, axis=0)
        if self.cfg.gate.layer:
            x_BxSxD, updated = extend_gated(self.blocks, self.gate, x_BxSxD, tokens_BxS, positions_BxS, caches,
                                            self.window)
        else:
            updated = []
            for block, cache in zip(self.blocks, caches):
                x_BxSxD, cache = block.extend(x_BxSxD, positions_BxS, cache, self.window)
                updated.append(cache)
        return self.logits(self.norm(x_BxSxD)), updated


def transformer_flops(cfg: ModelConfig, vocab_size: int, window: int, length: int,
                      recompute: bool = False, causal_pairs: bool = False) -> int:
    """Matmul FLOPs of TransformerLM's forward over one row; with `recompute`, only what the
    backward pass computes again (by the stack's remat); causal_pairs: see block_flops."""
    if recompute:
        return stack_flops(cfg, length, window, cfg.remat_of("backbone"))
    return stack_flops(cfg, length, window, None, causal_pairs) + 2 * length * cfg.backbone_dim * vocab_size


def stack_flops(cfg: ModelConfig, length: int, window: int, recompute: str | None = None,
                causal_pairs: bool = False) -> int:
    """Matmul FLOPs of the backbone-shaped stack over `length` positions; with a gate, its gated
    layers (after the gate, before any full layers) compute every position (soft deletion) and
    attend densely, so counted; with causal_pairs they count the pairs their mask keeps, window
    included."""
    block = lambda w, attention: block_flops(length, cfg.backbone_dim, cfg.backbone_heads, cfg.backbone_kv_heads,
                                             cfg.backbone_mlp_dim, w, recompute, causal_pairs, attention)
    gated = cfg.backbone_layers - cfg.gate.layer - cfg.gate.full_layers if cfg.gate.layer else 0
    gate = gate_flops(cfg.backbone_dim, length) if gated and recompute is None else 0
    # Layers reading gate values attend densely; the full layers do too when they read the kept keys only.
    dense = gated + (cfg.gate.full_layers if gated and reads_kept_keys(cfg.gate) else 0)
    gated_window = window if causal_pairs else 0
    return (cfg.backbone_layers - dense) * block(window, cfg.attention) + dense * block(gated_window, "xla") + gate


class ByteLM(TransformerLM):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        super().__init__(cfg, VOCAB_SIZE, cfg.byte_window, rngs)


def forward_flops(cfg: ModelConfig, row_tokens: int, row_words: int, recompute: bool = False,
                  causal_pairs: bool = False) -> int:
    return transformer_flops(cfg, VOCAB_SIZE, cfg.byte_window, row_tokens, recompute, causal_pairs)
