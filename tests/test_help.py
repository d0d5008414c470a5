"""The CLI teaches itself: every option has help and shows its default, --version, and a command
that prints every config key resolved."""

import argparse

import pytest
import yaml

from hiermodel import __version__, cli
from hiermodel import config as config_lib
from tests.conftest import MICRO


def subcommands() -> dict[str, argparse.ArgumentParser]:
    return cli.parser()._subparsers._group_actions[0].choices


def test_every_option_of_every_command_has_help_and_shows_its_default():
    for name, command in subcommands().items():
        for action in command._actions:
            assert action.help, f"hiermodel {name} {action.option_strings or action.dest}: no help"
        text = command.format_help()
        for action in command._actions:
            if action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS):
                assert f"(default: {action.default})" in " ".join(text.split()), (name, action.dest)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"hiermodel {__version__}\n"


def test_config_prints_every_key_resolved_and_reads_back_as_the_same_config(capsys, tmp_path):
    assert cli.main(["config", str(MICRO), "train.steps=7", "model.gate.layer=1"]) == 0
    printed = capsys.readouterr().out
    (tmp_path / "printed.yaml").write_text(printed)
    assert config_lib.load(tmp_path / "printed.yaml") == config_lib.load(MICRO, ["train.steps=7", "model.gate.layer=1"])
    keys = yaml.safe_load(printed)
    assert keys["train"]["steps"] == 7 and "checkpoint_minutes" in keys["train"] and "capacity_slack" in keys["model"]["gate"]
