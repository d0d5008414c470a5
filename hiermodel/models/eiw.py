"""M2 of Equal-Info Windows: the byte model's transformer over window tokens (REFERENCE.md section
3). Its data are compressed shards (hiermodel compress); its bits per byte are its loss in bits
over the raw bytes the windows cover."""

from flax import nnx

from hiermodel.config import ModelConfig
from hiermodel.models.byte import TransformerLM, transformer_flops


def window_vocab_size(cfg: ModelConfig) -> int:
    return (1 << cfg.window_token_bits) + 2  # every token value, BOS, one reserved id


class WindowLM(TransformerLM):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        super().__init__(cfg, window_vocab_size(cfg), 0, rngs)


def forward_flops(cfg: ModelConfig, row_tokens: int, row_words: int, recompute: bool = False,
                  causal_pairs: bool = False) -> int:
    return transformer_flops(cfg, window_vocab_size(cfg), 0, row_tokens, recompute, causal_pairs)
