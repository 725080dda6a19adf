"""Backbones from timm, rebuilt from a small config dict stored in every checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch

from rockcls.errors import ConfigError
from rockcls.transforms import IMAGENET_MEAN, IMAGENET_STD


def build_model(backbone: str, num_classes: int, *, pretrained: bool = False,
                pretrained_path: str = "") -> torch.nn.Module:
    """timm model with a fresh head; weights from the hub, a local file, or random init."""
    if not timm.is_model(backbone):
        close = timm.list_models(f"*{backbone.split('_')[0]}*")[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ConfigError(f"backbone: unknown timm model {backbone!r}{hint}")
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if pretrained_path:
        if not Path(pretrained_path).is_file():
            raise ConfigError(f"pretrained_path: file not found: {pretrained_path}")
        kwargs["pretrained_cfg_overlay"] = {"file": str(pretrained_path)}
    want = pretrained or bool(pretrained_path)
    try:
        return timm.create_model(backbone, pretrained=want, **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:
        if not want:
            raise
        source = pretrained_path or "the timm / Hugging Face hub"
        raise ConfigError(f"pretrained: cannot load {backbone} weights from {source}: "
                          f"{str(exc).splitlines()[0][:200]} (use pretrained=false or pretrained_path=FILE)") from None


def model_spec(model: torch.nn.Module, backbone: str, classes: list[str], img_size: int,
               augment: str) -> dict[str, Any]:
    """What prediction needs to rebuild and feed the model: stored in each checkpoint."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    return {
        "backbone": backbone,
        "num_classes": len(classes),
        "classes": list(classes),
        "img_size": int(img_size),
        "augment": augment,
        "mean": [float(v) for v in cfg.get("mean", IMAGENET_MEAN)],
        "std": [float(v) for v in cfg.get("std", IMAGENET_STD)],
    }


def build_model_from_spec(spec: dict[str, Any]) -> torch.nn.Module:
    return build_model(spec["backbone"], spec["num_classes"], pretrained=False)
