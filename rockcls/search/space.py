"""What a study searches and with what: the tune config, the search dimensions parsed from --search-* options, the base train config, the plan every worker reads and its sampler."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import optuna

from rockcls.core.config import (
    MIN_IMG_SIZE,
    TrainConfig,
    build_config,
    check_value,
    coerce_value,
    field_map,
    field_type,
    load_yaml,
    option,
)
from rockcls.core.errors import ConfigError
from rockcls.training.models import automatic_lr, check_backbone

PRUNERS = ("median", "hyperband", "wilcoxon", "none")

# The searched backbone's parameter name: each choice is an entry of --search-backbone.
BACKBONE = "backbone"

# search_lr=auto: from the automatic rate (training.models.automatic_lr) divided by the first to times the second.
AUTO_LR_SPAN = (20.0, 2.0)


# Train settings the search may vary: (log scale, integer).
SEARCHABLE = {"lr": (True, False), "hn_ratio": (False, False), "balanced_ratio": (False, False),
              "hn_memory": (True, True), "label_smoothing": (False, False), "augment": (False, False)}


# Settings that may differ between machines without changing what a trial computes.
MACHINE_LOCAL = ("data", "device", "num_workers", "amp", "cache", "cache_size", "cache_dir", "output_dir",
                 "resume", "config", "experiment")


@dataclass
class TuneConfig:
    """Parameters of the study itself (train parameters are `TrainConfig`'s)."""

    trials: int = option(50, "finished (complete + pruned) trials the study holds in total", min=1)
    storage: str = option("", "Optuna storage (SQLAlchemy URL, best without a password: ~/.pgpass); empty = "
                            "$ROCKCLS_STORAGE, else sqlite optuna.db next to the MLflow database")
    study_name: str = option("", "study name; empty = derived from backbone, data and fixed settings")
    pruner: str = option("median", "pruner of trials that fall behind", choices=PRUNERS)
    devices: str = option("", "GPU ids, one worker process each (e.g. 0,1,2,3); 'cpu' entries add CPU workers; "
                            "empty = one worker in this process")
    timeout: float = option(0.0, "seconds after which workers start no new trial; 0 = no limit", min=0.0)
    top_k: int = option(3, "best trials ensembled at the end (with --search-backbone the best of each backbone "
                           "first); 0 = no ensemble", min=0)
    register: str = option("rockcls", "registered model name of the ensemble; empty = do not register")
    search_lr: str = option("auto", f"lr range LOW:HIGH (log scale) or choices A,B; auto = the automatic lr "
                                    f"/{AUTO_LR_SPAN[0]:g} to x{AUTO_LR_SPAN[1]:g} (scratch or pretrained, see "
                                    f"--lr); empty = not searched")
    search_hn_ratio: str = option("0:0.5", "hn_ratio range or choices; empty = not searched")
    search_balanced_ratio: str = option("0:1", "balanced_ratio range or choices; empty = not searched")
    search_hn_memory: str = option("64:4096", "hn_memory range (log scale) or choices such as 0,256,1024")
    search_label_smoothing: str = option("", "label_smoothing range or choices; empty = not searched")
    search_augment: str = option("", "augmentation presets to choose from, e.g. light,seed,winner")
    search_backbone: str = option("", "backbones to choose from, TIMM_NAME[:PRETRAINED_PATH][@SIZE],...; replaces "
                                      "--backbone; a name alone loads weights as --pretrained / --pretrained-path "
                                      "say, and trains at --img-size (0 = its native resolution); empty = not "
                                      "searched")
    baseline: bool = option(True, "first trial = the train defaults of the searched parameters")
    sampler_startup: int = option(5, "random trials before the TPE sampler models the space", min=0)
    pruner_startup: int = option(3, "completed trials (of the same backbone, when searched) before the median "
                                    "pruner prunes", min=0)
    pruner_warmup: int = option(1, "epochs of the first fold before the median pruner prunes", min=0)
    pruner_p: float = option(0.3, "wilcoxon: prune a trial when its fold scores are below the best trial's at "
                                  "this one-sided p-value (all folds worse: p = 0.25 after 2 folds, 0.125 after 3)",
                             gt=0.0, lt=1.0)
    heartbeat: int = option(30, "seconds between heartbeats of a running trial; stale (retried) after 2x", min=1)
    retries: int = option(2, "new attempts of a slot whose trial raised or whose worker died", min=0)


def quiet_optuna() -> None:
    """Heartbeats, stale-trial checks and the retry callback are 'experimental' in Optuna 5 and
    warn on every use; Optuna's per-trial INFO lines duplicate rockcls' own."""
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


# Train settings the study decides itself: its workers are the parallelism (one trial per device).
STUDY_OWNED = ("devices",)


def build_search_config(given: dict[str, Any]) -> tuple[TrainConfig, list[str]]:
    """The train config every trial starts from, and the searchable names the user fixed.

    ``given``: train parameters from the command line (None = not given). A parameter given
    there or in the YAML ``config`` is fixed for every trial. Unlike `train`, ``folds``
    defaults to 1: one stratified holdout split shared by all trials.
    """
    given = {k: v for k, v in given.items() if v is not None and v != ""}  # "" = not given (MLproject)
    from_yaml = set(load_yaml(given["config"])) if given.get("config") else set()
    overrides = dict(given)
    if "folds" not in given and "folds" not in from_yaml:
        overrides["folds"] = 1
    cfg = build_config(TrainConfig, overrides)
    if cfg.resume:
        raise ConfigError("resume: not used by tune; re-run the same tune command to continue its study")
    if cfg.devices:
        raise ConfigError("devices: a train setting tune does not use; the study's --devices runs one trial "
                          "per device")
    return cfg, sorted((set(given) | from_yaml) & set(SEARCHABLE))


@dataclass(frozen=True)
class Dimension:
    """One searched train setting: a range (``low``..``high``) or ``choices``."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple = ()

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.choices:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)

    def contains(self, value: Any) -> bool:
        return value in self.choices if self.choices else self.low <= value <= self.high

    def describe(self) -> str:
        if self.choices:
            return ",".join(map(str, self.choices))
        return f"{self.low}:{self.high}{' (log)' if self.log else ''}"

    def to_train(self, value: Any) -> dict[str, Any]:
        """The train settings a suggested value stands for."""
        return {self.name: value}


@dataclass(frozen=True)
class BackboneEntry:
    """One entry of --search-backbone: ``backbone`` with its own weights and resolution, if given
    (empty / 0: the base config's)."""

    backbone: str
    pretrained_path: str = ""
    img_size: int = 0

    @property
    def label(self) -> str:
        """The entry as written (normalised): the categorical choice Optuna stores and shows."""
        path = f":{self.pretrained_path}" if self.pretrained_path else ""
        size = f"@{self.img_size}" if self.img_size else ""
        return f"{self.backbone}{path}{size}"

    def to_train(self) -> dict[str, Any]:
        out: dict[str, Any] = {"backbone": self.backbone}
        if self.pretrained_path:
            out["pretrained_path"] = self.pretrained_path
        if self.img_size:
            out["img_size"] = self.img_size
        return out


@dataclass(frozen=True)
class BackboneDimension(Dimension):
    """The backbone as a categorical dimension; its choices are the entries' labels."""

    entries: tuple[BackboneEntry, ...] = ()

    def to_train(self, value: Any) -> dict[str, Any]:
        return next(e for e in self.entries if e.label == value).to_train()

    def default_for(self, base: TrainConfig) -> str:
        """The entry of the base config's backbone, else the first: what the baseline trial trains."""
        return next((e.label for e in self.entries if e.backbone == base.backbone), self.entries[0].label)


def parse_backbone_entry(entry: str) -> BackboneEntry:
    """``TIMM_NAME[:PRETRAINED_PATH][@SIZE]``, checked (a path cannot hold ``@``)."""
    head, at, size_text = entry.partition("@")
    name, colon, path = (part.strip() for part in head.partition(":"))
    size = 0
    if at:
        size_text = size_text.strip()
        if not size_text.isdigit() or int(size_text) < MIN_IMG_SIZE:
            raise ConfigError(f"search_backbone: {entry!r}: size after @ must be a whole number of pixels "
                              f">= {MIN_IMG_SIZE}, got {size_text!r}")
        size = int(size_text)
    if not name:
        raise ConfigError(f"search_backbone: {entry!r}: no timm model name before ':' or '@'")
    if colon and not path:
        raise ConfigError(f"search_backbone: {entry!r}: empty weights path after ':' (write the name alone for "
                          f"the --pretrained / --pretrained-path weights)")
    try:
        check_backbone(name)
    except ConfigError as exc:
        raise ConfigError(f"search_backbone: {entry!r}: {str(exc).removeprefix('backbone: ')}") from None
    return BackboneEntry(name, path, size)


def parse_backbones(spec: str, base: TrainConfig) -> BackboneDimension:
    """``A,B[:PATH][@SIZE],...``: at least two distinct entries; a name alone takes the base
    config's weights, so two different names alone cannot share one --pretrained-path file."""
    texts = [t.strip() for t in spec.split(",")]
    if any(not t for t in texts):
        raise ConfigError(f"search_backbone: empty entry in {spec!r}")
    entries = [parse_backbone_entry(t) for t in texts]
    labels = [e.label for e in entries]
    dupes = [label for i, label in enumerate(labels) if label in labels[:i]]
    if dupes:
        raise ConfigError(f"search_backbone: {dupes[0]!r} is given twice")
    if len(entries) < 2:
        raise ConfigError(f"search_backbone: give at least two entries A,B (got {spec!r}); to fix the backbone "
                          f"for all trials pass --backbone (and --pretrained-path, --img-size) instead")
    bare = sorted({e.backbone for e in entries if not e.pretrained_path})
    if base.pretrained_path and len(bare) > 1:
        raise ConfigError(f"search_backbone: {bare[0]!r} and {bare[1]!r} would both load pretrained_path "
                          f"{base.pretrained_path!r}; give each its weights as NAME:PATH")
    return BackboneDimension(BACKBONE, choices=tuple(labels), entries=tuple(entries))


def entry_configs(base: TrainConfig, backbones: Dimension | None) -> list[TrainConfig]:
    """The base config as each backbone entry trains it (the base alone when none is searched)."""
    if backbones is None:
        return [base]
    return [dataclasses.replace(base, **backbones.to_train(c)) for c in backbones.choices]


def train_overrides(space: Sequence[Dimension], params: dict[str, Any]) -> dict[str, Any]:
    """The train settings of one trial's suggestions (a backbone label stands for its name, weights
    and size)."""
    out: dict[str, Any] = {}
    for d in space:
        if d.name in params:
            out.update(d.to_train(params[d.name]))
    return out


def backbone_dimension(space: Sequence[Dimension]) -> Dimension | None:
    return next((d for d in space if d.name == BACKBONE), None)


def backbone_label(base: TrainConfig, space: Sequence[Dimension]) -> str:
    """What the study trains: the fixed backbone, or the searched ones joined by ``+``."""
    searched = backbone_dimension(space)
    if searched is None:
        return base.backbone
    return "+".join(dict.fromkeys(e.backbone for e in searched.entries))


def parse_dimension(name: str, spec: str) -> Dimension:
    """``LOW:HIGH`` or ``A,B,...`` for train setting ``name``, checked against its valid values."""
    fld = field_map(TrainConfig)[name]
    typ, meta, key = field_type(fld), dict(fld.metadata), f"search_{name}"
    log_scale, _ = SEARCHABLE[name]
    if ":" in spec and typ is not str:
        lo, hi = (coerce_value(key, part.strip(), typ) for part in spec.split(":", 1))
        if not lo < hi:
            raise ConfigError(f"{key}: expected LOW:HIGH with LOW < HIGH, got {spec!r}")
        if log_scale and lo <= 0:
            raise ConfigError(f"{key}: {name} is searched on a log scale, so LOW must be > 0 (got {spec!r}); "
                              f"list choices such as 0,256,1024 to include 0")
        for value in (lo, hi):
            check_value(key, value, meta)
        return Dimension(name, lo, hi, log=log_scale, integer=typ is int)
    choices = tuple(dict.fromkeys(coerce_value(key, c.strip(), typ) for c in spec.split(",") if c.strip()))
    if len(choices) < 2:
        raise ConfigError(f"{key}: give a range LOW:HIGH or at least two choices A,B (got {spec!r}); "
                          f"to fix {name} for all trials pass --{name.replace('_', '-')} instead")
    for value in choices:
        check_value(key, value, meta)
    return Dimension(name, choices=choices)


def search_spec(tune: TuneConfig, bases: Sequence[TrainConfig], name: str) -> str:
    """The ``search_<name>`` text; ``auto`` lr spans the automatic rate of every config in
    ``bases`` (one per searched backbone entry, whose weights may differ) /20 to x2."""
    spec = getattr(tune, f"search_{name}").strip()
    if name == "lr" and spec == "auto":
        peaks = [automatic_lr(b) for b in bases]  # lr not fixed: base.lr is 0, the automatic rate
        return f"{min(peaks) / AUTO_LR_SPAN[0]:g}:{max(peaks) * AUTO_LR_SPAN[1]:g}"
    return spec


def build_search_space(tune: TuneConfig, base: TrainConfig, fixed: Iterable[str] = ()) -> list[Dimension]:
    """The searched dimensions; a --search-backbone dimension comes first and replaces the fixed backbone."""
    fixed = set(fixed)
    backbones = parse_backbones(tune.search_backbone, base) if tune.search_backbone.strip() else None
    bases = entry_configs(base, backbones)
    specs = {name: search_spec(tune, bases, name) for name in SEARCHABLE if name not in fixed}
    space = [backbones] if backbones else []
    space += [parse_dimension(name, spec) for name, spec in specs.items() if spec]
    if not space:
        raise ConfigError("nothing to search: every searched parameter is fixed or has an empty search_* range")
    return space


def baseline_params(space: Sequence[Dimension], base: TrainConfig) -> dict[str, Any]:
    """The base config's values of the searched settings (those inside their range; lr as the
    automatic rate it stands for): trial 0. A searched backbone is the base config's one if listed,
    else the first entry, and lr is the automatic rate of that entry's weights."""
    backbones = backbone_dimension(space)
    values = {BACKBONE: backbones.default_for(base)} if backbones else {}
    ref = entry_configs(base, backbones)[backbones.choices.index(values[BACKBONE])] if backbones else base
    values.update({d.name: automatic_lr(ref) if d.name == "lr" else getattr(ref, d.name)
                   for d in space if d.name != BACKBONE})
    return {d.name: values[d.name] for d in space if d.contains(values[d.name])}


def opening_params(space: Sequence[Dimension], baseline: dict[str, Any]) -> list[dict[str, Any]]:
    """Fixed parameters of the first slots: the baseline (if any), then one slot for each searched
    backbone entry it does not train, so every backbone runs early (and its trials have peers to
    be pruned against) however the sampler draws; the other parameters are sampled."""
    first = [baseline] if baseline else []
    backbones = backbone_dimension(space)
    if backbones is not None:
        first += [{BACKBONE: c} for c in backbones.choices if c != baseline.get(BACKBONE)]
    return first


def study_identity(base: TrainConfig, space: Sequence[Dimension], data_fingerprint: str) -> dict[str, Any]:
    """What makes two invocations the same study: data, fixed settings and search space (a
    searched backbone's entries included)."""
    searched = {d.name for d in space}
    fixed = {k: v for k, v in base.to_dict().items() if k not in MACHINE_LOCAL and k not in searched}
    return {"data_fingerprint": data_fingerprint, "fixed": fixed,
            "space": {d.name: d.describe() for d in space}}


def default_study_name(identity: dict[str, Any], backbones: str) -> str:
    """``<backbones>-<hash of the identity>``; ``backbones`` as `backbone_label` gives it."""
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{backbones}-{digest}"


@dataclass
class StudyPlan:
    """Everything a worker needs; JSON so worker processes get it from a file."""

    base: TrainConfig
    tune: TuneConfig
    fixed: list[str]
    study_name: str
    storage_url: str

    @functools.cached_property
    def space(self) -> list[Dimension]:
        """Parsed on first use, once per plan (a replaced plan parses its own)."""
        return build_search_space(self.tune, self.base, self.fixed)

    @property
    def steps(self) -> int:
        return self.base.folds * self.base.epochs

    def to_json(self) -> str:
        return json.dumps({"base": self.base.to_dict(), "tune": dataclasses.asdict(self.tune),
                           "fixed": self.fixed, "study_name": self.study_name, "storage_url": self.storage_url})

    @classmethod
    def from_json(cls, text: str) -> "StudyPlan":
        d = json.loads(text)
        return cls(build_config(TrainConfig, d["base"]), build_config(TuneConfig, d["tune"]), d["fixed"],
                   d["study_name"], d["storage_url"])


def build_sampler(plan: StudyPlan, worker: int, seen: int) -> optuna.samplers.BaseSampler:
    # Seeded per worker and per resume, so workers and re-runs do not replay the same draws.
    seed = (plan.base.seed * 1_000_003 + worker * 7919 + seen) % 2**31
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=plan.tune.sampler_startup)


def fmt_value(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
