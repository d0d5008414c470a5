"""Ahead-of-time compilation of the real train step for topologies that are not attached."""

import importlib.util
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from hiermodel.errors import UserError
from hiermodel.train import state as state_lib
from hiermodel.train.aot import batch_shapes, compile_report, target_devices
from hiermodel.sharding import batch_sharding, make_mesh
from hiermodel.train.step import optimizer
from tests.conftest import MICRO, REPO, micro_config


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
    import jax

    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def expected_arguments(config, devices) -> int:
    mesh = make_mesh(config.mesh, devices)
    layout = state_lib.layout(config, optimizer(config.train, config.model.gate), mesh)
    batch = batch_shapes(config, config.train.batch_size, batch_sharding(mesh))
    del batch["tags"]  # the step never reads it, and jit drops unused arguments
    return per_device_bytes(layout.abstract) + per_device_bytes(batch)


@pytest.mark.parametrize("target", [
    "cpu:4",
    pytest.param("v5p-8", marks=pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                                   reason="libtpu is not installed (pip install 'hiermodel[tpu]')")),
])
def test_the_compiled_step_holds_exactly_its_shard_of_state_and_batch(target):
    config = micro_config(**{"mesh.data": 1, "mesh.fsdp": -1, "train.batch_size": 8, "model.scan_layers": True})
    devices = target_devices(target)
    assert len(devices) == 4
    report = compile_report(config, devices)
    assert report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    # FSDP: each device holds a quarter of the parameters and Adam moments, and two of the 8 rows;
    # TPU buffers are padded to the chip's tiles, so there it is a lower bound.
    shards = expected_arguments(config, devices)
    if target.startswith("cpu"):
        assert report["arguments_bytes"] == shards
    else:
        assert shards <= report["arguments_bytes"] <= 4 * shards
    assert report["aliased_bytes"] > 0  # the donated state is updated in place
    assert report["peak_bytes"] >= report["arguments_bytes"]
    assert 0 < report["model_flops_per_step"] < report["train_flops_per_step"]
    assert report["compiler_flops"] > 0 and report["bytes_accessed"] > 0  # the compiler's cost model
    if target.startswith("v5p"):
        assert report["device_kind"] == "TPU v5" and report["fits"] is True


def test_unknown_targets_are_named():
    with pytest.raises(UserError, match="v9z-8"):
        target_devices("v9z-8")
    with pytest.raises(UserError, match="cpu:64: this process has 8 CPU devices"):
        target_devices("cpu:64")


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_the_pod_launchers_libtpu_flags_are_all_known_to_libtpu():
    """libtpu aborts on a flag it does not know: launch/tpu_pod.sh's must compile a step."""
    flags = re.search(r'^LIBTPU_INIT_ARGS="(.*)"$', (REPO / "launch" / "tpu_pod.sh").read_text(), re.M).group(1)
    assert "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true" in flags
    result = subprocess.run([sys.executable, "tools/aot_compile.py", str(MICRO), "--target", "v5p-8", "mesh.data=1",
                             "mesh.fsdp=-1", "train.batch_size=8"], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "LIBTPU_INIT_ARGS": flags}, timeout=600)
    assert result.returncode == 0 and "Unknown command line flag" not in result.stderr, result.stderr
    assert "v5p-8: 4 x TPU v5" in result.stdout and "(fits;" in result.stdout


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_offload_remat_keeps_layer_inputs_in_host_memory_on_tpu():
    """remat=offload, compiled for TPU: buffers in the host memory space (S(5)), which full
    remat's program does not have; on CPU (one memory) it computes what full remat does."""
    from hiermodel.train.aot import compile_train_step

    def host_buffers(remat: str) -> int:
        config = micro_config(**{"mesh.data": 1, "mesh.fsdp": -1, "train.batch_size": 8, "model.remat": remat,
                                 "model.scan_layers": True})
        return compile_train_step(config, make_mesh(config.mesh, target_devices("v5p-8"))).as_text().count("S(5)")

    assert host_buffers("full") == 0 and host_buffers("offload") > 0
