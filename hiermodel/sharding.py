"""The mesh and the logical-axis rules that place every parameter and activation on it.

Mesh axes: data (pure data parallel), fsdp (data parallel with sharded parameters and
optimizer state), tensor (model parallel over heads and MLP width).
"""

import math

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hiermodel.config import MeshConfig
from hiermodel.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. A mesh axis that does not divide a dimension is dropped for it.
RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "length": (),
}


def make_mesh(config: MeshConfig, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    sizes = [config.data, config.fsdp, config.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if sizes.count(-1) > 1 or len(devices) % known:
        raise UserError(f"mesh {dict(zip(MESH_AXES, sizes))} does not fit {len(devices)} devices")
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != len(devices):
        raise UserError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                        f"found {len(devices)}")
    if devices[0].platform == "tpu":  # lay the mesh along the chips' physical interconnect
        grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
    else:
        grid = np.array(devices).reshape(sizes)
    return Mesh(grid, MESH_AXES,
                axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_spec(axes: tuple, shape: tuple[int, ...], mesh_shape: dict[str, int]) -> P:
    spec = []
    for name, size in zip(axes, shape):
        mesh_axes = tuple(a for a in RULES.get(name, ()) if mesh_shape.get(a, 1) > 1) if name else ()
        if mesh_axes and size % math.prod(mesh_shape[a] for a in mesh_axes) == 0:
            spec.append(mesh_axes if len(mesh_axes) > 1 else mesh_axes[0])
        else:
            spec.append(None)
    return P(*spec)


def param_shardings(abstract_params, mesh: Mesh):
    """NamedShardings for an nnx.State of parameters, from each one's `axes` metadata."""
    def place(variable):
        shape = variable.get_value().shape
        axes = variable.get_metadata().get("axes") or (None,) * len(shape)
        return variable.replace(NamedSharding(mesh, logical_spec(axes, shape, dict(mesh.shape))))

    return jax.tree.map(place, abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(RULES["batch"]))


def constrain(x, axes: tuple):
    """Pin an activation to its logical layout on the current mesh; nothing without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(axes, x.shape, dict(mesh.shape)))


def to_global(local_batch: dict, mesh: Mesh) -> dict:
    """Assemble each process's slice of a batch into global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def to_host(x) -> np.ndarray:
    """A global array, whole, on every process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def process_slice(global_batch: dict) -> dict:
    """This process's rows of a batch that every process built in full."""
    count, index = jax.process_count(), jax.process_index()
    return {k: np.array_split(v, count)[index] for k, v in global_batch.items()}
