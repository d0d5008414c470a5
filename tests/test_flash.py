"""The Pallas GPU flash path (models/flash.py), run by Pallas' interpreter on CPU, against this
codebase's XLA attention; and a train step lowered for CUDA, which needs no GPU."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import export

from hiermodel.config import MeshConfig
from hiermodel.models import flash
from hiermodel.models.layers import attention, attention_score_pairs, xla_attention
from hiermodel.models.registry import build, model_flops, train_flops
from hiermodel.sharding import make_mesh
from hiermodel.train.aot import lower_train_step
from tests.conftest import micro_config, packed_attention_inputs

HEAD_DIM = 16  # with packed_attention_inputs' 256 positions: four 64-position blocks


def interpreted(q, k, v, segments, window):
    return flash.flash_attention(q, k, v, segments, window, interpret=True)


# No window; one within a block; one across blocks; one longer than the row. Grouped-query
# (two and four query heads per key/value head) and multi-head attention.
@pytest.mark.parametrize("window, heads, kv_heads", [(0, 4, 2), (48, 2, 2), (200, 4, 1), (300, 2, 2)])
def test_the_kernel_equals_xla_attention_forward_and_backward(window, heads, kv_heads):
    q, k, v, segments = packed_attention_inputs(jnp.float32, heads, kv_heads, head_dim=HEAD_DIM)
    weights = jnp.cos(jnp.arange(HEAD_DIM, dtype=jnp.float32))
    loss = lambda f: (lambda q, k, v: (f(q, k, v, segments, window) * weights).sum())
    got = jax.jit(interpreted, static_argnums=4)(q, k, v, segments, window)
    np.testing.assert_allclose(got, xla_attention(q, k, v, segments, window), atol=2e-6)
    grads = jax.jit(jax.grad(loss(interpreted), argnums=(0, 1, 2)))(q, k, v)
    expected = jax.jit(jax.grad(loss(xla_attention), argnums=(0, 1, 2)))(q, k, v)
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_the_kernel_in_bfloat16_stays_within_its_rounding():
    q, k, v, segments = packed_attention_inputs(jnp.bfloat16, 4, 2, head_dim=HEAD_DIM)
    loss = lambda f: (lambda q, k, v: f(q, k, v, segments, 48).astype(jnp.float32).sum())
    got = jax.jit(interpreted, static_argnums=4)(q, k, v, segments, 48)
    want = xla_attention(*(x.astype(jnp.float32) for x in (q, k, v)), segments, 48)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.05)
    grads = jax.jit(jax.grad(loss(interpreted), argnums=(0, 1, 2)))(q, k, v)
    expected = jax.grad(loss(xla_attention), argnums=(0, 1, 2))(*(x.astype(jnp.float32) for x in (q, k, v)))
    for got, want in zip(grads, expected):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.1, rtol=0.05)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the compiled kernel needs a GPU (Triton)")
@pytest.mark.parametrize("window, heads, kv_heads, head_dim", [(0, 4, 2, 64), (48, 2, 2, 128), (200, 4, 1, 64)])
def test_the_compiled_kernel_on_a_gpu_equals_xla_attention(window, heads, kv_heads, head_dim):
    q, k, v, segments = packed_attention_inputs(jnp.bfloat16, heads, kv_heads, head_dim=head_dim)
    loss = lambda f: (lambda q, k, v: f(q, k, v, segments, window).astype(jnp.float32).sum())
    compiled = functools.partial(flash.flash_attention, interpret=False)
    exact = [x.astype(jnp.float32) for x in (q, k, v)]
    np.testing.assert_allclose(np.asarray(jax.jit(compiled, static_argnums=4)(q, k, v, segments, window), np.float32),
                               jax.jit(xla_attention, static_argnums=4)(*exact, segments, window), atol=0.05)
    grads = jax.jit(jax.grad(loss(compiled), argnums=(0, 1, 2)))(q, k, v)
    expected = jax.jit(jax.grad(loss(xla_attention), argnums=(0, 1, 2)))(*exact)
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("kernel", ["flash", "splash"])
def test_a_hat_with_a_kernel_on_an_eight_device_mesh_equals_the_xla_one(kernel):
    """Both kernels (splash's is checked alone in test_splash) in a HAT's byte stacks and
    backbone, per shard of a data x fsdp mesh, against the XLA attention."""
    config = micro_config(**{"model.attention": kernel, "data.row_words": 128})  # splash needs 128 positions
    graphdef, params = nnx.split(build(config.model, nnx.Rngs(0)))
    xla_graphdef, _ = nnx.split(build(dataclasses.replace(config.model, attention="xla"), nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (8, 256)).astype(np.int32)
    words = np.minimum(np.arange(256) // 2, 127)[None].repeat(8, 0).astype(np.int32)
    two_documents = lambda n, at: (np.arange(n) >= at).astype(np.int32)[None].repeat(8, 0) + 1
    batch = {"tokens": tokens, "segments": two_documents(256, 100), "words": words,
             "word_segments": two_documents(128, 50)}
    mesh = make_mesh(MeshConfig(data=2, fsdp=4, tensor=1))
    with jax.set_mesh(mesh):
        sharded = jax.device_put(batch, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"))))
        run = lambda g: jax.jit(lambda p, b: nnx.merge(g, p)(b))(params, sharded)
        np.testing.assert_allclose(run(graphdef), run(xla_graphdef), atol=2e-4)


@pytest.mark.parametrize("attention", ["auto", "xla"])
def test_a_bfloat16_train_step_lowered_for_cuda_runs_the_kernel_and_builds_no_score_matrix(attention):
    """auto on a GPU in bfloat16: forward, dK/dV and dQ kernels in every attention (encoder,
    backbone, decoder), and nothing computes a [W, W] array of the backbone's words (no scores,
    no dense mask, no bias); the XLA attention, lowered the same way, computes them. (The program
    still holds zero-filled [W, W] residuals: differentiating lax.platform_dependent unites both
    branches' residuals, and XLA drops the unused constants once it knows the platform.)"""
    words = 192  # unlike any width of the micro model, so a [.., 192, 192] array can only be scores
    config = micro_config(**{"model.compute_dtype": "bfloat16", "model.attention": attention, "data.row_words": words,
                             "mesh.data": 1, "mesh.fsdp": 1, "train.batch_size": 2})
    text = lower_train_step(config, make_mesh(config.mesh, jax.devices()[:1]), "cuda").as_text()
    names = re.findall(r'name = "(flash_\w+)"', text)
    scores = re.search(rf"(dot_general|compare)[^\n]*-> tensor<(\d+x)*{words}x{words}x", text)
    if attention == "xla":
        assert not names and scores
        return
    stacks = config.model.encoder_layers + config.model.backbone_layers + config.model.decoder_layers
    assert sorted(names) == sorted(["flash_forward", "flash_dkdv", "flash_dq"] * stacks)
    assert not scores


@pytest.mark.parametrize("remat, runs", [("full", 2), ("save_attention", 1)])
def test_save_attention_keeps_the_forward_kernels_output_for_the_backward(remat, runs):
    """Full remat runs each attention's forward kernel again in the backward; save_attention
    keeps its outputs instead."""
    config = micro_config(**{"model.compute_dtype": "bfloat16", "model.remat": remat, "mesh.data": 1, "mesh.fsdp": 1,
                             "train.batch_size": 2})
    text = lower_train_step(config, make_mesh(config.mesh, jax.devices()[:1]), "cuda").as_text()
    m = config.model
    layers = m.encoder_layers + m.backbone_layers + m.decoder_layers
    assert re.findall(r'name = "(flash_\w+)"', text).count("flash_forward") == runs * layers


def test_save_attention_counts_the_kernels_scores_once_less_than_full_remat():
    config = micro_config(**{"model.compute_dtype": "bfloat16", "model.remat": "full"})
    m, t, w = config.model, config.data.row_tokens, config.data.row_words
    full, saved = (train_flops(dataclasses.replace(m, remat=remat), t, w, platform="gpu")
                   for remat in ("full", "save_attention"))
    byte_pairs = attention_score_pairs(t, m.byte_window, "flash", 16)
    word_pairs = attention_score_pairs(w, 0, "flash", 16)
    scores = 2 * 2 * ((m.encoder_layers + m.decoder_layers) * m.byte_dim * byte_pairs
                      + m.backbone_layers * m.backbone_dim * word_pairs)
    assert full - saved == scores > 0


def test_the_hardware_count_skips_the_blocks_the_kernel_skips():
    assert not flash.supports(100, 16) and not flash.supports(256, 8) and not flash.supports(256, 48)
    assert flash.supports(256, 128) and not flash.supports(256, 256)
    assert attention_score_pairs(100, 0, "flash", 16) == 100 * 100  # the XLA attention's
    n = 16384 // 64
    assert attention_score_pairs(16384, 0, "flash", 128) == n * (n + 1) // 2 * 64 * 64
    # A 100-position window reaches the diagonal block and one or two below it.
    assert attention_score_pairs(16384, 100, "flash", 128) == (n + (n - 1) + (n - 2)) * 64 * 64
    config = micro_config(**{"data.row_tokens": 16384, "data.row_words": 4096, "model.byte_window": 768,
                             "model.compute_dtype": "bfloat16"})
    shape = (config.model, 16384, 4096)
    assert model_flops(*shape) < train_flops(*shape, platform="gpu") < train_flops(*shape, platform="cpu")


def test_auto_keeps_the_xla_attention_off_gpu_and_for_unsupported_shapes():
    q, k, v, segments = packed_attention_inputs(jnp.bfloat16, 2, 2, rows=1, head_dim=HEAD_DIM)
    text = jax.jit(lambda *a: attention(*a, 48, "auto")).lower(q, k, v, segments).as_text()
    assert "flash" not in text
    short = [x[:, :100] for x in (q, k, v, segments)]
    lowered = export.export(jax.jit(lambda *a: attention(*a, 48, "flash")), platforms=["cuda"])(*short)
    assert "triton" not in lowered.mlir_module()
