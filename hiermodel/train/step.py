"""The loss and the train step: one jax.jit with explicit shardings and a donated state."""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from hiermodel.config import GateConfig, ModelConfig, TrainConfig
from hiermodel.errors import UserError
from hiermodel.models import gates
from hiermodel.sharding import batch_sharding

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


def optimizer(config: TrainConfig, gate: GateConfig) -> optax.GradientTransformation:
    """AdamW with global-norm clipping; with gate.sgd_lr, the delete gate by SGD on its own."""
    # Decay matrices only: norms' scales and other vectors keep their values.
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    adamw = optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.adamw(schedule(config), config.b1, config.b2, weight_decay=config.weight_decay, mask=decay_mask),
    )
    return _gate_by_sgd(adamw, gate.sgd_lr) if gate.layer and gate.sgd_lr else adamw


def _gate_by_sgd(inner: optax.GradientTransformation, learning_rate: float) -> optax.GradientTransformation:
    """`inner` for every part but "gate", which steps by -learning_rate * gradient. inner sees
    zeros for the gate (so the clipping norm leaves it out) and keeps its state's shape, so
    the train state is laid out as without this."""

    def update(grads, state, params=None):
        without_gate = {**grads, "gate": jax.tree.map(jnp.zeros_like, grads["gate"])}
        updates, state = inner.update(without_gate, state, params)
        return {**updates, "gate": jax.tree.map(lambda g: -learning_rate * g, grads["gate"])}, state

    return optax.GradientTransformation(inner.init, update)


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


def update_controller(controller: dict, deletion_rate, step, cfg: GateConfig) -> dict:
    """MrT5's PI controller: alpha rises while the batch deletes less than the target.

    Unlike MrT5 (which starts from a trained model) alpha may go negative: from scratch the
    loss itself first favours deleting, as the layers after the gate are still noise, and a
    regulariser that can only push toward deletion cannot hold the target from above.
    """
    target = cfg.target * jnp.minimum(1.0, (step + 1) / cfg.target_warmup) if cfg.target_warmup else cfg.target
    error = target - deletion_rate
    p = 0.9 * controller["p"] + 0.1 * cfg.kp * error
    i = controller["i"] + cfg.ki * error
    return {"alpha": p + i, "p": p, "i": i}


def make_train_step(graphdef, tx: optax.GradientTransformation, config: TrainConfig,
                    model_config: ModelConfig) -> Callable:
    """state = {"params", "opt_state", "step"} and, with a delete gate, its controller "gate";
    returns (new state, metrics)."""
    compute_dtype, gates_config = model_config.compute_dtype, model_config.gate
    gated = bool(gates_config.layer)

    def loss_sum(params, microbatch, alpha):
        """Summed nats, plus the gate regulariser alpha * mean(G) per target; (loss, (nats, gate counts))."""
        model = nnx.merge(graphdef, cast(params, compute_dtype))
        logits, stats = gates.forward(model, microbatch, training=True)
        nats = token_nats(logits, microbatch).sum()
        if stats is None:
            return nats, (nats, {})
        counts = gates.deletion_counts(stats, gates_config.k)
        mean_gate = (stats["gates"] * stats["valid"]).sum() / jnp.maximum(counts["positions"], 1.0)
        return nats + alpha * mean_gate * microbatch["loss_mask"].sum(), (nats, counts)

    def train_step(state: dict[str, Any], batch: dict[str, jax.Array]):
        targets = batch["loss_mask"].sum()
        accum = config.grad_accum
        alpha = state["gate"]["alpha"] if gated else 0.0
        gradient = jax.value_and_grad(loss_sum, has_aux=True)
        if accum == 1:
            (_, (nats, counts)), grads = gradient(state["params"], batch, alpha)
        else:
            micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

            def accumulate(carry, microbatch):
                (_, mb_aux), mb_grads = gradient(state["params"], microbatch, alpha)
                aux, grads = carry
                return (jax.tree.map(jnp.add, aux, mb_aux), jax.tree.map(jnp.add, grads, mb_grads)), None

            zeros = jax.tree.map(jnp.zeros_like, state["params"])
            empty = (jnp.zeros((), jnp.float32), gates.deletion_counts(None, 0.0) if gated else {})
            ((nats, counts), grads), _ = jax.lax.scan(accumulate, (empty, zeros), micro)
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
            **counts,
        }
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
        if gated:
            new_state["gate"] = update_controller(state["gate"], counts["deleted"] / counts["positions"], state["step"],
                                                  gates_config)
            metrics["alpha"] = state["gate"]["alpha"]
        return new_state, metrics

    return train_step


def jit_train_step(layout, tx: optax.GradientTransformation, config, mesh):
    """The train step jitted with the state's shardings, a batch-sharded batch and the state donated."""
    step = make_train_step(layout.graphdef, tx, config.train, config.model)
    return jax.jit(step, in_shardings=(layout.shardings, batch_sharding(mesh)),
                   out_shardings=(layout.shardings, None), donate_argnums=0)
