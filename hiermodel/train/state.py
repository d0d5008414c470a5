"""Building the train state on a mesh: abstract shapes, shardings, initialisation, restoring."""

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hiermodel.config import Config
from hiermodel.models.registry import build
from hiermodel.sharding import param_shardings


@dataclasses.dataclass
class StateLayout:
    graphdef: nnx.GraphDef
    abstract: dict  # the train state as ShapeDtypeStructs carrying their shardings
    shardings: dict  # the same tree of NamedShardings

    @property
    def param_shardings(self):
        return self.shardings["params"]


def _model_shapes(config: Config):
    abstract_model = nnx.eval_shape(lambda: build(config.model, nnx.Rngs(config.seed)))
    return nnx.split(abstract_model)


def num_params(config: Config) -> int:
    _, state = _model_shapes(config)
    return sum(x.size for x in jax.tree.leaves(state))


def param_layout(config: Config, mesh: Mesh):
    """(graphdef, parameter shapes as a pure dict, their shardings)."""
    graphdef, abstract_params = _model_shapes(config)
    return graphdef, nnx.to_pure_dict(abstract_params), nnx.to_pure_dict(param_shardings(abstract_params, mesh))


def _with_shardings(shapes, shardings):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def abstract_params(config: Config, mesh: Mesh):
    """(graphdef, parameters as ShapeDtypeStructs carrying their shardings) for restoring."""
    graphdef, shapes, shardings = param_layout(config, mesh)
    return graphdef, _with_shardings(shapes, shardings)


def layout(config: Config, tx: optax.GradientTransformation, mesh: Mesh) -> StateLayout:
    graphdef, pure_params, params_sh = param_layout(config, mesh)
    opt_shapes = jax.eval_shape(tx.init, pure_params)
    replicated = NamedSharding(mesh, P())
    opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, opt_shapes, params_sh,
                                   transform_non_params=lambda _: replicated)
    shardings = {"params": params_sh, "opt_state": opt_sh, "step": replicated}
    shapes = {"params": pure_params, "opt_state": opt_shapes, "step": jax.ShapeDtypeStruct((), jnp.int32)}
    if config.model.gate.layer:
        shapes["gate"] = jax.eval_shape(_controller)
        shardings["gate"] = jax.tree.map(lambda _: replicated, shapes["gate"])
    return StateLayout(graphdef, _with_shardings(shapes, shardings), shardings)


def _controller() -> dict:
    """The delete gate's PI controller (train/step.py update_controller), checkpointed with the state."""
    return {name: jnp.zeros((), jnp.float32) for name in ("alpha", "p", "i")}


def _step_zero(params, tx: optax.GradientTransformation, gated: bool) -> dict:
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    return {**state, "gate": _controller()} if gated else state


def initialize(config: Config, tx: optax.GradientTransformation, state_layout: StateLayout) -> dict:
    """A fresh train state, created directly in its shards."""
    gated = bool(config.model.gate.layer)
    init = lambda: _step_zero(nnx.to_pure_dict(nnx.state(build(config.model, nnx.Rngs(config.seed)), nnx.Param)), tx,
                              gated)
    return jax.jit(init, out_shardings=state_layout.shardings)()


def place(host_params: dict, shardings: dict) -> dict:
    """Host arrays onto the shardings of the same parts of the model, each process making only
    the shards it holds."""
    return jax.tree.map(lambda a, s: jax.make_array_from_callback(a.shape, s, lambda index: a[index]),
                        host_params, {k: shardings[k] for k in host_params})


def with_params(params, tx: optax.GradientTransformation, state_layout: StateLayout, config: Config | None = None) -> dict:
    """A train state at step 0 around given parameters (continued pretraining); with `config`,
    the parts of its model that `params` lacks (a delete gate added to a trained model) start as
    a fresh model's."""
    gated = "gate" in state_layout.shardings

    def init(params):
        if config is not None:
            params = {**nnx.to_pure_dict(nnx.state(build(config.model, nnx.Rngs(config.seed)), nnx.Param)), **params}
        return _step_zero(params, tx, gated)

    return jax.jit(init, out_shardings=state_layout.shardings)(params)
