"""Checkpoints with orbax: train state (params, optimizer, step), data iterator state, resolved config.

Layout: RUN_DIR/checkpoints/STEP/{state,data,config}. Saves are asynchronous; a step
directory appears only once complete, so a crash mid-save leaves the previous ones intact.
"""

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint._src.metadata import array_metadata_store

from hiermodel import storage

# Orbax splits each replicated array's write across its replicas, each a sliced copy made by a
# compiled program per shape. For small arrays (norm scales, biases; every array of a small
# model) the slicing costs more than the parallel write saves: 120 compiles and about 6 s in the
# first save of the micro model on 8 CPU devices.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    registry = ocp.type_handlers.create_type_handler_registry(
        (jax.Array, ocp.type_handlers.ArrayHandler(array_metadata_store=array_metadata_store.Store(),
                                                   min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES)),
        (np.ndarray, ocp.type_handlers.NumpyHandler()),
        (np.number, ocp.type_handlers.ScalarHandler()), (int, ocp.type_handlers.ScalarHandler()),
        (float, ocp.type_handlers.ScalarHandler()))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _restore_args(abstract_tree, partial: bool = False) -> ocp.args.PyTreeRestore:
    """Restore onto the shardings the abstract tree carries (any mesh, any layout)."""
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), abstract_tree)
    return ocp.args.PyTreeRestore(item=abstract_tree, restore_args=restore_args, partial_restore=partial)


def checkpoint_dir(run_dir: str) -> epath.Path:
    return storage.path(run_dir) / "checkpoints"


class Checkpointer:
    def __init__(self, run_dir: str, keep: int = 3, read_only: bool = False):
        self.manager = ocp.CheckpointManager(
            checkpoint_dir(run_dir),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=not read_only, create=not read_only,
                read_only=read_only),
            item_handlers={
                "state": _state_handler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iterator, config: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            config=ocp.args.JsonSave(config),
        ), force=True)

    def save_params(self, step: int, params, config: dict) -> None:
        """Parameters alone (an imported model): evaluation, sampling and init_from read them;
        there is no optimizer or data position to resume."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeSave({"params": params}), config=ocp.args.JsonSave(config)), force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, abstract_state, data_iterator):
        """The train state onto the shardings in `abstract_state`; the iterator is restored in place."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=_restore_args(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iterator),
        ))
        return restored["state"]

    def restore_params(self, step: int, abstract_params):
        """Parameters only (for evaluation and init_from), onto the shardings given."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=_restore_args({"params": abstract_params}, partial=True)))
        return restored["state"]["params"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
