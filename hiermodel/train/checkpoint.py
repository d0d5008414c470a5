"""Checkpoints with orbax: train state (params, optimizer, step), data iterator state, resolved config.

Layout: RUN_DIR/checkpoints/STEP/{state,data,config}. Saves are asynchronous; a step
directory appears only once complete, so a crash mid-save leaves the previous ones intact.
"""

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from hiermodel import storage


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
                "state": ocp.PyTreeCheckpointHandler(),
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
