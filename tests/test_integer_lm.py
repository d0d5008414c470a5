"""The integer M1: CDFs bit-identical across batch sizes, neighbours, stale caches, cache paths,
row orders and device counts; the CDF contract; quality close to the float model; save/load."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hiermodel.compress import integer_lm
from hiermodel.compress.integer_lm import IntegerLM, IntegerPredictor, quantize, sequence_cdfs
from hiermodel.compress.predictor import CDF_BITS
from hiermodel.data.builtin import builtin_documents
from hiermodel.errors import UserError
from hiermodel.models.registry import build
from hiermodel.text.words import BOS_ID
from tests.conftest import jit_apply, micro_config

MAX_CONTEXT = 32
PROBES = [b"The quick brown fox jumps over the lazy dog.", b"def f(x):\n    return x", "Grüße, 世界".encode()]
BYTE_OVERRIDES = {"model.kind": "byte", "model.byte_window": 64}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(run directory, config) of a micro byte model trained briefly on the built-in text."""
    from hiermodel.train.loop import train

    run_dir = tmp_path_factory.mktemp("byte") / "run"
    config = micro_config(run_dir=run_dir, **BYTE_OVERRIDES, **{
        "mesh.data": 1, "train.steps": 60, "train.learning_rate": 1e-2, "train.warmup_steps": 5,
        "train.checkpoint_every": 60, "train.log_every": 20})
    train(config, devices=jax.devices()[:1])
    return run_dir, config


@pytest.fixture(scope="module")
def model(trained) -> IntegerLM:
    return IntegerLM.from_run(str(trained[0]), max_context=MAX_CONTEXT)


def probe_tokens(text: bytes) -> np.ndarray:
    """BOS and the bytes a row is fed (all but the last, whose CDF is the last one used)."""
    return np.concatenate([[BOS_ID], np.frombuffer(text, np.uint8)]).astype(np.int32)[:MAX_CONTEXT]


def run_probe(predictor, probe: np.ndarray, batch: int, row: int, seed: int, stale: int = 0) -> np.ndarray:
    """The CDFs of `probe` fed to `row` of a batch whose other rows are fed random tokens at
    random positions (restarting now and then); `stale` garbage positions are first left in the
    probe's row. Returns [len(probe), 257]."""
    rng = np.random.default_rng(seed)
    state = predictor.start(batch)
    positions = rng.integers(0, MAX_CONTEXT, batch).astype(np.int32)

    def step(state, probe_token, probe_position):
        nonlocal positions
        positions = np.where(rng.random(batch) < 0.2, 0, (positions + 1) % MAX_CONTEXT).astype(np.int32)
        tokens = rng.integers(0, 258, batch).astype(np.int32)
        tokens[row], positions[row] = probe_token, probe_position
        return predictor.step(state, tokens, positions)

    for position in range(stale):
        state, _ = step(state, rng.integers(0, 256), position)
    cdfs = []
    for position, token in enumerate(probe):
        state, cdf = step(state, token, position)
        cdfs.append(cdf[row])
    return np.stack(cdfs)


def assert_valid_cdfs(cdf):
    assert cdf.dtype == np.int64 and cdf.shape[-1] == 257
    assert np.all(cdf[..., 0] == 0) and np.all(cdf[..., 256] == 2**CDF_BITS)
    assert np.all(np.diff(cdf, axis=-1) >= 1)


def test_cdfs_do_not_depend_on_batch_size_neighbours_or_stale_cache(model):
    predictor = IntegerPredictor(model)
    for probe in map(probe_tokens, PROBES):
        alone = run_probe(predictor, probe, batch=1, row=0, seed=0)
        assert_valid_cdfs(alone)
        assert np.array_equal(alone, run_probe(predictor, probe, batch=7, row=3, seed=1))
        assert np.array_equal(alone, run_probe(predictor, probe, batch=64, row=50, seed=2, stale=MAX_CONTEXT - 1))


def test_incremental_steps_equal_whole_rows_recomputed_from_position_zero(model):
    rows = np.stack([np.resize(probe_tokens(p), 24) for p in PROBES])
    predictor = IntegerPredictor(model)
    state, steps = predictor.start(len(rows)), []
    for position in range(rows.shape[1]):
        state, cdf = predictor.step(state, rows[:, position], np.full(len(rows), position, np.int32))
        steps.append(cdf)
    whole = sequence_cdfs(model, rows)
    assert_valid_cdfs(whole)
    assert np.array_equal(np.stack(steps, axis=1), whole)
    assert np.array_equal(sequence_cdfs(model, rows[:1])[0], whole[0])  # and alone


def test_row_order_does_not_matter(model):
    rng = np.random.default_rng(3)
    tokens, positions = rng.integers(0, 256, (5, 16)).astype(np.int32), np.arange(5, dtype=np.int32)
    order = rng.permutation(16)
    predictor = IntegerPredictor(model)
    states = [predictor.start(16), predictor.start(16)]
    for t in range(5):
        states[0], straight = predictor.step(states[0], tokens[t], np.full(16, positions[t]))
        states[1], permuted = predictor.step(states[1], tokens[t, order], np.full(16, positions[t]))
        assert np.array_equal(straight[order], permuted)


def test_eight_devices_give_the_cdfs_of_one(model):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py forces 8 CPU devices)")
    rng = np.random.default_rng(4)
    batch = 13  # padded to 16 rows, two per device
    one, eight = IntegerPredictor(model), IntegerPredictor(model, jax.devices()[:8])
    states = [one.start(batch), eight.start(batch)]
    positions = np.zeros(batch, np.int32)
    for _ in range(12):
        tokens = rng.integers(0, 256, batch).astype(np.int32)
        states[0], single = one.step(states[0], tokens, positions)
        states[1], sharded = eight.step(states[1], tokens, positions)
        assert np.array_equal(single, sharded)
        positions = np.where(rng.random(batch) < 0.25, 0, positions + 1).astype(np.int32)


def test_the_predictor_rejects_positions_past_max_context(model):
    predictor = IntegerPredictor(model)
    with pytest.raises(ValueError, match="max_context"):
        predictor.step(predictor.start(2), np.zeros(2, np.int32), np.array([0, MAX_CONTEXT], np.int32))


def test_quantised_bits_per_byte_stay_close_to_the_float_model(trained, model):
    from hiermodel.run import load_params

    _, config = trained
    _, _, _, params = load_params(str(trained[0]))
    held_out = [text for _, text in builtin_documents("eval")][:6]
    context = MAX_CONTEXT - 1
    float_bpb = integer_lm.float_bits_per_byte(params, config, held_out, context)
    integer_bpb = integer_lm.integer_bits_per_byte(model, held_out, context)
    assert float_bpb < 5.0, f"the model did not learn ({float_bpb:.3f} bits per byte)"
    assert abs(integer_bpb / float_bpb - 1) < 0.03, (float_bpb, integer_bpb)


def test_the_float_mirror_is_the_byte_model():
    config = micro_config(**BYTE_OVERRIDES)
    byte_model = build(config.model, nnx.Rngs(1))
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, 258, (2, 30)), jnp.int32)
    expected = jit_apply(lambda model, tokens: model({"tokens": tokens, "segments": jnp.zeros_like(tokens)}),
                         byte_model, tokens)
    logits, _ = integer_lm.float_forward(nnx.to_pure_dict(nnx.state(byte_model, nnx.Param)), config.model, tokens)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_save_and_load_give_the_same_integers_and_cdfs(model, tmp_path):
    path = tmp_path / "m1.npz"
    model.save(path)
    loaded = IntegerLM.load(path)
    assert loaded.shape == model.shape and loaded.fingerprint() == model.fingerprint()
    rows = np.stack([np.resize(probe_tokens(p), 20) for p in PROBES])
    assert np.array_equal(sequence_cdfs(loaded, rows), sequence_cdfs(model, rows))


def test_a_bad_model_file_is_named_in_a_clear_error(model, tmp_path):
    path = tmp_path / "m1.npz"
    model.save(path)
    data = bytearray(path.read_bytes())
    broken = tmp_path / "broken.npz"
    broken.write_bytes(data[:len(data) // 2])
    with pytest.raises(UserError, match="broken.npz"):
        IntegerLM.load(broken)
    flipped = tmp_path / "flipped.npz"
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    with pytest.raises(UserError, match="flipped.npz"):
        IntegerLM.load(flipped)
    text = tmp_path / "text.npz"
    text.write_text("not a model")
    with pytest.raises(UserError, match="text.npz: not an integer M1 file"):
        IntegerLM.load(text)
    with pytest.raises(UserError, match="missing.npz: no such file"):
        IntegerLM.load(tmp_path / "missing.npz")


def test_a_file_of_another_format_version_is_refused(model, tmp_path, monkeypatch):
    path = tmp_path / "future.npz"
    monkeypatch.setattr(integer_lm, "FORMAT_VERSION", integer_lm.FORMAT_VERSION + 1)
    model.save(path)
    monkeypatch.undo()
    with pytest.raises(UserError, match=f"future.npz: integer M1 format {integer_lm.FORMAT_VERSION + 1}"):
        IntegerLM.load(path)


def test_only_an_ungated_byte_model_is_quantised():
    config = micro_config()  # a HAT
    with pytest.raises(UserError, match="model.kind=byte"):
        quantize({}, config)


def test_integer_rms_norm_ignores_the_row_scale_and_survives_extremes():
    rng = np.random.default_rng(6)
    norm = integer_lm.Requant(jnp.full((64,), 40000, jnp.int32), jnp.full((64,), 22, jnp.int32))
    row = rng.integers(-2**12, 2**12, (1, 1, 64)).astype(np.int32)
    scaled = np.concatenate([row * 2**k for k in range(0, 18)], axis=1)  # up to 2**29
    out = np.asarray(integer_lm._normalize(jnp.asarray(scaled), norm))
    assert np.all(out == out[:, :1])
    assert np.all(np.asarray(integer_lm._normalize(jnp.zeros((1, 1, 64), jnp.int32), norm)) == 0)


def test_integer_square_root_is_exact():
    n = np.concatenate([np.arange(2000), np.random.default_rng(7).integers(0, 2**30, 5000)]).astype(np.int32)
    assert np.array_equal(np.asarray(integer_lm._isqrt(jnp.asarray(n))), [math.isqrt(int(v)) for v in n])
