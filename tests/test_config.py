from pathlib import Path

import jax
import pytest

from hiermodel import config as config_lib
from hiermodel.errors import UserError
from hiermodel.train.state import num_params

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_overrides_reach_typed_fields():
    config = config_lib.load(CONFIGS / "tiny.yaml", [
        "run_dir=/tmp/x", "train.steps=7", "data.train=a.txt,b/", "data.eval=c.jsonl",
        "train.learning_rate=1e-4", "model.remat=full"])
    assert config.run_dir == "/tmp/x" and config.train.steps == 7
    assert config.data.train == ["a.txt", "b/"] and config.data.eval == ["c.jsonl"]
    assert config.train.learning_rate == 1e-4 and config.model.remat == "full"
    listed = config_lib.load(CONFIGS / "tiny.yaml", ["train.freeze=[encoder, decoder]", "data.eval=[]"])
    assert listed.train.freeze == ["encoder", "decoder"] and listed.data.eval == []


def test_bad_keys_and_values_are_named(tmp_path):
    with pytest.raises(UserError, match="unknown key 'stepz'"):
        config_lib.load(CONFIGS / "tiny.yaml", ["train.stepz=3"])
    with pytest.raises(UserError, match="train.steps: expected int"):
        config_lib.load(CONFIGS / "tiny.yaml", ["train.steps=many"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  widht: 3\n")
    with pytest.raises(UserError, match=f"{bad}.model: unknown key 'widht'"):
        config_lib.load(bad)
    with pytest.raises(UserError, match="cannot read config"):
        config_lib.load(tmp_path / "missing.yaml")


def test_a_config_builds_on_its_base(tmp_path):
    (tmp_path / "pods").mkdir()
    (tmp_path / "model.yaml").write_text(f"base: {CONFIGS / 'tiny.yaml'}\nmodel:\n  backbone_layers: 5\n")
    (tmp_path / "pods" / "pod.yaml").write_text("base: ../model.yaml\ntrain:\n  batch_size: 64\n")
    config = config_lib.load(tmp_path / "pods" / "pod.yaml", ["train.steps=9"])
    tiny = config_lib.load(CONFIGS / "tiny.yaml")
    assert (config.model.backbone_layers, config.train.batch_size, config.train.steps) == (5, 64, 9)
    assert config.model.byte_dim == tiny.model.byte_dim and config.data == tiny.data
    (tmp_path / "model.yaml").write_text("base: pods/pod.yaml\n")
    with pytest.raises(UserError, match="configs name each other as base"):
        config_lib.load(tmp_path / "pods" / "pod.yaml")


SIZES = {"1b": (0.8e9, 1.2e9), "3b": (2.5e9, 3.5e9), "7b": (6.5e9, 8e9)}


@pytest.mark.parametrize("name, low, high", [(f"{kind}_{size}", *SIZES[size]) for kind in ("hat", "byte", "subword")
                                             for size in SIZES]
                         + [("tiny", 1e6, 1e7), ("tiny_byte", 1e6, 1e7), ("tiny_subword", 1e6, 1e7)])
def test_scale_configs_build_to_their_size(name, low, high):
    assert low < num_params(config_lib.load(CONFIGS / f"{name}.yaml")) < high


@pytest.mark.parametrize("key", ["log_every", "eval_every", "checkpoint_every"])
def test_intervals_of_zero_steps_are_refused_before_anything_compiles(key):
    from hiermodel.train.loop import validate
    from hiermodel.sharding import make_mesh

    config = config_lib.load(CONFIGS / "tiny.yaml", [f"train.{key}=0", "mesh.data=1"])
    with pytest.raises(UserError, match=f"train.{key}=0 must be at least 1"):
        validate(config, make_mesh(config.mesh, jax.devices()[:1]))
