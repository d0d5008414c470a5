"""Every mistake a user can make ends in one line on stderr naming the problem, exit code 2, and
leaves nothing behind: through the CLI, one row per mistake."""

import dataclasses
import os
import subprocess
import sys

import jax
import pytest

from hiermodel import cli
from hiermodel.config import to_dict
from hiermodel.errors import UserError
from hiermodel.train.loop import _check_resume, train
from tests.conftest import MICRO, REPO, micro_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished micro HAT run (two steps)."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    train(micro_config(run_dir=run_dir, **{"mesh.data": 1, "train.steps": 2}), devices=jax.devices()[:1])
    return run_dir


def listing(folder) -> dict:
    """Every file under folder with its size: what a failed command must not change."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


TRAIN = ["train", str(MICRO), "mesh.data=8"]
# (name, arguments with {run} for the trained run and {new} for a fresh path, what the line says)
CASES = [
    ("resume another model", TRAIN + ["run_dir={run}", "model.kind=byte"],
     "holds a checkpoint (step 2) of another model (model.kind='hat' there, 'byte' here"),
    ("resume another model size", TRAIN + ["run_dir={run}", "model.backbone_dim=32"],
     "of another model (model.backbone_dim=64 there, 32 here)"),
    ("resume another data stream", TRAIN + ["run_dir={run}", "data.train=builtin:eval"],
     "was trained on another data stream (data.train=['builtin:train'] there, ['builtin:eval'] here)"),
    ("resume another batch", TRAIN + ["run_dir={run}", "train.batch_size=16"],
     "another data stream (train.batch_size=8 there, 16 here)"),
    ("resume on other data shards", TRAIN + ["run_dir={run}", "data.shards=2"],
     "another data stream (data.shards=1 there, 2 here)"),
    ("resume with rows shuffled otherwise", TRAIN + ["run_dir={run}", "data.shuffle_rows=8"],
     "another data stream (data.shuffle_rows=1024 there, 8 here)"),
    ("row shuffle window negative", TRAIN + ["run_dir={new}", "data.shuffle_rows=-1"],
     "data.shuffle_rows=-1 must be 0 or more"),
    ("init_from another model", TRAIN + ["run_dir={new}", "init_from={run}", "model.backbone_layers=3"],
     "its model config differs from this run's"),
    ("init_from no run", TRAIN + ["run_dir={new}", "init_from={new}-missing"], "no such run directory"),
    ("eval interval zero", TRAIN + ["run_dir={new}", "train.eval_every=0"], "train.eval_every=0 must be at least 1"),
    ("log interval negative", TRAIN + ["run_dir={new}", "train.log_every=-1"], "train.log_every=-1 must be at least 1"),
    ("checkpoint interval zero", TRAIN + ["run_dir={new}", "train.checkpoint_every=0"],
     "train.checkpoint_every=0 must be at least 1"),
    ("checkpoint minutes negative", TRAIN + ["run_dir={new}", "train.checkpoint_minutes=-5"],
     "train.checkpoint_minutes=-5.0 must be 0 (off) or positive"),
    ("profile steps", TRAIN + ["run_dir={new}", "train.profile_steps=9"], "train.profile_steps='9': give START:END"),
    ("no steps", TRAIN + ["run_dir={new}", "train.steps=0"], "train.steps, train.batch_size and train.grad_accum"),
    ("batch over shards", TRAIN + ["run_dir={new}", "train.batch_size=3", "train.grad_accum=2"],
     "train.batch_size=3 must split into train.grad_accum=2"),
    ("unknown key", TRAIN + ["run_dir={new}", "train.stepz=3"], "unknown key 'stepz'"),
    ("unknown kind", TRAIN + ["run_dir={new}", "model.kind=rnn"], "model.kind='rnn' is not one of"),
    ("unknown stack remat", TRAIN + ["run_dir={new}", "model.decoder_remat=fully"],
     "model.decoder_remat='fully': use none, full, save_dots, offload, save_attention"),
    ("cudnn is gone", TRAIN + ["run_dir={new}", "model.attention=cudnn"], "model.attention='cudnn': use auto, xla"),
    ("mesh too big", TRAIN[:-1] + ["run_dir={new}", "mesh.data=3"], "mesh"),
    ("missing config", ["train", "{new}.yaml"], "{new}.yaml"),
    ("missing data", TRAIN + ["run_dir={new}", "data.train={new}-nothing/*.txt"], "{new}-nothing/*.txt"),
    ("eval no run", ["eval", "--checkpoint", "{new}", "--data", str(MICRO)], "{new}: no such run directory"),
    ("eval missing data", ["eval", "--checkpoint", "{run}", "--data", "{new}.txt"], "{new}.txt"),
    ("eval bad noise", ["eval", "--checkpoint", "{run}", "--data", str(MICRO), "--perturb", "shout:0.1"], "shout"),
    ("generate no bytes", ["generate", "--checkpoint", "{run}", "--prompt", "a", "--max-bytes", "0"],
     "--max-bytes must be at least 1"),
    ("generate no run", ["generate", "--checkpoint", "{new}", "--prompt", "a"], "{new}: no such run directory"),
    ("compress with a hat", ["compress", str(MICRO), "--m1", "{run}", "--output", "{new}"],
     "only an ungated byte model (model.kind=byte) can be M1"),
    ("decompress no shards", ["decompress", "{run}", "--m1", "{run}", "--output", "{new}.txt"],
     "not a window shard directory"),
    ("info unknown key", ["info", str(MICRO), "model.depth=3"], "unknown key 'depth'"),
]


@pytest.mark.parametrize("name,arguments,message", CASES, ids=[c[0] for c in CASES])
def test_each_mistake_is_one_line_exit_two_and_leaves_nothing(name, arguments, message, trained, tmp_path, capsys):
    new = tmp_path / "new"
    fill = lambda text: text.format(run=trained, new=new)
    before = listing(trained)
    code = cli.main([fill(a) for a in arguments])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and fill(message) in lines[0], err
    assert listing(trained) == before  # no events file, metrics line or checkpoint added
    assert not new.exists() and not list(tmp_path.glob("new*"))


def test_a_cpu_machine_hears_nothing_but_the_error_line(tmp_path):
    """A fresh process without JAX_PLATFORMS: libtpu (installed for compiling pods) stays quiet."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["XLA_FLAGS"] = ""
    result = subprocess.run([sys.executable, "-m", "hiermodel.cli", "train", str(MICRO), f"run_dir={tmp_path / 'r'}",
                             "train.eval_every=0"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["error: train.eval_every=0 must be at least 1 (a number of steps; set it "
                                          "above train.steps to do it only at the end)"]
    assert not (tmp_path / "r").exists()


def test_a_checkpoint_from_before_rows_were_shuffled_resumes_in_packing_order():
    config = micro_config()
    saved = to_dict(config)
    del saved["data"]["shuffle_rows"]  # as checkpoints saved before the option existed
    _check_resume(dataclasses.replace(config, data=dataclasses.replace(config.data, shuffle_rows=0)), 2, saved)
    with pytest.raises(UserError, match=r"data.shuffle_rows=0 there, 1024 here"):
        _check_resume(config, 2, saved)
