"""The one interface every model kind offers the trainer and evaluator.

A kind is a module class built as cls(config, rngs) whose __call__(batch) returns next-token
logits [B, T, V] (position t predicts token t+1), and a function estimating training FLOPs
of a batch from its real bytes and words.
"""

from flax import nnx

from hiermodel.config import ModelConfig
from hiermodel.errors import UserError
from hiermodel.models import byte, hat

KINDS = {"hat": (hat.HAT, hat.train_flops), "byte": (byte.ByteLM, byte.train_flops)}


def check_kind(config: ModelConfig) -> None:
    if config.kind not in KINDS:
        raise UserError(f"model.kind={config.kind!r} is not one of {', '.join(KINDS)}")


def build(config: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    check_kind(config)
    return KINDS[config.kind][0](config, rngs)


def train_flops(config: ModelConfig, num_bytes: float, num_words: float, row_bytes: int, row_words: int) -> float:
    return KINDS[config.kind][1](config, num_bytes, num_words, row_bytes, row_words)
