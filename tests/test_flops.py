"""The analytic FLOP count of each model kind against XLA's cost analysis of the compiled programs."""

import jax
import pytest

from hiermodel.models import registry
from hiermodel.train import state as state_lib
from hiermodel.train.sharding import make_mesh
from hiermodel.train.step import make_train_step, optimizer
from hiermodel.config import MeshConfig
from hiermodel.eval.score import make_score_fn
from hiermodel.train.aot import batch_shapes
from tests.conftest import micro_config

# Micro's depth and lengths (quick to compile) at widths where, as in real models, matmuls dominate.
WIDE = {"model.byte_dim": 128, "model.byte_heads": 2, "model.byte_kv_heads": 1, "model.byte_mlp_dim": 384,
        "model.pool_heads": 2, "model.backbone_dim": 256, "model.backbone_mlp_dim": 768}
CASES = {
    "hat local": {"model.kind": "hat"},
    "hat dense": {"model.kind": "hat", "model.byte_window": 0},
    "byte local": {"model.kind": "byte"},
    "subword": {"model.kind": "subword", "model.vocab_size": 1024},
    "hat remat full": {"model.kind": "hat", "model.remat": "full"},
    "byte remat save_dots": {"model.kind": "byte", "model.remat": "save_dots"},
    "byte gated": {"model.kind": "byte", "model.gate.layer": 1},
    "hat gated": {"model.kind": "hat", "model.gate.layer": 1},
}


def xla_flops(config, rows: int = 4) -> tuple[float, float]:
    """(train step, scoring forward) FLOPs of the compiled programs on one device."""
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    tx = optimizer(config.train, config.model.gate)
    with jax.set_mesh(mesh):
        layout = state_lib.layout(config, tx, mesh)
        step = jax.jit(make_train_step(layout.graphdef, tx, config.train, config.model))
        train = step.lower(layout.abstract, batch_shapes(config, rows)).compile().cost_analysis()["flops"]
        score = make_score_fn(layout.graphdef, config.model.compute_dtype, mesh, layout.param_shardings)
        forward = score.lower(layout.abstract["params"], batch_shapes(config, rows)).compile().cost_analysis()["flops"]
    return train, forward


@pytest.mark.parametrize("case", CASES)
def test_analytic_flops_match_xla_cost_analysis(case):
    config = micro_config(**WIDE, **CASES[case])
    rows, t, w = 4, config.data.row_tokens, config.data.row_words
    train, forward = xla_flops(config, rows)
    analytic_forward = rows * registry.forward_flops(config.model, t, w)
    analytic_train = rows * registry.train_flops(config.model, t, w)
    # XLA also counts elementwise work (softmax, norms, RoPE, the optimizer), which the
    # analytic matmul count leaves out: it may only add a few percent.
    assert analytic_forward <= forward <= 1.04 * analytic_forward
    assert analytic_train <= train <= 1.04 * analytic_train


def test_attention_window_changes_flops_as_counted():
    local, dense = (micro_config(**WIDE, **{"model.kind": "byte", "model.byte_window": window}) for window in (48, 0))
    t, w = local.data.row_tokens, local.data.row_words
    xla_saving = xla_flops(dense)[1] - xla_flops(local)[1]
    analytic_saving = 4 * (registry.forward_flops(dense.model, t, w) - registry.forward_flops(local.model, t, w))
    assert analytic_saving > 0
    assert abs(xla_saving - analytic_saving) <= 0.15 * analytic_saving
