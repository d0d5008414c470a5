"""The one interface every model kind offers the trainer and evaluator.

A kind is a module class built as cls(config, rngs) whose __call__(batch) returns next-token
logits [B, T, V] (position t predicts token t+1), and the matmul FLOPs of its forward over one
row of the configured shape (embedding lookups and elementwise work are not counted), as the
hardware computes them or, with causal_pairs, as the model needs them.
"""

import dataclasses

from flax import nnx

from hiermodel.config import ModelConfig
from hiermodel.errors import UserError
from hiermodel.models import byte, eiw, hat, subword
from hiermodel.models.layers import ATTENTION_IMPLEMENTATIONS, REMAT_POLICIES, resolve_attention

KINDS = {
    "hat": (hat.HAT, hat.forward_flops),
    "byte": (byte.ByteLM, byte.forward_flops),
    "subword": (subword.SubwordLM, subword.forward_flops),
    "eiw": (eiw.WindowLM, eiw.forward_flops),
}


def check_kind(config: ModelConfig) -> None:
    if config.kind not in KINDS:
        raise UserError(f"model.kind={config.kind!r} is not one of {', '.join(KINDS)}")
    if config.kind == "subword" and config.vocab_size < 258:
        raise UserError(f"model.vocab_size={config.vocab_size}: model.kind=subword needs the tokenizer's size")
    for key in ("remat", "encoder_remat", "backbone_remat", "decoder_remat"):
        if getattr(config, key) not in ("none", *REMAT_POLICIES) and (key == "remat" or getattr(config, key)):
            raise UserError(f"model.{key}={getattr(config, key)!r}: use none, {', '.join(REMAT_POLICIES)}")
    if config.kind == "eiw" and not (16 <= config.window_bits <= 32 and config.window_token_bits in (8, 16, 32)
                                     and config.window_bits % config.window_token_bits == 0
                                     and config.window_token_bits <= 16):
        raise UserError(f"model.window_bits={config.window_bits}, model.window_token_bits={config.window_token_bits}: "
                        "windows of 16 to 32 bits, as tokens of 8 or 16 bits that divide them")
    gate = config.gate
    if gate.layer and not (0 < gate.layer and gate.layer + gate.full_layers < config.backbone_layers
                           and gate.full_layers >= 0):
        raise UserError(f"model.gate.layer={gate.layer}, model.gate.full_layers={gate.full_layers}: the gate needs "
                        f"at least one layer before it and one gated layer after it, before the full layers "
                        f"(model.backbone_layers={config.backbone_layers})")
    if gate.mode not in ("learned", "random"):
        raise UserError(f"model.gate.mode={gate.mode!r}: use learned or random")
    if gate.full_keys not in ("all", "kept"):
        raise UserError(f"model.gate.full_keys={gate.full_keys!r}: use all or kept")
    if gate.full_recent < 0 or (gate.full_recent and gate.full_keys != "kept"):
        raise UserError(f"model.gate.full_recent={gate.full_recent}: needs model.gate.full_keys=kept and a "
                        f"count of positions >= 0 (full_keys={gate.full_keys!r})")
    if gate.calibrate < 0 or (gate.calibrate and gate.mode != "learned"):
        raise UserError(f"model.gate.calibrate={gate.calibrate}: a count of batches >= 0, for a learned gate "
                        f"(mode={gate.mode!r})")
    if not (gate.k < 0 and 0 <= gate.target < 1 and 0 < gate.logit_cap < -gate.k / 2 and gate.capacity_slack >= 1
            and gate.sgd_lr >= 0 and gate.target_warmup >= 0 and gate.noise >= 0):
        raise UserError(f"model.gate: need k < 0, 0 <= target < 1, 0 < logit_cap < -k/2, capacity_slack >= 1, "
                        f"sgd_lr >= 0, target_warmup >= 0 and noise >= 0 (got k={gate.k}, target={gate.target}, "
                        f"logit_cap={gate.logit_cap}, capacity_slack={gate.capacity_slack}, sgd_lr={gate.sgd_lr}, "
                        f"target_warmup={gate.target_warmup}, noise={gate.noise})")
    if config.attention not in ATTENTION_IMPLEMENTATIONS:
        raise UserError(f"model.attention={config.attention!r}: use {', '.join(ATTENTION_IMPLEMENTATIONS)}")


def build(config: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    check_kind(config)
    return KINDS[config.kind][0](config, rngs)


def _resolved(config: ModelConfig, platform: str | None) -> ModelConfig:
    """The config with model.attention as it runs on `platform` (its FLOPs depend on it)."""
    return dataclasses.replace(config, attention=resolve_attention(config.attention, config.compute_dtype, platform))


def forward_flops(config: ModelConfig, row_tokens: int, row_words: int, platform: str | None = None) -> int:
    """Matmul FLOPs of one row's forward pass (inference) on `platform` (default: JAX's backend)."""
    return KINDS[config.kind][1](_resolved(config, platform), row_tokens, row_words)


def train_flops(config: ModelConfig, row_tokens: int, row_words: int, platform: str | None = None) -> int:
    """Hardware matmul FLOPs of one row's training step (for HFU): the backward pass costs two
    forwards, plus what the remat policy computes again; attention counts every pair its
    implementation on `platform` computes."""
    recomputed = KINDS[config.kind][1](_resolved(config, platform), row_tokens, row_words, recompute=True)
    return 3 * forward_flops(config, row_tokens, row_words, platform) + recomputed


def model_flops(config: ModelConfig, row_tokens: int, row_words: int) -> int:
    """Model matmul FLOPs of one row's training step (for MFU, as PaLM counts them): three
    forwards, nothing recomputed, attention only over the query-key pairs the causal mask and
    window keep. Document boundaries within a packed row are not subtracted, and a gate's later
    layers count every position, as soft deletion computes them whatever the gate deletes."""
    return 3 * KINDS[config.kind][1](config, row_tokens, row_words, causal_pairs=True)
