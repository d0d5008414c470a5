"""The byte-level baseline: a decoder-only transformer over bytes, the same blocks as HAT's backbone.

It reads the `backbone_*` sizes of the model config and `byte_window` (0: full causal attention
within a document); the word arrays of a batch are ignored.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from hiermodel.config import ModelConfig
from hiermodel.models.layers import Block, RMSNorm, block_matmul_params, param, run_blocks
from hiermodel.text.words import VOCAB_SIZE


class ByteLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = param(rngs, (VOCAB_SIZE, cfg.backbone_dim), ("vocab", "embed"), fan_in=1)
        self.blocks = nnx.List([
            Block(cfg.backbone_dim, cfg.backbone_heads, cfg.backbone_kv_heads, cfg.backbone_mlp_dim,
                  cfg.rope_theta, cfg.norm_eps, rngs) for _ in range(cfg.backbone_layers)])
        self.norm = RMSNorm(cfg.backbone_dim, cfg.norm_eps)
        self.head = param(rngs, (cfg.backbone_dim, VOCAB_SIZE), ("embed", "vocab"))

    def __call__(self, batch: dict) -> jax.Array:
        """Next-token logits [B, T, V]: position t predicts token t+1."""
        tokens_BxT, segments_BxT = batch["tokens"], batch["segments"]
        positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
        x_BxTxD = jnp.take(self.embed[...], tokens_BxT, axis=0)
        x_BxTxD = run_blocks(self.blocks, x_BxTxD, positions_BxT, segments_BxT, self.cfg.byte_window,
                             remat=self.cfg.remat)
        return (self.norm(x_BxTxD) @ self.head[...]).astype(jnp.float32)


def train_flops(cfg: ModelConfig, num_bytes: float, num_words: float, row_bytes: int, row_words: int) -> float:
    """Estimated training FLOPs (3x forward): matmuls at 2 per weight, attention over the mean context."""
    per_byte = (cfg.backbone_layers * block_matmul_params(cfg.backbone_dim, cfg.backbone_heads,
                                                          cfg.backbone_kv_heads, cfg.backbone_mlp_dim)
                + cfg.backbone_dim * VOCAB_SIZE)
    context = min(cfg.byte_window or row_bytes, row_bytes) / 2
    attention = 4 * context * cfg.backbone_dim * cfg.backbone_layers
    return 3 * num_bytes * (2 * per_byte + attention)
