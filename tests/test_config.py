import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import tomllib
import yaml

from rockcls.core.config import (
    AUTO_LR_PRETRAINED,
    AUTO_LR_PRETRAINED_ATTENTION,
    AUTO_LR_SCRATCH,
    TrainConfig,
    add_config_arguments,
    build_config,
    config_from_args,
    presets,
)
from rockcls.core.errors import ConfigError
from rockcls.training.models import automatic_lr, has_attention, resolve_auto

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_measured_recipe():
    cfg = build_config(TrainConfig, {})
    assert (cfg.backbone, cfg.img_size, cfg.folds, cfg.augment, cfg.tta) == ("davit_base", 0, 5, "d4", "d4")
    assert (cfg.hn_ratio, cfg.balanced_ratio, cfg.grad_clip, cfg.select) == (0.0, 0.0, 0.0, "last")
    # lr 0 = auto: high from random initialisation, low from pretrained weights, lower still for
    # pretrained attention blocks (the default davit_base is one: 1e-3 spoiled it)
    assert cfg.lr == 0 and automatic_lr(cfg) == AUTO_LR_PRETRAINED_ATTENTION < AUTO_LR_PRETRAINED
    conv = {"backbone": "efficientnet_lite0"}
    assert automatic_lr(build_config(TrainConfig, conv)) == AUTO_LR_PRETRAINED
    assert automatic_lr(build_config(TrainConfig, {**conv, "pretrained": "false"})) == AUTO_LR_SCRATCH
    assert automatic_lr(build_config(TrainConfig, {"pretrained": "false"})) == AUTO_LR_SCRATCH
    assert automatic_lr(build_config(TrainConfig, {**conv, "pretrained": "false", "pretrained_path": "w.pth"})) == AUTO_LR_PRETRAINED
    assert automatic_lr(build_config(TrainConfig, {"lr": "0.01"})) == 0.01
    assert [has_attention(b) for b in ("test_vit", "swin_tiny_patch4_window7_224", "test_efficientnet", "convnext_tiny")] == [
        True, True, False, False]
    resolved, chosen = resolve_auto(build_config(TrainConfig, {"backbone": "test_vit"}))
    assert resolved.lr == AUTO_LR_PRETRAINED_ATTENTION and "lr 0.0002 (fine-tuning pretrained weights with attention" in chosen


def test_seed_preset_is_reachable_by_name_and_overridable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no file named "seed" here: the packaged preset is meant
    assert "seed" in presets()
    cfg = build_config(TrainConfig, {"config": "seed"})
    assert (cfg.lr, cfg.augment, cfg.hn_ratio, cfg.balanced_ratio, cfg.select, cfg.grad_clip) == \
        (3e-4, "seed", 0.2, 1.0, "best", 1.0)
    assert build_config(TrainConfig, {"config": "seed", "hn_ratio": "0.5"}).hn_ratio == 0.5
    with pytest.raises(ConfigError, match=r"config: file not found: sead \(packaged presets: seed\)"):
        build_config(TrainConfig, {"config": "sead"})


@pytest.mark.parametrize("key,value,message", [
    ("lr", "abc", r"lr: expected a number, got 'abc'"),
    ("folds", "0", r"folds: must be >= 1, got 0"),
    ("hn_ratio", "1.5", r"hn_ratio: must be <= 1.0, got 1.5"),
    ("epochs", "2.5", r"epochs: expected an integer"),
    ("pretrained", "maybe", r"pretrained: expected true/false"),
    ("optimizer", "lion", r"optimizer: must be one of adamw, adam, sgd"),
    ("val_fraction", "1", r"val_fraction: must be < 1.0"),
    ("lr", "nan", r"lr: expected a finite number"),
    ("seed", "-1", r"seed: must be >= 0, got -1"),
    ("split_seed", "-1", r"split_seed: must be >= 0, got -1"),
])
def test_bad_values_name_the_parameter(key, value, message):
    with pytest.raises(ConfigError, match=message):
        build_config(TrainConfig, {key: value})


def test_unknown_parameter_is_named():
    with pytest.raises(ConfigError, match="unknown parameter 'learning_rate'"):
        build_config(TrainConfig, {"learning_rate": "0.1"})


def test_yaml_then_command_line_layering(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump({"lr": 1e-3, "epochs": 4, "backbone": "test_vit"}))
    cfg = build_config(TrainConfig, {"config": str(path), "epochs": "7", "backbone": ""})
    assert cfg.lr == 1e-3            # from the file
    assert cfg.epochs == 7           # the command line wins
    assert cfg.backbone == "test_vit"  # empty = not given (what mlflow run passes for an unset -P)
    # a value given on the command line wins even when it equals the built-in default
    assert build_config(TrainConfig, {"config": str(path), "backbone": "davit_base"}).backbone == "davit_base"


def test_yaml_errors_name_the_file_and_key(tmp_path):
    bad_key = tmp_path / "bad.yaml"
    bad_key.write_text("lr: 0.1\nfoldz: 3\n")
    with pytest.raises(ConfigError, match=r"unknown parameter 'foldz' in .*bad.yaml"):
        build_config(TrainConfig, {"config": str(bad_key)})
    with pytest.raises(ConfigError, match="config: file not found"):
        build_config(TrainConfig, {"config": str(tmp_path / "missing.yaml")})


def test_cli_accepts_dashes_and_underscores():
    import argparse

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, TrainConfig)
    a = config_from_args(TrainConfig, parser.parse_args(["--hn-ratio", "0.3", "--img_size", "64"]))
    assert (a.hn_ratio, a.img_size) == (0.3, 64)


@pytest.mark.parametrize("entry", ["train", "distill"])
def test_mlproject_train_parameters_are_the_config_fields_and_empty_means_not_given(entry):
    spec = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"][entry]
    assert set(spec["parameters"]) == {f.name for f in fields(TrainConfig)} - {"experiment", "teacher_file"}
    assert f"python -m rockcls {entry} " in spec["command"]
    if entry == "distill":  # the one required parameter
        assert "default" not in spec["parameters"].pop("teacher")
    assert {p["default"] for p in spec["parameters"].values()} == {""}
    assert build_config(TrainConfig, {k: v["default"] for k, v in spec["parameters"].items()}) == TrainConfig()
    for name in spec["parameters"]:
        assert f"{{{name}}}" in spec["command"]


def test_mlproject_evaluate_parameters_are_the_command_options():
    from rockcls.commands.evaluate import EvaluateConfig

    spec = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]["evaluate"]
    assert set(spec["parameters"]) == {f.name for f in fields(EvaluateConfig)} - {"experiment"}
    for name in spec["parameters"]:
        assert f"{{{name}}}" in spec["command"]


def test_conda_env_lists_the_package_dependencies():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())["dependencies"]
    pip_deps = next(d["pip"] for d in conda if isinstance(d, dict))
    assert set(deps) <= set(pip_deps)


def test_cli_bad_value_is_one_line_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "rockcls", "train", "--data", ".", "--lr", "abc"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "rockcls: error: lr: expected a number, got 'abc'"


@pytest.mark.parametrize("argv, expected", [
    (["--skip-bad-images"], True),
    (["--skip-bad-images", "--img-size", "64"], True),
    (["--no-skip-bad-images"], False),
    (["--no_skip_bad_images"], False),
    (["--skip-bad-images", "false"], False),  # the form MLproject commands pass
    (["--skip_bad_images", "yes"], True),
    ([], False),
])
def test_boolean_options_are_switches_that_still_take_values(argv, expected):
    import argparse

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, TrainConfig)
    assert config_from_args(TrainConfig, parser.parse_args(argv)).skip_bad_images is expected


def test_boolean_switch_with_a_bad_value_names_the_parameter():
    import argparse

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, TrainConfig)
    with pytest.raises(ConfigError, match="cache: expected true/false, got 'maybe'"):
        config_from_args(TrainConfig, parser.parse_args(["--cache", "maybe"]))


def test_train_command_line_accepts_switches():
    proc = subprocess.run([sys.executable, "-m", "rockcls", "train", "--skip-bad-images", "--no-pretrained",
                           "--data", "no/such/folder"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "rockcls: error: data: no/such/folder does not exist"  # parsed, then checked


WARN = """
import warnings
from rockcls.core.progress import setup_logging
setup_logging()
warnings.warn("careful", UserWarning)
warnings.warn_explicit("deprecated thing", FutureWarning, "/venv/lib/python3.11/site-packages/somelib/mod.py", 7)
"""


def test_python_warnings_reach_the_user_as_log_lines_without_file_and_line():
    proc = subprocess.run([sys.executable, "-c", WARN], capture_output=True, text=True, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == [
        "WARNING UserWarning: careful", "WARNING FutureWarning (from somelib): deprecated thing"]


def test_the_parameter_table_of_training_md_is_what_train_help_says():
    """docs/training.md's table and `train --help` come from one text (the field's help): a row
    may only add a link to the page that explains more."""
    import re

    table = {}
    text = (ROOT / "docs" / "training.md").read_text()
    for line in text[text.index("| parameter | default | meaning |"):].splitlines():
        row = re.match(r"^\| `(\w+)` \| (.*?) \| (.*) \|$", line)
        if row and row.group(1) in TrainConfig.__dataclass_fields__ and row.group(1) not in table:
            table[row.group(1)] = re.sub(r" \(\[[^\]]*\]\([^)]*\)(; [^)]*)?\)$", "", row.group(3))
    assert table == {f.name: f.metadata["help"] for f in fields(TrainConfig)}
