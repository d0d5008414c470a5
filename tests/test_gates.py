"""Delete gates: hard deletion equals soft deletion when gates saturate, causality, the
controller on real text, a learned gate against random deletion, the controller in checkpoints."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hiermodel.errors import UserError
from hiermodel.models import gates
from hiermodel.models.registry import build, check_kind
from tests.conftest import micro_config
from tests.test_model import row

TEXT = b"The quick brown fox jumps over the lazy dog, and then it runs far away into the woods."
SECOND = b"A second document, packed into the same row."


def gated_model(kind: str, **overrides):
    config = micro_config(**{"model.kind": kind, "model.gate.layer": 1, **overrides})
    return build(config.model, nnx.Rngs(0)), config


def batch_of(*documents: bytes) -> dict:
    return {k: jnp.asarray(v) for k, v in row(*documents).items()}


def saturate(model) -> None:
    """Gates pushed to (almost exactly) 0 or k, about half each, as after long training."""
    model.gate.w[...] = model.gate.w[...] * 1e4
    model.gate.b[...] = jnp.zeros_like(model.gate.b[...])


@pytest.mark.parametrize("kind", ["byte", "hat"])
def test_hard_deletion_equals_soft_when_gates_saturate(kind):
    # Slack so that the capacity holds every kept position: no overflow.
    model, _ = gated_model(kind, **{"model.gate.capacity_slack": 2.5})
    saturate(model)
    batch = batch_of(TEXT, SECOND)
    soft, soft_stats = gates.forward(model, batch, "soft")
    hard, hard_stats = gates.forward(model, batch, "hard")
    valid = np.asarray(batch["segments"] > 0)
    kept = np.asarray(hard_stats["kept"])[np.asarray(hard_stats["valid"])]
    assert 0.2 < kept.mean() < 0.8, "the test needs both kept and deleted positions"
    assert int(hard_stats["overflow"]) == 0
    np.testing.assert_array_equal(np.asarray(soft_stats["kept"]).round(), np.asarray(hard_stats["kept"]))
    np.testing.assert_allclose(np.asarray(hard)[valid], np.asarray(soft)[valid], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["byte", "hat"])
def test_hard_deletion_is_causal_without_overflow(kind):
    model, _ = gated_model(kind, **{"model.gate.capacity_slack": 2.5})
    graphdef, params = nnx.split(model)
    jitted = jax.jit(lambda p, b: gates.forward(nnx.merge(graphdef, p), b, "hard")[0])
    forward = lambda b: jitted(params, b)
    logits = np.asarray(forward(batch_of(TEXT)))
    for t in [5, 30, 60]:
        changed = np.asarray(forward(batch_of(TEXT[:t + 1] + b"Q" * (len(TEXT) - t - 1))))
        np.testing.assert_allclose(changed[0, :t + 2], logits[0, :t + 2], atol=1e-5, rtol=1e-5)
        assert not np.allclose(changed[0, t + 2:len(TEXT) + 1], logits[0, t + 2:len(TEXT) + 1], atol=1e-5)


def test_hard_deletion_runs_later_layers_on_the_capacity_and_counts_overflow():
    model, config = gated_model("byte", **{"model.gate.target": 0.75, "model.gate.capacity_slack": 1.0})
    model.gate.b[...] = jnp.full_like(model.gate.b[...], 40.0)  # every gate near 0: all want to stay
    batch = batch_of(TEXT)
    _, stats = gates.forward(model, batch, "hard")
    n = config.data.row_tokens
    c = gates.capacity(n, config.model.gate)
    assert c == math.ceil(n * 0.25)
    valid = int(stats["valid"].sum())
    assert int(stats["kept"].sum()) == c
    assert int(stats["overflow"]) == valid - c


def test_segment_starts_are_always_kept():
    model, _ = gated_model("byte")
    model.gate.b[...] = jnp.full_like(model.gate.b[...], -40.0)  # every gate near k
    batch = batch_of(TEXT, SECOND)
    _, stats = gates.forward(model, batch, "hard")
    kept = np.nonzero(np.asarray(stats["kept"])[0])[0]
    assert kept.tolist() == [0, len(TEXT) + 1]


def test_bad_gate_settings_are_rejected():
    for overrides, message in [({"model.gate.layer": 2}, "at least one layer"),
                               ({"model.gate.logit_cap": 20.0}, "logit_cap"),
                               ({"model.gate.mode": "fixed"}, "learned or random")]:
        with pytest.raises(UserError, match=message):
            check_kind(micro_config(**{"model.kind": "byte", "model.gate.layer": 1, **overrides}).model)
