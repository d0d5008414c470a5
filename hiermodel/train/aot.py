"""Compiling the real train step ahead of time for a device topology that is not attached.

TPU topologies come from libtpu's descriptions (`pip install 'hiermodel[tpu]'`; no TPU needed):
the compiled program's memory is what the chips would hold. `cpu:N` compiles for N fake CPU
devices instead: parameter, optimizer and batch buffers are exact for any accelerator with the
same mesh, temporaries are the CPU compiler's and only indicative.
"""

import os

import jax
import jax.numpy as jnp

from hiermodel.config import Config
from hiermodel.errors import UserError
from hiermodel.models.registry import model_flops, train_flops
from hiermodel.train import state as state_lib
from hiermodel.sharding import batch_sharding, make_mesh
from hiermodel.train.step import jit_train_step, optimizer

# Cloud TPU slice names -> libtpu topologies. v4 and v5p names count TensorCores (two per chip),
# v5e and v6e names count chips.
TPU_SLICES = {
    "v4-8": "v4:2x2x1", "v4-16": "v4:2x2x2", "v4-32": "v4:2x2x4", "v4-128": "v4:4x4x4",
    "v5p-8": "v5p:2x2x1", "v5p-16": "v5p:2x2x2", "v5p-32": "v5p:2x2x4", "v5p-64": "v5p:2x4x4",
    "v5p-128": "v5p:4x4x4", "v5p-256": "v5p:4x4x8", "v5p-512": "v5p:4x8x8",
    "v5e-4": "v5e:2x2", "v5e-8": "v5e:2x4", "v5e-16": "v5e:4x4", "v5e-64": "v5e:8x8", "v5e-256": "v5e:16x16",
    "v6e-4": "v6e:2x2", "v6e-8": "v6e:2x4", "v6e-16": "v6e:4x4", "v6e-64": "v6e:8x8", "v6e-256": "v6e:16x16",
}

# High-bandwidth memory per device (bytes), by device_kind.
DEVICE_MEMORY = {"TPU v4": 32 << 30, "TPU v5": 95 << 30, "TPU v5 lite": 16 << 30, "TPU v6 lite": 32 << 30}


def target_devices(target: str) -> list:
    """The devices of a TPU slice name ("v5p-128"), a libtpu topology ("v5p:4x4x4"), or "cpu:N"
    (fake CPU devices; the process must have been started with that many)."""
    if target.startswith("cpu:"):
        count = int(target[4:])
        devices = jax.devices("cpu")
        if len(devices) < count:
            raise UserError(f"{target}: this process has {len(devices)} CPU devices; start it with "
                            f"XLA_FLAGS=--xla_force_host_platform_device_count={count}")
        return devices[:count]
    from jax.experimental import topologies

    # Compiling touches no chip, so several processes may load libtpu at once (tests, parallel checks).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    topology = TPU_SLICES.get(target, target)
    try:
        return topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
    except Exception as e:  # libtpu missing, or a topology it does not know
        raise UserError(f"cannot describe TPU topology {target!r} ({topology}): {e}; known slices: "
                        f"{', '.join(TPU_SLICES)}; libtpu comes with pip install 'hiermodel[tpu]'") from e


def batch_shapes(config: Config, rows: int, sharding=None) -> dict:
    """One batch of `rows` packed rows as ShapeDtypeStructs."""
    t, w = config.data.row_tokens, config.data.row_words
    spec = {"tokens": (rows, t), "token_bytes": (rows, t), "segments": (rows, t), "words": (rows, t),
            "word_segments": (rows, w), "tags": (rows, t), "loss_mask": (rows, t)}
    return {k: jax.ShapeDtypeStruct(s, jnp.float32 if k == "loss_mask" else jnp.int32, sharding=sharding)
            for k, s in spec.items()}


def lower_train_step(config: Config, mesh, platform: str | None = None):
    """The train loop's step (same shardings, donation and batch), lowered for `platform`
    (default: the mesh's devices'); lowering for another platform needs none of its devices."""
    tx = optimizer(config.train, config.model.gate)
    layout = state_lib.layout(config, tx, mesh)  # outside the mesh: it runs optax's init on placeholders
    with jax.set_mesh(mesh):
        step = jit_train_step(layout, tx, config, mesh)
        batch = batch_shapes(config, config.train.batch_size, batch_sharding(mesh))
        return step.trace(layout.abstract, batch).lower(lowering_platforms=(platform,) if platform else None)


def compile_train_step(config: Config, mesh):
    """The train loop's step, compiled for the mesh's devices."""
    return lower_train_step(config, mesh).compile()


def compile_report(config: Config, devices: list) -> dict:
    """Per-device memory of the compiled step, and its FLOPs: hardware (train_flops, remat's
    recompute and masked attention included) and model (model_flops)."""
    mesh = make_mesh(config.mesh, devices)
    kind = devices[0].device_kind
    shape = config.model, config.data.row_tokens, config.data.row_words
    step_flops = config.train.batch_size * train_flops(*shape, platform=devices[0].platform)
    step_model_flops = config.train.batch_size * model_flops(*shape)
    capacity = DEVICE_MEMORY.get(kind)
    report = {"devices": len(devices), "device_kind": kind, "mesh": dict(mesh.shape),
              "batch_rows": config.train.batch_size, "grad_accum": config.train.grad_accum,
              "row_tokens": config.data.row_tokens, "device_memory_bytes": capacity,
              "train_flops_per_step": step_flops, "train_flops_per_device": step_flops / len(devices),
              "model_flops_per_step": step_model_flops, "model_flops_per_device": step_model_flops / len(devices)}
    try:
        compiled = compile_train_step(config, mesh)
        memory = compiled.memory_analysis()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        # The TPU compiler refuses programs that cannot fit; its message says by how much.
        return {**report, "fits": False, "error": str(e).splitlines()[0]}
    peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes)
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost  # the compiler's estimate for one device's program
    report.update(compiler_flops=cost.get("flops"), bytes_accessed=cost.get("bytes accessed"))
    return {**report, "arguments_bytes": memory.argument_size_in_bytes, "outputs_bytes": memory.output_size_in_bytes,
            "aliased_bytes": memory.alias_size_in_bytes, "temporaries_bytes": memory.temp_size_in_bytes,
            "peak_bytes": peak, "fits": None if capacity is None else peak <= capacity}
