"""The Pallas splash attention path (models/splash.py), run by Pallas' interpreter on CPU,
against this codebase's XLA attention; and the TPU program compiled ahead of time."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hiermodel.models import splash
from hiermodel.models.layers import attention_score_pairs, xla_attention
from hiermodel.models.registry import model_flops, train_flops
from hiermodel.sharding import make_mesh
from tests.conftest import micro_config, packed_attention_inputs

# Rows of 256 positions (two 128-position blocks): no window; one within a block; one across
# blocks. Grouped-query and multi-head attention.
@pytest.mark.parametrize("window, heads, kv_heads", [(0, 4, 2), (48, 2, 2), (200, 4, 2)])
def test_the_kernel_equals_xla_attention_forward_and_backward(window, heads, kv_heads):
    q, k, v, segments = packed_attention_inputs(jnp.float32, heads, kv_heads, head_dim=8, rows=1)
    weights = jnp.cos(jnp.arange(8.0))
    loss = lambda f: (lambda q, k, v: (f(q, k, v, segments, window) * weights).sum())
    kernel = jax.jit(lambda *a: splash.splash_attention(*a, interpret=True), static_argnums=4)
    np.testing.assert_allclose(kernel(q, k, v, segments, window), xla_attention(q, k, v, segments, window), atol=2e-6)
    grads = jax.jit(jax.grad(loss(lambda *a: splash.splash_attention(*a, interpret=True)), argnums=(0, 1, 2)))(q, k, v)
    expected = jax.grad(loss(xla_attention), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_the_kernel_in_bfloat16_stays_within_its_rounding():
    q, k, v, segments = packed_attention_inputs(jnp.bfloat16, 4, 2, head_dim=8, rows=1)
    got = jax.jit(lambda *a: splash.splash_attention(*a, 48, interpret=True))(q, k, v, segments)
    want = xla_attention(q, k, v, segments, 48)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=0.05)


def test_the_hardware_count_skips_the_blocks_the_kernel_skips():
    assert splash.block_size(16384) == 512 and splash.block_size(384) == 128 and splash.block_size(512) == 256
    assert not splash.supports(100)
    assert attention_score_pairs(100, 0, "splash") == 100 * 100  # the XLA attention's
    n = 16384 // 512
    assert attention_score_pairs(16384, 0, "splash") == n * (n + 1) // 2 * 512 * 512
    # A 768-byte window reaches the diagonal block and two or three below it, never four.
    assert attention_score_pairs(16384, 768, "splash") == (n + (n - 1) + (n - 2)) * 512 * 512
    config = micro_config(**{"data.row_tokens": 16384, "data.row_words": 4096, "model.byte_window": 768})
    m, shape = config.model, (config.model, 16384, 4096)
    assert model_flops(*shape) < train_flops(*shape, platform="tpu")

    def kernel_minus_xla(layers: int, dim: int, length: int, window: int) -> int:
        """Three forwards over the kernel's pairs instead of XLA's, and its backward's rescoring
        (7 attention matmuls for autodiff's 4): 1.5 forwards of its pairs."""
        kernel, xla = attention_score_pairs(length, window, "splash"), attention_score_pairs(length, window)
        return layers * 2 * 2 * dim * (3 * (kernel - xla) + 3 * kernel // 2)

    difference = (kernel_minus_xla(m.encoder_layers + m.decoder_layers, m.byte_dim, 16384, 768)
                  + kernel_minus_xla(m.backbone_layers, m.backbone_dim, 4096, 0))
    assert train_flops(*shape, platform="tpu") - train_flops(*shape, platform="cpu") == difference


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_a_step_compiled_for_tpu_runs_the_kernel_with_auto():
    from hiermodel.train.aot import compile_train_step, target_devices

    config = micro_config(**{"mesh.data": 1, "mesh.fsdp": -1, "train.batch_size": 8, "data.row_words": 128})
    assert config.model.attention == "auto"
    compiled = compile_train_step(config, make_mesh(config.mesh, target_devices("v5p-8")))
    assert "tpu_custom_call" in compiled.as_text()  # the Mosaic kernel, in the forward and backward
