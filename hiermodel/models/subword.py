"""The subword baseline: the byte model's transformer over BPE ids (text/subword.py), full causal
attention within a document. Its bits per byte are its loss in bits over the raw bytes covered."""

from flax import nnx

from hiermodel.config import ModelConfig
from hiermodel.models.byte import TransformerLM, transformer_flops


class SubwordLM(TransformerLM):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        super().__init__(cfg, cfg.vocab_size, 0, rngs)


def forward_flops(cfg: ModelConfig, row_tokens: int, row_words: int, recompute: bool = False,
                  causal_pairs: bool = False) -> int:
    return transformer_flops(cfg, cfg.vocab_size, 0, row_tokens, recompute, causal_pairs)
