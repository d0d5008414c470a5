"""The loss and the train step: one jax.jit with explicit shardings and a donated state."""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from hiermodel.config import TrainConfig
from hiermodel.errors import UserError
from hiermodel.train.sharding import batch_sharding

def schedule(config: TrainConfig) -> optax.Schedule:
    """Linear warmup, then cosine decay, or warmup-stable-decay (WSD) with a linear tail."""
    peak, floor = config.learning_rate, config.learning_rate * config.min_lr_ratio
    warmup = min(config.warmup_steps, config.steps)
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(config.steps, warmup + 1), floor)
    if config.schedule == "wsd":
        decay = max(1, int(config.steps * config.decay_fraction))
        stable = max(0, config.steps - warmup - decay)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak),
             optax.linear_schedule(peak, floor, decay)],
            [warmup, warmup + stable])
    raise ValueError(f"train.schedule={config.schedule!r}: use cosine or wsd")


def optimizer(config: TrainConfig) -> optax.GradientTransformation:
    # Decay matrices only: norms' scales and other vectors keep their values.
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    return optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.adamw(schedule(config), config.b1, config.b2, weight_decay=config.weight_decay, mask=decay_mask),
    )


def check_frozen(freeze: list[str], params: dict) -> None:
    unknown = sorted(set(freeze) - set(params))
    if unknown:
        raise UserError(f"train.freeze: {', '.join(unknown)} is not a part of this model "
                        f"(its parts: {', '.join(params)})")


def token_nats(logits_BxTxV, batch) -> jax.Array:
    """-log p of each position's target (token t+1), zero where not scored; [B, T]."""
    targets_BxT = jnp.pad(batch["tokens"][:, 1:], ((0, 0), (0, 1)))
    nats_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT)
    return nats_BxT * batch["loss_mask"]


def target_bytes(batch) -> jax.Array:
    """Raw bytes of each position's scored target (token t+1), zero where not scored; [B, T]."""
    return jnp.pad(batch["token_bytes"][:, 1:], ((0, 0), (0, 1))) * batch["loss_mask"]


def cast(params, dtype: str):
    return jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)


def make_train_step(graphdef, tx: optax.GradientTransformation, config: TrainConfig,
                    compute_dtype: str) -> Callable:
    """state = {"params", "opt_state", "step"}; returns (new state, metrics)."""

    def loss_sum(params, microbatch):
        model = nnx.merge(graphdef, cast(params, compute_dtype))
        return token_nats(model(microbatch), microbatch).sum()

    def train_step(state: dict[str, Any], batch: dict[str, jax.Array]):
        targets = batch["loss_mask"].sum()
        accum = config.grad_accum
        if accum == 1:
            nats, grads = jax.value_and_grad(loss_sum)(state["params"], batch)
        else:
            micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

            def accumulate(carry, microbatch):
                nats, grads = carry
                mb_nats, mb_grads = jax.value_and_grad(loss_sum)(state["params"], microbatch)
                return (nats + mb_nats, jax.tree.map(jnp.add, grads, mb_grads)), None

            zeros = jax.tree.map(jnp.zeros_like, state["params"])
            (nats, grads), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros), micro)
        denominator = jnp.maximum(targets, 1.0)
        grads = jax.tree.map(lambda g: g / denominator, grads)
        # Frozen parts: no gradient (so none in the clipping norm), and their weights kept as they are.
        check_frozen(config.freeze, grads)
        grads = {k: jax.tree.map(jnp.zeros_like, g) if k in config.freeze else g for k, g in grads.items()}
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        params = {k: state["params"][k] if k in config.freeze else p for k, p in params.items()}
        loss = nats / denominator
        metrics = {
            "loss": loss,
            "nats": nats,
            "target_bytes": target_bytes(batch).sum(),
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(params),
            "targets": targets,
            "words": (batch["word_segments"] > 0).sum(),
        }
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    return train_step


def jit_train_step(layout, tx: optax.GradientTransformation, config, mesh):
    """The train step jitted with the state's shardings, a batch-sharded batch and the state donated."""
    step = make_train_step(layout.graphdef, tx, config.train, config.model.compute_dtype)
    return jax.jit(step, in_shardings=(layout.shardings, batch_sharding(mesh)),
                   out_shardings=(layout.shardings, None), donate_argnums=0)
