"""Hierarchical autoregressive transformer (HAT): byte encoder, word backbone, byte decoder.

Causality: the decoder state of byte t is conditioned on the predictive embedding of the
words completed before t's word. Whether byte t ends its word depends on byte t+1, so
conditioning on t's own word would leak the next byte; the backbone's summary of word i
therefore reaches the predictions from the second byte of word i+1 on (the first byte of a
word is usually the space, which the byte stream predicts well).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from hiermodel.config import ModelConfig
from hiermodel.models.byte import backbone_block, stack_flops
from hiermodel.models.gates import DeleteGate, empty_gated_caches, extend_gated, run_gated
from hiermodel.models.layers import (RECOMPUTE_ALL, Block, RMSNorm, block_flops, empty_cache, param, rope, run_blocks,
                                     write_at)
from hiermodel.text.words import VOCAB_SIZE


def _segment_op(op, data_BxTx, ids_BxT, num_segments: int):
    return jax.vmap(lambda d, i: op(d, i, num_segments=num_segments))(data_BxTx, ids_BxT)


class WordPooling(nnx.Module):
    """A learned query per head attends over exactly one word's byte states.

    Keys carry RoPE of their offset inside the word, so pooling is position-aware and the
    same wherever the word sits in the row.
    """

    def __init__(self, byte_dim: int, heads: int, out_dim: int, theta: float, rngs: nnx.Rngs):
        head_dim = byte_dim // heads
        self.query = param(rngs, (heads, head_dim), ("heads", None), fan_in=1)
        self.wk = param(rngs, (byte_dim, heads, head_dim), ("embed", "heads", None))
        self.wv = param(rngs, (byte_dim, heads, head_dim), ("embed", "heads", None))
        self.wo = param(rngs, (heads, head_dim, out_dim), ("heads", None, "embed"), fan_in=byte_dim)
        self.theta = theta

    def __call__(self, h_BxTxD, words_BxT, num_words: int):
        positions_BxT = jnp.broadcast_to(jnp.arange(h_BxTxD.shape[1]), words_BxT.shape)
        starts_BxW1 = _segment_op(jax.ops.segment_min, positions_BxT, words_BxT, num_words + 1)
        offsets_BxT = positions_BxT - jnp.take_along_axis(starts_BxW1, words_BxT, axis=1)
        k_BxTxHxDh = rope(jnp.einsum("btd,dhk->bthk", h_BxTxD, self.wk[...]), offsets_BxT, self.theta)
        v_BxTxHxDh = jnp.einsum("btd,dhk->bthk", h_BxTxD, self.wv[...])
        scores_BxTxH = jnp.einsum("bthk,hk->bth", k_BxTxHxDh, self.query[...].astype(h_BxTxD.dtype))
        scores_BxTxH = scores_BxTxH.astype(jnp.float32) * k_BxTxHxDh.shape[-1] ** -0.5
        # Softmax within each word: segment max for stability, segment sums for the rest.
        max_BxW1xH = jax.lax.stop_gradient(_segment_op(jax.ops.segment_max, scores_BxTxH, words_BxT, num_words + 1))
        weights_BxTxH = jnp.exp(scores_BxTxH - jnp.take_along_axis(max_BxW1xH, words_BxT[..., None], axis=1))
        total_BxW1xH = _segment_op(jax.ops.segment_sum, weights_BxTxH, words_BxT, num_words + 1)
        weighted_BxTxHxDh = weights_BxTxH[..., None].astype(v_BxTxHxDh.dtype) * v_BxTxHxDh
        pooled_BxW1xHxDh = _segment_op(jax.ops.segment_sum, weighted_BxTxHxDh, words_BxT, num_words + 1)
        pooled_BxW1xHxDh /= jnp.maximum(total_BxW1xH, 1e-30)[..., None].astype(pooled_BxW1xHxDh.dtype)
        return jnp.einsum("bwhk,hkd->bwd", pooled_BxW1xHxDh[:, :num_words], self.wo[...])


def _byte_block(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    return Block(cfg.byte_dim, cfg.byte_heads, cfg.byte_kv_heads, cfg.byte_mlp_dim, cfg.rope_theta, cfg.norm_eps, rngs,
                 cfg.attention)


class DecoderBlock(nnx.Module):
    """Adds a projection of the predictive embedding each byte reads, then a byte self-attention
    block."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.condition = param(rngs, (cfg.backbone_dim, cfg.byte_dim), ("embed", None))
        self.block = _byte_block(cfg, rngs)

    def __call__(self, x_BxTxD, predictive_BxW1xDb, reads_BxT, positions_BxT, segments_BxT, window: int):
        # Projected per word, then copied to the bytes that read it: the same sums as projecting
        # each byte's copy, on a fraction of the rows, and the copy's gradient (a scatter-add)
        # is byte_dim wide instead of backbone_dim.
        conditioning_BxW1xD = predictive_BxW1xDb @ self.condition[...]
        x_BxTxD = x_BxTxD + jnp.take_along_axis(conditioning_BxW1xD, reads_BxT[..., None], axis=1)
        return self.block(x_BxTxD, positions_BxT, segments_BxT, window)


class HAT(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = param(rngs, (VOCAB_SIZE, cfg.byte_dim), ("vocab", "embed"), fan_in=1)
        self.encoder = nnx.List([_byte_block(cfg, rngs) for _ in range(cfg.encoder_layers)])
        self.pool = WordPooling(cfg.byte_dim, cfg.pool_heads, cfg.backbone_dim, cfg.rope_theta, rngs)
        self.backbone = nnx.List([backbone_block(cfg, rngs) for _ in range(cfg.backbone_layers)])
        self.backbone_norm = RMSNorm(cfg.backbone_dim, cfg.norm_eps)
        if cfg.gate.layer:
            self.gate = DeleteGate(cfg.backbone_dim, cfg.gate, cfg.norm_eps, rngs)
        self.first_word = param(rngs, (cfg.backbone_dim,), ("embed",), fan_in=1)
        self.decoder = nnx.List([DecoderBlock(cfg, rngs) for _ in range(cfg.decoder_layers)])
        self.head_norm = RMSNorm(cfg.byte_dim, cfg.norm_eps)
        self.head = param(rngs, (cfg.byte_dim, VOCAB_SIZE), ("embed", "vocab"))

    def __call__(self, batch: dict, deletion: str = "soft", with_stats: bool = False, training: bool = False):
        """Next-token logits [B, T, V]: position t predicts token t+1. deletion: soft or hard, for
        a model whose backbone has a gate over words (with_stats: also return its statistics, or None;
        training: a training step's)."""
        cfg = self.cfg
        tokens_BxT, segments_BxT = batch["tokens"], batch["segments"]
        words_BxT, word_segments_BxW = batch["words"], batch["word_segments"]
        num_words = word_segments_BxW.shape[1]
        dtype = self.embed[...].dtype
        positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)

        h_BxTxD = jnp.take(self.embed[...], tokens_BxT, axis=0)
        h_BxTxD = run_blocks(self.encoder, h_BxTxD, positions_BxT, segments_BxT, cfg.byte_window,
                             remat=cfg.remat_of("encoder"), scan=cfg.scan_layers)

        words_BxWxDb = self.pool(h_BxTxD, words_BxT, num_words)
        word_positions_BxW = jnp.broadcast_to(jnp.arange(num_words), word_segments_BxW.shape)
        stats = None
        if cfg.gate.layer:
            # The random baseline is seeded by the words' byte counts, as words have no token ids.
            lengths_BxW = _segment_op(jax.ops.segment_sum, jnp.ones_like(words_BxT), words_BxT, num_words + 1)
            words_BxWxDb, stats = run_gated(self.backbone, self.gate, words_BxWxDb, lengths_BxW[:, :num_words],
                                            word_positions_BxW, word_segments_BxW, 0, deletion,
                                            remat=cfg.remat_of("backbone"), scan=cfg.scan_layers,
                                            training=training)
        else:
            words_BxWxDb = run_blocks(self.backbone, words_BxWxDb, word_positions_BxW, word_segments_BxW,
                                      remat=cfg.remat_of("backbone"), scan=cfg.scan_layers)
        predictive_BxWxDb = self.backbone_norm(words_BxWxDb)

        # Byte t reads the summary of the word before its own; a segment's first word has none.
        previous_BxW = jnp.pad(word_segments_BxW[:, :-1], ((0, 0), (1, 0)))
        first_BxW = word_segments_BxW != previous_BxW
        shifted_BxWxDb = jnp.pad(predictive_BxWxDb[:, :-1], ((0, 0), (1, 0), (0, 0)))
        shifted_BxWxDb = jnp.where(first_BxW[..., None], self.first_word[...].astype(dtype), shifted_BxWxDb)
        shifted_BxW1xDb = jnp.pad(shifted_BxWxDb, ((0, 0), (0, 1), (0, 0)))  # row for padding bytes

        x_BxTxD = run_blocks(self.decoder, h_BxTxD, shifted_BxW1xDb, words_BxT, positions_BxT, segments_BxT,
                             cfg.byte_window, remat=cfg.remat_of("decoder"), scan=cfg.scan_layers)
        logits_BxTxV = (self.head_norm(x_BxTxD) @ self.head[...]).astype(jnp.float32)
        return (logits_BxTxV, stats) if with_stats else logits_BxTxV

    # Incremental decoding (eval/generate.py): one document per row; byte positions index the
    # encoder and decoder caches and the encoder states kept for pooling, word positions the
    # backbone's cache and the predictive embeddings. Positions past the end are padding.

    def empty_state(self, batch: int, row_tokens: int, row_words: int) -> dict:
        cfg, dtype = self.cfg, self.embed[...].dtype
        byte_cache = lambda: empty_cache(batch, row_tokens, cfg.byte_kv_heads, cfg.byte_dim // cfg.byte_heads, dtype)
        backbone = [empty_cache(batch, row_words, cfg.backbone_kv_heads, cfg.backbone_dim // cfg.backbone_heads,
                                dtype) for _ in self.backbone]
        if cfg.gate.layer:
            backbone = empty_gated_caches(backbone, cfg.gate, cfg.backbone_dim)
        return {"encoder": [byte_cache() for _ in self.encoder], "decoder": [byte_cache() for _ in self.decoder],
                "backbone": backbone, "h": jnp.zeros((batch, row_tokens, cfg.byte_dim), dtype),
                "predictive": jnp.zeros((batch, row_words, cfg.backbone_dim), dtype)}

    def extend(self, tokens_BxE, positions_BxE, word_starts_BxU, word_lengths_BxU, word_positions_BxU,
               decode_positions_BxS, reads_BxS, state: dict, word_bytes: int):
        """Encodes E new bytes, summarises U complete words (byte start and length of each, at
        most `word_bytes`) with the backbone, then decodes S byte positions, each reading the
        predictive embedding of word `reads` (-1: the first-word vector); returns their next-byte
        logits [B, S, V]."""
        state = dict(state)
        h_BxExD = jnp.take(self.embed[...], tokens_BxE, axis=0)
        state["encoder"] = list(state["encoder"])
        for i, block in enumerate(self.encoder):
            h_BxExD, state["encoder"][i] = block.extend(h_BxExD, positions_BxE, state["encoder"][i],
                                                        self.cfg.byte_window)
        state["h"] = write_at(state["h"], h_BxExD, positions_BxE)
        if word_positions_BxU.shape[1]:
            b, u = word_positions_BxU.shape
            offsets_M = jnp.arange(word_bytes)
            at_BxUM = jnp.minimum(word_starts_BxU[..., None] + offsets_M, state["h"].shape[1] - 1).reshape(b, -1)
            bytes_BUxMxD = jnp.take_along_axis(state["h"], at_BxUM[..., None], axis=1).reshape(b * u, word_bytes, -1)
            ids_BUxM = (offsets_M >= word_lengths_BxU.reshape(-1, 1)).astype(jnp.int32)  # 1: padding
            words_BxUxD = self.pool(bytes_BUxMxD, ids_BUxM, 1).reshape(b, u, -1)
            if self.cfg.gate.layer:
                words_BxUxD, state["backbone"] = extend_gated(self.backbone, self.gate, words_BxUxD, word_lengths_BxU,
                                                              word_positions_BxU, state["backbone"], 0)
            else:
                state["backbone"] = list(state["backbone"])
                for i, block in enumerate(self.backbone):
                    words_BxUxD, state["backbone"][i] = block.extend(words_BxUxD, word_positions_BxU,
                                                                     state["backbone"][i])
            state["predictive"] = write_at(state["predictive"], self.backbone_norm(words_BxUxD), word_positions_BxU)
        x_BxSxD = jnp.take_along_axis(state["h"], decode_positions_BxS[..., None], axis=1, mode="clip")
        read_BxSxDw = jnp.take_along_axis(state["predictive"], jnp.maximum(reads_BxS, 0)[..., None], axis=1)
        read_BxSxDw = jnp.where((reads_BxS < 0)[..., None], self.first_word[...].astype(read_BxSxDw.dtype), read_BxSxDw)
        state["decoder"] = list(state["decoder"])
        for i, layer in enumerate(self.decoder):
            x_BxSxD = x_BxSxD + read_BxSxDw.astype(x_BxSxD.dtype) @ layer.condition[...]
            x_BxSxD, state["decoder"][i] = layer.block.extend(x_BxSxD, decode_positions_BxS, state["decoder"][i],
                                                              self.cfg.byte_window)
        return (self.head_norm(x_BxSxD) @ self.head[...]).astype(jnp.float32), state


def forward_flops(cfg: ModelConfig, row_tokens: int, row_words: int, recompute: bool = False,
                  causal_pairs: bool = False) -> int:
    """Matmul FLOPs of the forward over one row, as computed (masked attention pairs included);
    with `recompute`, only what the backward pass computes again (by each stack's remat);
    causal_pairs: attention over the kept pairs only (see block_flops)."""
    byte_block = lambda remat: block_flops(row_tokens, cfg.byte_dim, cfg.byte_heads, cfg.byte_kv_heads,
                                           cfg.byte_mlp_dim, cfg.byte_window, remat, causal_pairs, cfg.attention)
    # Inside the decoder's blocks, per word and the padding row; a remat that keeps no matmul
    # computes it again, as the block's first norm needs the sum it feeds.
    conditioning = 2 * (row_words + 1) * cfg.backbone_dim * cfg.byte_dim
    if recompute:
        decoder = cfg.remat_of("decoder")
        return (cfg.encoder_layers * byte_block(cfg.remat_of("encoder"))
                + stack_flops(cfg, row_words, 0, cfg.remat_of("backbone"))
                + cfg.decoder_layers * (byte_block(decoder) + (conditioning if decoder in RECOMPUTE_ALL else 0)))
    blocks = ((cfg.encoder_layers + cfg.decoder_layers) * byte_block(None) + cfg.decoder_layers * conditioning
              + stack_flops(cfg, row_words, 0, None, causal_pairs))
    pool_width = cfg.pool_heads * (cfg.byte_dim // cfg.pool_heads)
    pooling = (2 * 2 * row_tokens * cfg.byte_dim * pool_width  # keys and values
               + 2 * row_tokens * pool_width  # scores
               + 2 * row_words * pool_width * cfg.backbone_dim)  # output
    head = 2 * row_tokens * cfg.byte_dim * VOCAB_SIZE
    return blocks + pooling + head
