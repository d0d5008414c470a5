"""Delete gates: hard deletion equals soft deletion when gates saturate, causality, the
controller on real text (byte model; a HAT in test_gate_controller.py), a learned gate against
random deletion, the gate's SGD, the controller in checkpoints."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from hiermodel.errors import UserError
from hiermodel.models import gates
from hiermodel.models.registry import build, check_kind
from hiermodel.train.step import token_nats
from tests.conftest import english, jit_apply, micro_config
from tests.test_model import row

TEXT = b"The quick brown fox jumps over the lazy dog, and then it runs far away into the woods."
SECOND = b"A second document, packed into the same row."


def gated_model(kind: str, **overrides):
    config = micro_config(**{"model.kind": kind, "model.gate.layer": 1, **overrides})
    return build(config.model, nnx.Rngs(0)), config


def forward(model, batch: dict, deletion: str = "soft", training: bool = False):
    return jit_apply(lambda model, batch: gates.forward(model, batch, deletion, training), model, batch)


def batch_of(*documents: bytes) -> dict:
    return {k: jnp.asarray(v) for k, v in row(*documents).items()}


def l1(tree) -> float:
    return float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(tree)))


def saturate(model) -> None:
    """Gates pushed to (almost exactly) 0 or k, about half each, as after long training."""
    model.gate.w[...] = model.gate.w[...] * 1e4
    model.gate.b[...] = jnp.zeros_like(model.gate.b[...])


# The stack's last layer on every position again, after two gated ones; or reading the kept ones only.
LAST_LAYER_FULL = {"model.backbone_layers": 4, "model.gate.full_layers": 1}
KEPT_KEYS = {**LAST_LAYER_FULL, "model.gate.full_keys": "kept"}
KEPT_AND_RECENT = {**KEPT_KEYS, "model.gate.full_recent": 4}  # ... and the 4 positions before each query


@pytest.mark.parametrize("kind, extra", [("byte", {}), ("hat", {}), ("byte", LAST_LAYER_FULL), ("hat", LAST_LAYER_FULL),
                                         ("byte", KEPT_KEYS), ("hat", KEPT_KEYS), ("byte", KEPT_AND_RECENT),
                                         ("hat", KEPT_AND_RECENT)],
                         ids=["byte", "hat", "byte, last layer full", "hat, last layer full",
                              "byte, last layer on kept keys", "hat, last layer on kept keys",
                              "byte, last layer on kept and recent keys", "hat, last layer on kept and recent keys"])
def test_hard_deletion_equals_soft_when_gates_saturate(kind, extra):
    # Slack so that the capacity holds every kept position: no overflow.
    model, _ = gated_model(kind, **{"model.gate.capacity_slack": 2.5, **extra})
    saturate(model)
    batch = batch_of(TEXT, SECOND)
    soft, soft_stats = forward(model, batch, "soft")
    hard, hard_stats = forward(model, batch, "hard")
    valid = np.asarray(batch["segments"] > 0)
    kept = np.asarray(hard_stats["kept"])[np.asarray(hard_stats["valid"])]
    assert 0.2 < kept.mean() < 0.8, "the test needs both kept and deleted positions"
    assert int(hard_stats["overflow"]) == 0
    np.testing.assert_array_equal(np.asarray(soft_stats["kept"]).round(), np.asarray(hard_stats["kept"]))
    np.testing.assert_allclose(np.asarray(hard)[valid], np.asarray(soft)[valid], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["byte", "hat"])
def test_with_straight_through_keys_the_forward_depends_only_on_the_decisions(kind):
    """Untrained gates spread around k / 2 give the same outputs, soft or hard, as saturated
    gates making the same decisions (saturate keeps the score's sign)."""
    def outputs(straight_through: bool, saturated: bool):
        model, _ = gated_model(kind, **{"model.gate.capacity_slack": 2.5, "model.gate.straight_through": straight_through,
                                        **LAST_LAYER_FULL})
        if saturated:
            saturate(model)
        model.gate.b[...] = jnp.zeros_like(model.gate.b[...])
        batch = batch_of(TEXT, SECOND)
        (soft, _), (hard, stats) = forward(model, batch, "soft"), forward(model, batch, "hard")
        kept = np.asarray(stats["kept"])[np.asarray(stats["valid"])]
        assert 0.2 < kept.mean() < 0.8 and int(stats["overflow"]) == 0
        valid = np.asarray(batch["segments"] > 0)
        return np.asarray(soft)[valid], np.asarray(hard)[valid]

    decided = outputs(False, saturated=True)[1]
    for out in outputs(True, saturated=False):
        np.testing.assert_allclose(out, decided, atol=2e-4, rtol=1e-4)
    assert not np.allclose(outputs(False, saturated=False)[1], decided, atol=2e-4, rtol=1e-4), \
        "without straight-through keys, kept keys are offset by their gate values"


@pytest.mark.parametrize("kind, extra", [("byte", {}), ("hat", {}), ("byte", LAST_LAYER_FULL), ("byte", KEPT_KEYS),
                                         ("byte", KEPT_AND_RECENT)],
                         ids=["byte", "hat", "byte, last layer full", "byte, last layer on kept keys",
                              "byte, last layer on kept and recent keys"])
def test_hard_deletion_is_causal_without_overflow(kind, extra):
    model, _ = gated_model(kind, **{"model.gate.capacity_slack": 2.5, **extra})
    logits = np.asarray(forward(model, batch_of(TEXT), "hard")[0])
    for t in [5, 30, 60]:
        changed = np.asarray(forward(model, batch_of(TEXT[:t + 1] + b"Q" * (len(TEXT) - t - 1)), "hard")[0])
        np.testing.assert_allclose(changed[0, :t + 2], logits[0, :t + 2], atol=1e-5, rtol=1e-5)
        assert not np.allclose(changed[0, t + 2:len(TEXT) + 1], logits[0, t + 2:len(TEXT) + 1], atol=1e-5)


@pytest.mark.parametrize("deletion", ["soft", "hard"])
def test_full_layers_on_kept_keys_read_no_deleted_position(deletion):
    """With the first layer's attention off, a deleted byte reaches later positions only through
    the full layer: with full_keys=all every later one in the byte window, with kept none, with
    kept and full_recent=4 the next three (within 4 positions of it) and no further."""
    def logits(extra: dict, text: bytes):
        model, _ = gated_model("byte", **{"model.gate.capacity_slack": 2.5, **LAST_LAYER_FULL, **extra})
        saturate(model)
        model.blocks[0].attn.wo[...] = jnp.zeros_like(model.blocks[0].attn.wo[...])
        out, stats = forward(model, batch_of(text), deletion)
        return np.asarray(out)[0], np.asarray(stats["kept"])[0]

    end, window = len(TEXT) + 1, gated_model("byte")[1].model.byte_window
    for extra, reaches in (({"model.gate.full_keys": "all"}, window - 1), (KEPT_KEYS, 0), (KEPT_AND_RECENT, 3)):
        before, kept = logits(extra, TEXT)
        # The same byte at a deleted position, changed: its gate decision must not change.
        t = next(t for t in range(20, len(TEXT) - 20) if kept[t + 1] < 0.5)
        for replacement in b"QZXJ":
            after, kept_after = logits(extra, TEXT[:t] + bytes([replacement]) + TEXT[t + 1:])
            if (kept_after == kept).all():
                break
        else:
            raise AssertionError("no replacement kept the gate's decisions")
        np.testing.assert_allclose(after[:t + 1], before[:t + 1], atol=1e-5, rtol=1e-5)  # causal
        assert not np.allclose(after[t + 1], before[t + 1], atol=1e-5)  # its own prediction
        change = np.abs(after - before).max(axis=-1)  # logits index i predicts from byte i - 1
        reached = change[t + 2:min(t + 2 + reaches, end)]
        assert (reached > 1e-3).all(), (extra, reached)
        assert (change[t + 2 + reaches:end] < 1e-5).all(), (extra, change[t + 2 + reaches:end])


def test_hard_deletion_runs_later_layers_on_the_capacity_and_counts_overflow():
    model, config = gated_model("byte", **{"model.gate.target": 0.75, "model.gate.capacity_slack": 1.0})
    model.gate.b[...] = jnp.full_like(model.gate.b[...], 40.0)  # every gate near 0: all want to stay
    batch = batch_of(TEXT)
    _, stats = forward(model, batch, "hard")
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
    _, stats = forward(model, batch, "hard")
    kept = np.nonzero(np.asarray(stats["kept"])[0])[0]
    assert kept.tolist() == [0, len(TEXT) + 1]


def test_bad_gate_settings_are_rejected():
    for overrides, message in [({"model.gate.layer": 2}, "at least one layer"),
                               ({"model.gate.full_layers": 1}, "model.gate.full_layers=1"),
                               ({"model.gate.full_layers": -1}, "model.gate.full_layers=-1"),
                               ({"model.gate.logit_cap": 20.0}, "logit_cap"),
                               ({"model.gate.mode": "fixed"}, "learned or random"),
                               ({"model.gate.full_keys": "deleted"}, "all or kept"),
                               ({"model.gate.full_recent": 4}, "full_recent=4: needs model.gate.full_keys=kept"),
                               ({"model.gate.full_keys": "kept", "model.gate.full_recent": -1}, "full_recent=-1"),
                               ({"model.gate.sgd_lr": -1e-3}, "sgd_lr=-0.001"),
                               ({"model.gate.target_warmup": -5}, "target_warmup=-5"),
                               ({"model.gate.noise": -1.0}, "noise=-1.0"),
                               ({"model.gate.calibrate": -2}, "calibrate=-2"),
                               ({"model.gate.calibrate": 4, "model.gate.mode": "random"}, "calibrate=4: .* learned")]:
        with pytest.raises(UserError, match=message):
            check_kind(micro_config(**{"model.kind": "byte", "model.gate.layer": 1, **overrides}).model)


@pytest.mark.parametrize("kind", ["byte", "hat"])
def test_a_detached_gate_is_the_only_part_its_regulariser_trains(kind):
    def regulariser_grads(detach: bool) -> dict:
        model, _ = gated_model(kind, **{"model.gate.detach": detach})
        graphdef, params = nnx.split(model, nnx.Param)

        def mean_gate(params):
            _, stats = gates.forward(nnx.merge(graphdef, params), batch_of(TEXT, SECOND))
            return (stats["gates"] * stats["valid"]).sum() / stats["valid"].sum()

        return nnx.to_pure_dict(jax.jit(jax.grad(mean_gate))(params))

    attached, detached = regulariser_grads(False), regulariser_grads(True)
    below_gate = [part for part in attached if part not in ("gate", "head", "norm")]
    assert l1(detached["gate"]) > 0 and l1(attached["gate"]) == pytest.approx(l1(detached["gate"]))
    assert l1({p: attached[p] for p in below_gate}) > 0
    assert l1({p: detached[p] for p in below_gate}) == 0.0


def test_without_the_carry_gradient_the_gate_learns_only_through_attention():
    # The gated layer's values zeroed: its attention reads nothing, so the gate values added to the
    # keys' logits change no output, and only the carry of its MLP's update can pass a gradient.
    def gate_grad_and_logits(carry_gradient: bool):
        model, _ = gated_model("byte", **{"model.backbone_layers": 2, "model.gate.carry_gradient": carry_gradient})
        model.blocks[1].attn.wv[...] = jnp.zeros_like(model.blocks[1].attn.wv[...])
        graphdef, params = nnx.split(model, nnx.Param)
        batch = batch_of(TEXT, SECOND)

        def nats(params):
            logits, _ = gates.forward(nnx.merge(graphdef, params), batch)
            return token_nats(logits, batch).sum(), logits

        grads, logits = jax.jit(jax.grad(nats, has_aux=True))(params)
        return l1(nnx.to_pure_dict(grads)["gate"]), logits

    with_carry, logits = gate_grad_and_logits(True)
    attention_only, same_logits = gate_grad_and_logits(False)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(same_logits))
    assert with_carry > 1e-3
    assert attention_only == 0.0


def test_gate_noise_varies_training_steps_only():
    def gate_values(noise: float, deletion: str, training: bool, *documents):
        model, _ = gated_model("byte", **{"model.gate.noise": noise})
        model.gate.b[...] = jnp.zeros_like(model.gate.b[...])  # scores near the threshold
        _, stats = forward(model, batch_of(*documents), deletion, training=training)
        return np.asarray(stats["gates"])[np.asarray(stats["valid"])]

    plain = gate_values(0.0, "soft", True, TEXT, SECOND)
    noisy = gate_values(1.0, "soft", True, TEXT, SECOND)
    k = micro_config().model.gate.k
    flipped = (plain <= k / 2) != (noisy <= k / 2)
    assert 0.05 < flipped.mean() < 0.5, "logistic noise of scale 1 flips some decisions near the threshold"
    np.testing.assert_array_equal(noisy, gate_values(1.0, "soft", True, TEXT, SECOND))  # reproducible
    for deletion in ("soft", "hard"):  # evaluation, in either mode, is unchanged
        np.testing.assert_array_equal(gate_values(1.0, deletion, False, TEXT, SECOND),
                                      gate_values(0.0, deletion, False, TEXT, SECOND))
    np.testing.assert_array_equal(gate_values(1.0, "soft", False, TEXT, SECOND), plain)


def train_gated(run_dir, steps: int, corpus=None, **overrides):
    from hiermodel.train.loop import train

    data = english(corpus) if corpus else {}
    config = micro_config(**{"model.kind": "byte", "model.gate.layer": 1, "run_dir": run_dir, "train.steps": steps,
                             "train.learning_rate": 3e-3, "train.warmup_steps": 10, "train.log_every": 1,
                             **data, **overrides})
    train(config)
    return config


@pytest.mark.slow
def test_the_controller_holds_the_target_rate_and_a_learned_gate_beats_random_deletion(tmp_path, corpus):
    from hiermodel.run import encoding
    from hiermodel.data.sources import open_split
    from hiermodel.eval.score import make_score_fn, score_source
    from hiermodel.train import state as state_lib
    from hiermodel.train.checkpoint import Checkpointer
    from hiermodel.train.metrics import read_metrics
    from hiermodel.sharding import make_mesh

    # One save, at the end (a save on eight devices costs more than a step; the run's numbers are the same).
    config = train_gated(str(tmp_path / "run"), 160, corpus, **{"model.gate.target": 0.3, "train.checkpoint_every": 160})
    logged = read_metrics(tmp_path / "run")
    realised = np.mean([logged[s]["deletion"] for s in range(121, 161)])
    assert abs(realised - 0.3) < 0.1, f"deleted {realised:.1%} over the last 40 steps, target 30%"

    mesh = make_mesh(config.mesh, jax.devices()[:1])
    source = open_split(config.data, "eval")
    with jax.set_mesh(mesh):
        graphdef, abstract = state_lib.abstract_params(config, mesh)
        checkpointer = Checkpointer(tmp_path / "run", read_only=True)
        params = checkpointer.restore_params(160, abstract)
        checkpointer.close()

        def hard_score(model_config):
            graph, _ = nnx.split(build(model_config, nnx.Rngs(0)))
            score_fn = make_score_fn(graph, "float32", mesh, jax.tree.map(lambda p: p.sharding, params), "hard")
            return score_source(score_fn, params, source, encoding(config).document, config.data, 8, mesh, max_rows=32)

        learned = hard_score(config.model)
        config.model.gate.mode, config.model.gate.target = "random", learned["deletion_rate"]
        random = hard_score(config.model)
    assert abs(random["deletion_rate"] - learned["deletion_rate"]) < 0.03
    assert learned["bpb"] < random["bpb"] - 0.05, (learned["bpb"], random["bpb"])
    del graphdef


def test_a_resumed_gated_run_continues_the_controller_exactly(tmp_path):
    import shutil

    from hiermodel.train.metrics import read_metrics

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_gated(str(straight), 8, **{"train.checkpoint_every": 4})
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "8")  # as if killed after the checkpoint of step 4
    train_gated(str(resumed), 8, **{"train.checkpoint_every": 4})
    a, b = read_metrics(straight), read_metrics(resumed)
    assert a[8]["alpha"] != 0.0
    assert [a[s]["alpha"] for s in range(5, 9)] == [b[s]["alpha"] for s in range(5, 9)]
    assert [a[s]["loss"] for s in range(5, 9)] == [b[s]["loss"] for s in range(5, 9)]


@pytest.mark.slow
def test_a_trained_model_continues_with_a_fresh_delete_gate(tmp_path):
    from hiermodel.run import load_params
    from hiermodel.train.loop import train

    base = micro_config(run_dir=tmp_path / "base", **{"mesh.data": 1, "train.steps": 2})
    train(base, devices=jax.devices()[:1])
    # One step at the first warmup learning rate (0): every weight stays what it was restored as.
    gated = micro_config(run_dir=tmp_path / "gated", init_from=str(tmp_path / "base"),
                         **{"mesh.data": 1, "model.gate.layer": 1, "train.steps": 1, "train.warmup_steps": 2})
    train(gated, devices=jax.devices()[:1])
    _, _, _, before = load_params(str(tmp_path / "base"))
    _, _, _, after = load_params(str(tmp_path / "gated"))
    fresh = nnx.to_pure_dict(nnx.state(build(gated.model, nnx.Rngs(gated.seed)), nnx.Param))
    assert set(after) == set(before) | {"gate"}
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves({k: after[k] for k in before}),
                                                     jax.tree.leaves(before)))
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(after["gate"]), jax.tree.leaves(fresh["gate"])))
    # Anything else that differs from the trained model is refused.
    with pytest.raises(UserError, match="differs"):
        train(micro_config(run_dir=tmp_path / "wider", init_from=str(tmp_path / "base"),
                           **{"mesh.data": 1, "model.gate.layer": 1, "model.backbone_mlp_dim": 256}),
              devices=jax.devices()[:1])


def test_a_gate_trained_by_sgd_steps_by_its_gradient_and_stays_out_of_the_clipping():
    from hiermodel.train.step import optimizer

    config = micro_config(**{"model.gate.layer": 1, "model.gate.sgd_lr": 0.1, "train.clip_norm": 1.0})
    params = nnx.to_pure_dict(nnx.state(build(config.model, nnx.Rngs(0)), nnx.Param))

    @jax.jit  # here and below: eagerly, every operation on every parameter's shape compiles on its own
    def small_gradients(params):
        keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params))))
        small = jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape), params)
        return jax.tree.map(lambda g: 0.1 * g / optax.tree.norm(small), small)  # far below the clipping norm

    small = small_gradients(params)
    # Step 1: a huge gradient on the gate only; step 2: none on it.
    steps = [{**small, "gate": jax.tree.map(lambda g: 1e3 * g, small["gate"])},
             {**small, "gate": jax.tree.map(jnp.zeros_like, small["gate"])}]

    def run(tx, gradients):
        state, updates, step = jax.jit(tx.init)(params), [], jax.jit(tx.update)
        for g in gradients:
            update, state = step(g, state, params)
            updates.append(update)
        return updates

    by_sgd = run(optimizer(config.train, config.model.gate), steps)
    assert all(np.allclose(u, -0.1 * g) for u, g in zip(jax.tree.leaves(by_sgd[0]["gate"]),
                                                        jax.tree.leaves(steps[0]["gate"])))
    # The rest moves as AdamW without the gate: never clipped. Had the gate's gradient counted in
    # the norm, step 1 would have been scaled down and step 2 not, which Adam's step 2 shows.
    rest = lambda tree: [x for k, v in tree.items() if k != "gate" for x in jax.tree.leaves(v)]
    config.model.gate.sgd_lr = 0.0
    adamw = optimizer(config.train, config.model.gate)
    alone = run(adamw, [{**g, "gate": jax.tree.map(jnp.zeros_like, g["gate"])} for g in steps])
    together = run(adamw, steps)
    assert any(np.abs(u).max() > 0 for u in rest(by_sgd[1]))
    assert all(np.allclose(u, e, atol=1e-9) for u, e in zip(rest(by_sgd[1]), rest(alone[1])))
    assert not all(np.allclose(u, e, atol=1e-9) for u, e in zip(rest(by_sgd[1]), rest(together[1])))


def test_the_controller_target_warms_up_linearly():
    from hiermodel.config import GateConfig
    from hiermodel.train.step import update_controller

    cfg = GateConfig(layer=1, target=0.5, target_warmup=10, kp=1.0, ki=1.0)
    zero = {"alpha": 0.0, "p": 0.0, "i": 0.0}
    for step in (0, 4, 9, 30):  # deleting the warmed-up target is no error
        assert float(update_controller(zero, 0.5 * min(1.0, (step + 1) / 10), step, cfg)["alpha"]) == 0.0
    assert float(update_controller(zero, 0.0, 4, cfg)["i"]) == pytest.approx(0.25)
    assert float(update_controller(zero, 0.0, 4, dataclasses.replace(cfg, target_warmup=0))["i"]) == pytest.approx(0.5)
