import os
import sys
from pathlib import Path

# LLVM at -O1: compiling, most of the suite's time, takes about half as long (the micro HAT's init
# program: 7.1 -> 3.5 s). Programs train to the same losses as at -O3 (to the last bit ungated;
# gated, gradient norms differ in the 7th digit). -O0 changes results.
FAST_COMPILE = "--xla_backend_optimization_level=1"


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test process with `devices` fake CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"


# Eight fake CPU devices for sharding tests, and a persistent compilation cache; set before jax loads.
os.environ.setdefault("XLA_FLAGS", xla_flags(8))
REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "jax"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu (for compile-only TPU topologies) must not probe for chips

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

CORPUS = REPO.parent / "shared" / "corpus"
MICRO = REPO / "tests" / "micro.yaml"


@pytest.fixture
def corpus() -> Path:
    if not (CORPUS / "SOURCES.md").exists():
        pytest.skip(f"the shared corpus is not at {CORPUS} (it lives beside the repository, not in it)")
    return CORPUS


def english(corpus) -> dict:
    """Overrides that train on the corpus' English books, 2% held out."""
    return {"data.train": f"{corpus}/en_*", "data.eval": f"{corpus}/en_*", "data.chunk_bytes": 4000,
            "data.holdout": 0.02}


def micro_config(**overrides):
    from hiermodel import config as config_lib

    return config_lib.load(MICRO, [f"{k}={v}" for k, v in overrides.items()])


def jit_apply(fn, model, *args):
    """fn(model, *args) under jax.jit: run eagerly, each of the model's operations would compile on
    its own (hundreds of compiles for one forward pass)."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    return jax.jit(lambda state, *args: fn(nnx.merge(graphdef, state), *args))(state, *args)


def packed_attention_inputs(dtype, heads: int, kv_heads: int, head_dim: int, rows: int = 2, length: int = 256,
                            seed: int = 0):
    """Queries, keys, values and segments of rows packed with documents and trailing padding
    (segment 0) for the attention kernels: the first row many short ones (1 to 40 positions), the
    others one long one (210 to 250), which every window below 210 cuts."""
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    segments = np.zeros((rows, length), np.int32)
    for row in range(rows):
        at, segment = 0, 1
        shortest, longest = (1, 40) if row == 0 else (210, 250)
        while at < length - 30:
            size = int(rng.integers(shortest, longest + 1))
            segments[row, at:at + size] = segment
            at, segment = at + size, segment + 1
    shape = lambda h: (rows, length, h, head_dim)
    q, k, v = (jnp.asarray(rng.normal(size=shape(h)), dtype) for h in (heads, kv_heads, kv_heads))
    return q, k, v, jnp.asarray(segments)


def run_cli(*args, env=None, timeout=600):
    """Run `python -m hiermodel.cli ARGS` in a fresh process; returns CompletedProcess."""
    import subprocess

    full_env = {**os.environ, "XLA_FLAGS": xla_flags(1), **(env or {})}
    return subprocess.run([sys.executable, "-m", "hiermodel.cli", *map(str, args)], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


# The slowest files first (longest-processing-time-first over the xdist workers, --dist=loadfile with
# --no-loadscope-reorder): a long file started last would run on alone after the other worker is done.
SLOWEST_FIRST = ["test_multihost.py", "test_object_storage.py", "test_gates.py", "test_generate.py",
                 "test_sharding.py", "test_cli.py", "test_compress.py", "test_compare.py", "test_integer_lm.py",
                 "test_gate_controller.py", "test_config.py", "test_aot.py", "test_model.py"]


def pytest_addoption(parser):
    parser.addoption("--all", action="store_true",
                     help="also run the end-to-end studies marked slow (CI does; about 6 more minutes on 2 cores)")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
    if not config.getoption("--all"):
        skip = pytest.mark.skip(reason="an end-to-end study over a minute long: run with --all (CI does)")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)
