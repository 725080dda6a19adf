"""InternImage T / S / B / L / XL as timm models: ``timm.create_model("internimage_t", num_classes=3)``.

InternImage (Wang et al., "InternImage: Exploring Large-Scale Vision Foundation Models with
Deformable Convolutions", CVPR 2023) is a four-level hierarchy of blocks, each a DCNv3 operator
(``rockcls.training.dcnv3``) and an MLP, like a transformer block with the attention replaced by
deformable sampling. timm does not ship it; importing this module registers the five sizes.

Parameter and buffer names are the official ones (``patch_embed``, ``levels.i.blocks.j.dcn``,
``conv_head``, ``head``, with the official ``nn.Sequential`` indices), so an official checkpoint
(``internimage_t_1k_224.pth``, its tensors under ``"model"``) loads by name, through timm's
pretrained loader or ``rockcls.training.weights.load_weights_file``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from timm.layers import DropPath, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn
from torch.utils.checkpoint import checkpoint

from rockcls.training.dcnv3 import DCNv3, DEFAULT_CORE_OP, TO_FIRST, TO_LAST, Permute

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLS_SCALE = 1.5  # conv_head widens the last level's channels 1.5x before pooling (all five sizes)
LN_EPS = 1e-6


@dataclass(frozen=True)
class Arch:
    """One published size: the official configuration file's MODEL.INTERN_IMAGE section."""

    channels: int
    depths: tuple[int, int, int, int]
    groups: tuple[int, int, int, int]
    layer_scale: float | None
    offset_scale: float
    post_norm: bool
    drop_path_rate: float  # the official training config's; override with drop_path_rate=...


ARCHS = {
    "internimage_t": Arch(64, (4, 4, 18, 4), (4, 8, 16, 32), None, 1.0, False, 0.1),
    "internimage_s": Arch(80, (4, 4, 21, 4), (5, 10, 20, 40), 1e-5, 1.0, True, 0.4),
    "internimage_b": Arch(112, (4, 4, 21, 4), (7, 14, 28, 56), 1e-5, 1.0, True, 0.5),
    "internimage_l": Arch(160, (5, 5, 22, 5), (10, 20, 40, 80), 1e-5, 2.0, True, 0.1),
    "internimage_xl": Arch(192, (5, 5, 24, 5), (12, 24, 48, 96), 1e-5, 2.0, True, 0.2),
}


def layer_norm(dim: int, before: tuple[int, ...] | None = None) -> nn.Sequential:
    """LayerNorm over channels-last input, after an optional permute: the official
    ``build_norm_layer`` layout, which puts the norm at index 0, or 1 after a permute."""
    layers = [Permute(*before)] if before else []
    return nn.Sequential(*layers, nn.LayerNorm(dim, eps=LN_EPS))


class StemLayer(nn.Module):
    """Two stride-2 3x3 convolutions: (N, 3, H, W) -> (N, H/4, W/4, C), channels last."""

    def __init__(self, in_chans: int, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, channels // 2, 3, stride=2, padding=1)
        self.norm1 = nn.Sequential(Permute(*TO_LAST), nn.LayerNorm(channels // 2, eps=LN_EPS), Permute(*TO_FIRST))
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(channels // 2, channels, 3, stride=2, padding=1)
        self.norm2 = layer_norm(channels, TO_LAST)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))


class DownsampleLayer(nn.Module):
    """A stride-2 3x3 convolution doubling the channels, channels last in and out."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1, bias=False)
        self.norm = layer_norm(2 * channels, TO_LAST)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x.permute(*TO_FIRST)))


class MLPLayer(nn.Module):
    def __init__(self, channels: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, channels)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class InternImageLayer(nn.Module):
    """DCNv3 then MLP, each residual. Pre-norm for T; post-norm (the norm on the branch's output)
    for S to XL, whose ``gamma`` layer scale (1e-5) also starts each branch near zero, so the deep
    stacks begin close to the identity."""

    def __init__(self, channels: int, groups: int, arch: Arch, mlp_ratio: float, drop: float,
                 drop_path: float, core_op: str, center_feature_scale: bool) -> None:
        super().__init__()
        self.post_norm = arch.post_norm
        self.norm1 = layer_norm(channels)
        self.dcn = DCNv3(channels, groups, arch.offset_scale, center_feature_scale, core_op)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = layer_norm(channels)
        self.mlp = MLPLayer(channels, int(channels * mlp_ratio), drop)
        self.layer_scale = arch.layer_scale is not None
        if self.layer_scale:
            self.gamma1 = nn.Parameter(torch.full((channels,), float(arch.layer_scale)))
            self.gamma2 = nn.Parameter(torch.full((channels,), float(arch.layer_scale)))

    def _branch(self, x: torch.Tensor, fn: nn.Module, norm: nn.Module, gamma: str) -> torch.Tensor:
        y = norm(fn(x)) if self.post_norm else fn(norm(x))
        return self.drop_path(getattr(self, gamma) * y if self.layer_scale else y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._branch(x, self.dcn, self.norm1, "gamma1")
        return x + self._branch(x, self.mlp, self.norm2, "gamma2")


class InternImageBlock(nn.Module):
    """One level: its layers, a closing LayerNorm (pre-norm models only) and the downsampling."""

    def __init__(self, channels: int, groups: int, arch: Arch, downsample: bool, drop_path: list[float],
                 **layer_kw: Any) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(InternImageLayer(channels, groups, arch, drop_path=dp, **layer_kw)
                                    for dp in drop_path)
        # a post-norm layer already ends in a norm; a centre-feature-scale model keeps the level norm
        keep_norm = not arch.post_norm or layer_kw["center_feature_scale"]
        self.norm = layer_norm(channels) if keep_norm else nn.Identity()
        self.downsample = DownsampleLayer(channels) if downsample else None
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        x = self.norm(x)
        return self.downsample(x) if self.downsample is not None else x


class InternImage(nn.Module):
    """InternImage with timm's model API (forward_features / forward_head, reset_classifier,
    group_matcher for layer-wise lr decay, set_grad_checkpointing).

    ``forward_features`` returns the last level's map channels first, (N, 8C, H/32, W/32);
    ``forward_head`` applies the official ``conv_head`` (1x1 conv to 1.5x the channels, BatchNorm,
    GELU), average pooling and the linear ``head``."""

    def __init__(self, arch: Arch, num_classes: int = 1000, in_chans: int = 3, mlp_ratio: float = 4.0,
                 drop_rate: float = 0.0, drop_path_rate: float | None = None, global_pool: str = "avg",
                 core_op: str = DEFAULT_CORE_OP, center_feature_scale: bool = False) -> None:
        super().__init__()
        self.arch, self.num_classes, self.global_pool = arch, num_classes, _checked_pool(global_pool)
        self.num_features = arch.channels * 8
        self.head_hidden_size = int(self.num_features * CLS_SCALE)
        self.drop_rate = drop_rate
        self.patch_embed = StemLayer(in_chans, arch.channels)
        self.pos_drop = nn.Dropout(drop_rate)
        self.levels = self._build_levels(arch, mlp_ratio, drop_rate, drop_path_rate, core_op, center_feature_scale)
        self.conv_head = nn.Sequential(
            nn.Conv2d(self.num_features, self.head_hidden_size, 1, bias=False),
            nn.Sequential(nn.BatchNorm2d(self.head_hidden_size)),
            nn.GELU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)
        for m in self.modules():
            if isinstance(m, DCNv3):
                m.reset_parameters()

    @staticmethod
    def _build_levels(arch: Arch, mlp_ratio: float, drop: float, drop_path_rate: float | None,
                      core_op: str, center_feature_scale: bool) -> nn.ModuleList:
        rate = arch.drop_path_rate if drop_path_rate is None else drop_path_rate
        total = sum(arch.depths)
        dpr = [rate * i / (total - 1) for i in range(total)]  # deeper layers drop more often
        levels, start = nn.ModuleList(), 0
        for i, (depth, groups) in enumerate(zip(arch.depths, arch.groups)):
            levels.append(InternImageBlock(arch.channels * 2 ** i, groups, arch, downsample=i < 3,
                                           drop_path=dpr[start:start + depth], mlp_ratio=mlp_ratio, drop=drop,
                                           core_op=core_op, center_feature_scale=center_feature_scale))
            start += depth
        return levels

    # ------------------------------------------------------------------ timm's model API

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Stem, one group per layer (coarse: per level) with each level's norm and downsampling
        after its layers; ``conv_head`` and ``head`` match nothing and form the last group, as
        timm's ``param_groups_layer_decay`` expects."""
        if coarse:
            return dict(stem=r"^patch_embed", blocks=r"^levels\.(\d+)")
        # the level's norm and downsampling sit between its last layer and the next level's first;
        # 99998, not 99999: timm reads a trailing 99999 as "merge with the previous group"
        return dict(stem=r"^patch_embed", blocks=[(r"^levels\.(\d+)\.blocks\.(\d+)", None),
                                                   (r"^levels\.(\d+)\.(?:norm|downsample)", (99998,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each layer's activations in the backward pass: memory for time (L/XL at 384 px)."""
        for level in self.levels:
            level.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            self.global_pool = _checked_pool(global_pool)
        self.num_classes = num_classes
        self.head = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            _init_weights(self.head)

    def set_core_op(self, name: str) -> None:
        """Switch every DCNv3 to another sampling implementation (same weights, same outputs)."""
        for m in self.modules():
            if isinstance(m, DCNv3):
                m.set_core_op(name)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pos_drop(self.patch_embed(x))
        for level in self.levels:
            x = level(x)
        return x.permute(*TO_FIRST)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.conv_head(x)
        if self.global_pool:
            x = self.avgpool(x).flatten(1)
        x = nn.functional.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _checked_pool(global_pool: str) -> str:
    if global_pool not in ("avg", ""):
        raise ValueError(f"global_pool: InternImage pools by average ('avg') or not at all (''), not {global_pool!r}")
    return global_pool


def _init_weights(m: nn.Module) -> None:
    """The official initialisation: truncated-normal linears, unit LayerNorms (DCNv3 redoes its own)."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------- timm registration

HF_REPO = "OpenGVLab/InternImage"
CHECKPOINTS = {  # the official ImageNet-1k classifiers (L and XL: 22k pre-training, 1k at 384 px)
    "internimage_t": ("internimage_t_1k_224.pth", 224),
    "internimage_s": ("internimage_s_1k_224.pth", 224),
    "internimage_b": ("internimage_b_1k_224.pth", 224),
    "internimage_l": ("internimage_l_22kto1k_384.pth", 384),
    "internimage_xl": ("internimage_xl_22kto1k_384.pth", 384),
}


def _cfg(filename: str, size: int) -> dict[str, Any]:
    return dict(hf_hub_id=HF_REPO, hf_hub_filename=filename, num_classes=1000, input_size=(3, size, size),
                pool_size=(size // 32, size // 32), crop_pct=0.875,
                interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                first_conv="patch_embed.conv1", classifier="head", license="mit",
                paper_ids="arXiv:2211.05778", origin_url="https://github.com/OpenGVLab/InternImage")


default_cfgs = generate_default_cfgs({
    f"{name}.{'in22k_ft_in1k' if size > 224 else 'in1k'}": _cfg(filename, size)
    for name, (filename, size) in CHECKPOINTS.items()})


def checkpoint_filter_fn(state_dict: dict[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """An official checkpoint's tensors: unwrapped from ``"model"``, ``module.`` prefixes cut."""
    sd = state_dict.get("model", state_dict)
    return {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> InternImage:
    return build_model_with_cfg(InternImage, variant, pretrained, arch=ARCHS[variant],
                                pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


@register_model
def internimage_t(pretrained: bool = False, **kwargs: Any) -> InternImage:
    """InternImage-T: 30M parameters, 83.5 % ImageNet-1k top-1 at 224 px."""
    return _create("internimage_t", pretrained, **kwargs)


@register_model
def internimage_s(pretrained: bool = False, **kwargs: Any) -> InternImage:
    """InternImage-S: 50M parameters, 84.2 % at 224 px."""
    return _create("internimage_s", pretrained, **kwargs)


@register_model
def internimage_b(pretrained: bool = False, **kwargs: Any) -> InternImage:
    """InternImage-B: 97M parameters, 84.9 % at 224 px."""
    return _create("internimage_b", pretrained, **kwargs)


@register_model
def internimage_l(pretrained: bool = False, **kwargs: Any) -> InternImage:
    """InternImage-L: 223M parameters, 87.7 % at 384 px (ImageNet-22k pre-training)."""
    return _create("internimage_l", pretrained, **kwargs)


@register_model
def internimage_xl(pretrained: bool = False, **kwargs: Any) -> InternImage:
    """InternImage-XL: 335M parameters, 88.0 % at 384 px (ImageNet-22k pre-training)."""
    return _create("internimage_xl", pretrained, **kwargs)
