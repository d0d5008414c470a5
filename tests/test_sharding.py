import jax
import numpy as np
import pytest

from hiermodel.config import MeshConfig
from hiermodel.errors import UserError
from hiermodel.train import state as state_lib
from hiermodel.train.checkpoint import Checkpointer
from hiermodel.train.loop import train
from hiermodel.train.metrics import read_metrics
from hiermodel.sharding import make_mesh
from hiermodel.train.step import optimizer
from tests.conftest import micro_config

MESHES = {"1": (1, 1, 1), "2x2x2": (2, 2, 2), "1x4x2": (1, 4, 2), "8x1x1": (8, 1, 1)}


def run(tmp_path, name, mesh, **overrides):
    data, fsdp, tensor = MESHES[mesh]
    # One save, at the last step (every test here restores only that one); a save on eight fake
    # devices costs more than a step.
    overrides = {"train.checkpoint_every": 1000, **overrides}
    config = micro_config(run_dir=tmp_path / name, **{"mesh.data": data, "mesh.fsdp": fsdp,
                                                       "mesh.tensor": tensor}, **overrides)
    train(config, devices=jax.devices()[:data * fsdp * tensor])
    return config, [m["loss"] for _, m in sorted(read_metrics(config.run_dir).items())]


def test_one_device_and_eight_devices_give_the_same_losses(tmp_path):
    _, single = run(tmp_path, "single", "1")
    _, sharded = run(tmp_path, "sharded", "2x2x2")
    assert len(single) == 6
    np.testing.assert_allclose(sharded, single, rtol=2e-5)
    assert single[-1] < single[0]


def test_checkpoint_saved_on_eight_devices_restores_on_other_meshes(tmp_path):
    config, _ = run(tmp_path, "saved", "2x2x2", **{"train.steps": 2})
    tx = optimizer(config.train, config.model.gate)
    restored = {}
    for mesh_name in ("2x2x2", "1", "1x4x2"):
        data, fsdp, tensor = MESHES[mesh_name]
        mesh = make_mesh(MeshConfig(data, fsdp, tensor), jax.devices()[:data * fsdp * tensor])
        with jax.set_mesh(mesh):
            layout = state_lib.layout(config, tx, mesh)
            checkpointer = Checkpointer(config.run_dir, read_only=True)
            params = checkpointer.restore_params(2, layout.abstract["params"])
            checkpointer.close()
        leaf = params["backbone"][0]["mlp"]["w_up"]
        assert leaf.sharding.mesh.shape == mesh.shape
        restored[mesh_name] = jax.tree.map(np.asarray, params)
    for mesh_name in ("1", "1x4x2"):
        jax.tree.map(np.testing.assert_array_equal, restored[mesh_name], restored["2x2x2"])


def test_a_small_models_state_saves_on_eight_devices_without_compiling(tmp_path):
    """Orbax would slice every replicated array per replica, one compiled program per shape:
    seconds of compiling in a small model's first save. The restore is exact all the same."""
    config = micro_config(run_dir=tmp_path / "run")
    tx = optimizer(config.train, config.model.gate)
    mesh = make_mesh(MeshConfig(2, 2, 2))
    with jax.set_mesh(mesh):
        params = state_lib.initialize(config, tx, state_lib.layout(config, tx, mesh))["params"]
    compiles = []
    listener = lambda event, duration, **_: compiles.append(event) if "backend_compile" in event else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        checkpointer = Checkpointer(config.run_dir)
        checkpointer.save_params(1, params, {})
        checkpointer.close()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    one = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    with jax.set_mesh(one):
        abstract = state_lib.layout(config, tx, one).abstract["params"]
        checkpointer = Checkpointer(config.run_dir, read_only=True)
        restored = checkpointer.restore_params(1, abstract)
        checkpointer.close()
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, restored), jax.tree.map(np.asarray, params))


@pytest.mark.slow
def test_a_run_resumed_on_a_different_mesh_continues_identically(tmp_path):
    # A constant learning rate, so that stopping at step 4 changes nothing the run depends on.
    constant = {"train.warmup_steps": 0, "train.min_lr_ratio": 1.0}
    _, whole = run(tmp_path, "whole", "2x2x2", **constant)
    run(tmp_path, "split", "2x2x2", **{"train.steps": 4}, **constant)
    _, resumed = run(tmp_path, "split", "1x4x2", **constant)
    np.testing.assert_allclose(resumed, whole, rtol=2e-5)


def test_parameters_are_sharded_by_the_rules():
    config = micro_config()
    mesh = make_mesh(MeshConfig(2, 2, 2))
    layout = state_lib.layout(config, optimizer(config.train, config.model.gate), mesh)
    spec = lambda sharding: tuple(sharding.spec)
    mlp = layout.shardings["params"]["backbone"][0]["mlp"]
    assert spec(mlp["w_up"]) == ("fsdp", "tensor") and spec(mlp["w_down"]) == ("tensor", "fsdp")
    # Adam moments follow their parameters.
    adam = layout.shardings["opt_state"][1][0]
    assert spec(adam.mu["backbone"][0]["mlp"]["w_up"]) == ("fsdp", "tensor")


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    _, whole = run(tmp_path, "whole", "1", **{"train.steps": 3})
    _, accumulated = run(tmp_path, "accumulated", "1", **{"train.steps": 3, "train.grad_accum": 4})
    np.testing.assert_allclose(accumulated, whole, rtol=2e-5)


@pytest.mark.parametrize("options", [{"model.remat": "full"},
                                     {"model.encoder_remat": "offload", "model.backbone_remat": "save_dots",
                                      "model.decoder_remat": "full", "model.scan_layers": True}])
def test_rematerialisation_and_scanned_layers_change_no_loss(tmp_path, options):
    _, plain = run(tmp_path, "plain", "1", **{"train.steps": 3})
    _, changed = run(tmp_path, "changed", "1", **{"train.steps": 3, **options})
    np.testing.assert_allclose(changed, plain, rtol=1e-5)


def test_the_byte_baseline_trains_in_the_same_trainer(tmp_path):
    _, losses = run(tmp_path, "byte", "2x2x2", **{"model.kind": "byte"})
    assert len(losses) == 6 and losses[-1] < losses[0]


def test_logged_loss_covers_every_step_since_the_last_line(tmp_path):
    _, every = run(tmp_path, "every", "1", **{"train.steps": 4})
    _, pairs = run(tmp_path, "pairs", "1", **{"train.steps": 4, "train.log_every": 2, "train.checkpoint_every": 4})
    np.testing.assert_allclose(pairs, [np.mean(every[:2]), np.mean(every[2:])], rtol=1e-3)


def test_frozen_parts_keep_their_initial_weights(tmp_path):
    config, losses = run(tmp_path, "frozen", "2x2x2", **{"train.steps": 2, "train.freeze": "embed,encoder"})
    tx = optimizer(config.train, config.model.gate)
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    with jax.set_mesh(mesh):
        layout = state_lib.layout(config, tx, mesh)
        initial = jax.tree.map(np.asarray, state_lib.initialize(config, tx, layout)["params"])
        checkpointer = Checkpointer(config.run_dir, read_only=True)
        trained = jax.tree.map(np.asarray, checkpointer.restore_params(2, layout.abstract["params"]))
        checkpointer.close()
    for part in ("embed", "encoder"):
        jax.tree.map(np.testing.assert_array_equal, trained[part], initial[part])
    for part in ("backbone", "decoder", "head"):
        assert not np.array_equal(jax.tree.leaves(trained[part])[0], jax.tree.leaves(initial[part])[0])
    with pytest.raises(UserError, match="train.freeze: encodr is not a part of this model"):
        run(tmp_path, "typo", "1", **{"train.freeze": "encodr"})
