"""Keeping JAX from starting libtpu on a machine without TPU chips.

libtpu comes with the test and tpu extras (so that pods can be compiled for anywhere); started
where there are no chips it prints five lines of warnings on every command. JAX_PLATFORMS, when
set, still decides, and compiling for a TPU topology (tools/aot_compile.py) loads libtpu itself.
"""

import importlib.util
import os


def skip_absent_tpu() -> None:
    if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
        return
    import jax
    from jax._src import hardware_utils, xla_bridge

    if xla_bridge.backends_are_initialized() or hardware_utils.num_available_tpu_chips_and_device_id()[0]:
        return
    gpu = hardware_utils.has_visible_nvidia_gpu() and importlib.util.find_spec("jax_cuda12_plugin") is not None
    jax.config.update("jax_platforms", "cuda,cpu" if gpu else "cpu")
