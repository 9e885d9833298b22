"""Config flags and presets parse, every script answers --help (with the chosen preset's values), a misspelt flag
gets the closest real one."""

import dataclasses
import re
import runpy
import sys
from pathlib import Path

import pytest

import train_grpo
import train_sft
from vlaa_min.infra.cli import parse_config
from vlaa_min.presets import make_config, presets_of


@dataclasses.dataclass
class _Config:
    lr: float = dataclasses.field(default=1e-5, metadata={"help": "peak learning rate"})
    freeze_vision: bool = True
    model: str | None = None
    steps: int = 10


def test_flags_are_derived_from_the_dataclass_with_real_bools():
    cfg = parse_config(_Config, ["--lr", "3e-4", "--freeze-vision", "false", "--model", "m", "--steps", "7"])
    assert cfg == _Config(lr=3e-4, freeze_vision=False, model="m", steps=7)
    assert parse_config(_Config, ["--model", "none"]).model is None
    with pytest.raises(SystemExit):
        parse_config(_Config, ["--freeze-vision", "maybe"])


@pytest.mark.parametrize("config_cls", [train_sft.SFTConfig, train_grpo.GRPOConfig])
def test_every_preset_names_real_fields_and_builds(config_cls):
    fields = {f.name for f in dataclasses.fields(config_cls)}
    for name, values in presets_of(config_cls).items():
        assert set(values) <= fields, (name, set(values) - fields)
        config = make_config(config_cls, name)
        assert all(getattr(config, key) == value for key, value in values.items()), name


def test_a_preset_sets_defaults_and_flags_override_it():
    recipe = presets_of(train_sft.SFTConfig)["toy-base"]
    cfg = parse_config(train_sft.SFTConfig, ["--preset", "toy-base", "--lr", "2e-3"])
    assert cfg.lr == 2e-3 and cfg.steps == recipe["steps"] and cfg.batch_size == recipe["batch_size"]
    assert parse_config(train_sft.SFTConfig, []).steps == 0  # no preset: the dataclass defaults
    with pytest.raises(SystemExit):
        parse_config(train_sft.SFTConfig, ["--preset", "no-such-recipe"])
    with pytest.raises(ValueError, match="unknown preset"):
        make_config(train_grpo.GRPOConfig, "no-such-recipe")


ROOT = Path(__file__).resolve().parent.parent
# Every command-line entry point, as the README and the Makefile call it.
SCRIPTS = [["train_sft.py"], ["train_grpo.py"], ["evaluate.py"], ["control.py"], ["experiment.py"], ["toyworld.py"],
           ["-m", "pipeline"], ["-m", "vlaa_min.toy_model"], ["-m", "vlaa_min.view"]]


@pytest.mark.parametrize("command", SCRIPTS, ids=" ".join)
@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # other tests imported the module
def test_every_script_prints_its_help(command, monkeypatch, capsys):
    """`python SCRIPT --help` run as __main__ in this process (torch is imported once, not nine times)."""
    monkeypatch.setattr(sys, "argv", [command[-1], "--help"])
    with pytest.raises(SystemExit) as exited:
        if command[0] == "-m":
            runpy.run_module(command[1], run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(str(ROOT / command[0]), run_name="__main__")
    assert exited.value.code == 0 and capsys.readouterr().out.startswith("usage:")


def _help_defaults(text: str) -> dict[str, str]:
    """{'--lr': '0.001', ...}: each flag's "(default: ...)" in an argparse help text (help lines may wrap)."""
    entries = [" ".join(entry.split()) for entry in re.split(r"\n  (?=--)", text)[1:]]
    return {entry.split()[0]: entry.rsplit("(default: ", 1)[1].split(")")[0] for entry in entries
            if "(default: " in entry}


def test_help_with_a_preset_shows_the_presets_values(capsys):
    recipe = presets_of(train_sft.SFTConfig)["toy-sft"]
    shown = []
    for argv in (["--help"], ["--preset", "toy-sft", "--help"]):
        with pytest.raises(SystemExit) as exited:
            parse_config(train_sft.SFTConfig, argv)
        assert exited.value.code == 0
        shown.append(_help_defaults(capsys.readouterr().out))
    plain, preset = shown
    assert plain["--lr"] == str(train_sft.SFTConfig.lr) != str(recipe["lr"])
    for key, value in recipe.items():
        assert preset["--" + key.replace("_", "-")] == str(value), key


@pytest.mark.parametrize("wrong, meant", [("--lerning-rate", "--lr"), ("--bach-size", "--batch-size"),
                                          ("--freeze-vison", "--freeze-vision")])
def test_a_misspelt_flag_is_answered_with_the_closest_one(wrong, meant, capsys):
    with pytest.raises(SystemExit) as exited:
        parse_config(train_sft.SFTConfig, [wrong, "1"])
    assert exited.value.code == 2
    assert f"unknown flag {wrong}; did you mean {meant}?" in capsys.readouterr().err
