"""InternImage as a timm model: the DCNv3 cores, the published sizes, official checkpoints, timm's API."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

from rockcls.training import internimage  # noqa: F401  (registers internimage_t ... internimage_xl)
from rockcls.training.dcnv3 import DCNv3, dcnv3_deform_conv2d, dcnv3_grid_sample
from rockcls.training.models import build_model_with_report
from rockcls.training.trainer import run_training
from rockcls.training.weights import head_names
from tests.conftest import tiny_config


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread: where other jobs share the 2 cores, two threads wait on each other and a forward
    pass takes up to 9x longer (docs/internimage.md)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------- the DCNv3 core

def official_formula(x, offset, weight, groups, scale):
    """DCNv3 sampling as the official PyTorch reference writes it: the input padded by one pixel,
    reference points and the x-major 3x3 grid normalised by the padded size, grid_sample on it."""
    n, h, w, c = x.shape
    xp = F.pad(x, (0, 0, 1, 1, 1, 1))
    hp, wp = h + 2, w + 2
    ry, rx = torch.meshgrid(torch.arange(h, dtype=x.dtype) + 1.5, torch.arange(w, dtype=x.dtype) + 1.5,
                            indexing="ij")
    ref = torch.stack((rx / wp, ry / hp), -1).view(1, h, w, 1, 2)
    gx, gy = torch.meshgrid(torch.arange(-1.0, 2.0, dtype=x.dtype), torch.arange(-1.0, 2.0, dtype=x.dtype),
                            indexing="ij")
    grid = torch.stack((gx / wp, gy / hp), -1).reshape(1, 1, 1, 9, 2).repeat(1, 1, 1, groups, 1)
    norm = torch.tensor([wp, hp], dtype=x.dtype)
    loc = ref + grid * scale + offset.view(n, h, w, groups * 9, 2) * scale / norm
    g = (2 * loc - 1).view(n, h * w, groups, 9, 2).transpose(1, 2).flatten(0, 1)
    planes = xp.reshape(n, hp * wp, c).transpose(1, 2).reshape(n * groups, c // groups, hp, wp)
    s = F.grid_sample(planes, g, mode="bilinear", padding_mode="zeros", align_corners=False)
    m = weight.view(n, h * w, groups, 9).transpose(1, 2).reshape(n * groups, 1, h * w, 9)
    return (s * m).sum(-1).view(n, c, h * w).transpose(1, 2).reshape(n, h, w, c)


def random_inputs(dtype, groups=3, c=12, h=6, w=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, h, w, c, generator=g, dtype=dtype)
    offset = 2.5 * torch.randn(2, h, w, groups * 18, generator=g, dtype=dtype)  # some land outside
    weight = torch.randn(2, h, w, groups, 9, generator=g, dtype=dtype).softmax(-1).view(2, h, w, -1)
    return [t.requires_grad_() for t in (x, offset, weight)]


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_both_cores_compute_the_official_formula_in_double_precision(scale) -> None:
    x, offset, weight = random_inputs(torch.float64)
    expected = official_formula(x, offset, weight, 3, scale)
    for core in (dcnv3_grid_sample, dcnv3_deform_conv2d):
        torch.testing.assert_close(core(x, offset, weight, 3, scale), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_both_cores_give_the_same_outputs_and_gradients_in_float32(scale) -> None:
    results = []
    for core in (dcnv3_grid_sample, dcnv3_deform_conv2d):
        inputs = random_inputs(torch.float32, seed=1)
        out = core(*inputs, 3, scale)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out.detach()] + [t.grad for t in inputs])
    for name, a, b in zip(("output", "d input", "d offset", "d weight"), *results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("core", ["grid_sample", "deform_conv2d"])
def test_both_cores_run_under_bfloat16_autocast(core) -> None:
    dcn = DCNv3(16, 2, offset_scale=2.0, core_op=core)
    x = torch.randn(2, 5, 5, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dcn(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()


def test_an_unknown_core_is_refused_naming_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown DCNv3 core 'cuda'.*grid_sample, deform_conv2d"):
        DCNv3(16, 2, core_op="cuda")


# ---------------------------------------------------------------------------- the published sizes

@pytest.mark.parametrize("name, millions", [("internimage_t", 30), ("internimage_s", 50), ("internimage_b", 97),
                                            ("internimage_l", 223), ("internimage_xl", 335)])
def test_parameter_counts_match_the_paper_at_1000_classes(name, millions) -> None:
    with torch.device("meta"):
        model = timm.create_model(name)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == millions


def official_shapes(channels, depths, groups, layer_scale, post_norm, classes=1000):
    """Every tensor of an official InternImage-T..XL checkpoint, named and shaped as its public
    definition (classification/models/intern_image.py) builds them."""
    shapes = {"patch_embed.conv1.weight": (channels // 2, 3, 3, 3), "patch_embed.conv1.bias": (channels // 2,),
              "patch_embed.conv2.weight": (channels, channels // 2, 3, 3), "patch_embed.conv2.bias": (channels,)}
    shapes |= {f"patch_embed.norm1.1.{p}": (channels // 2,) for p in ("weight", "bias")}
    shapes |= {f"patch_embed.norm2.1.{p}": (channels,) for p in ("weight", "bias")}
    for i, (depth, g) in enumerate(zip(depths, groups)):
        c = channels * 2 ** i
        for j in range(depth):
            b = f"levels.{i}.blocks.{j}."
            vec = ["norm1.0.weight", "norm1.0.bias", "norm2.0.weight", "norm2.0.bias", "dcn.dw_conv.0.bias",
                   "dcn.dw_conv.1.1.weight", "dcn.dw_conv.1.1.bias", "dcn.input_proj.bias", "dcn.output_proj.bias",
                   "mlp.fc2.bias"] + (["gamma1", "gamma2"] if layer_scale else [])
            shapes |= {b + k: (c,) for k in vec}
            shapes |= {b + "dcn.dw_conv.0.weight": (c, 1, 3, 3), b + "dcn.offset.weight": (g * 18, c),
                       b + "dcn.offset.bias": (g * 18,), b + "dcn.mask.weight": (g * 9, c),
                       b + "dcn.mask.bias": (g * 9,),
                       b + "dcn.input_proj.weight": (c, c), b + "dcn.output_proj.weight": (c, c),
                       b + "mlp.fc1.weight": (4 * c, c), b + "mlp.fc1.bias": (4 * c,), b + "mlp.fc2.weight": (c, 4 * c)}
        if not post_norm:
            shapes |= {f"levels.{i}.norm.0.{p}": (c,) for p in ("weight", "bias")}
        if i < 3:
            shapes[f"levels.{i}.downsample.conv.weight"] = (2 * c, c, 3, 3)
            shapes |= {f"levels.{i}.downsample.norm.1.{p}": (2 * c,) for p in ("weight", "bias")}
    feats, hidden = channels * 8, channels * 12
    shapes["conv_head.0.weight"] = (hidden, feats, 1, 1)
    shapes |= {f"conv_head.1.0.{p}": (hidden,) for p in ("weight", "bias", "running_mean", "running_var")}
    shapes["conv_head.1.0.num_batches_tracked"] = ()
    return shapes | {"head.weight": (classes, hidden), "head.bias": (classes,)}


PUBLISHED = {  # the official configs' CHANNELS, DEPTHS, GROUPS, LAYER_SCALE, POST_NORM
    "internimage_t": (64, (4, 4, 18, 4), (4, 8, 16, 32), None, False),
    "internimage_s": (80, (4, 4, 21, 4), (5, 10, 20, 40), 1e-5, True),
    "internimage_b": (112, (4, 4, 21, 4), (7, 14, 28, 56), 1e-5, True),
    "internimage_l": (160, (5, 5, 22, 5), (10, 20, 40, 80), 1e-5, True),
    "internimage_xl": (192, (5, 5, 24, 5), (12, 24, 48, 96), 1e-5, True),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_every_tensor_has_the_official_name_and_shape(name) -> None:
    with torch.device("meta"):
        model = timm.create_model(name)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == official_shapes(*PUBLISHED[name])


# ---------------------------------------------------------------------------- official checkpoints

def save_official_checkpoint(path, seed=0):
    """A stand-in for internimage_t_1k_224.pth: official names and shapes, random values, under "model"."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: (torch.tensor(7) if not shape else torch.randn(shape, generator=g) * 0.02)
          for k, shape in official_shapes(*PUBLISHED["internimage_t"]).items()}
    sd |= {k: v.abs() + 0.5 for k, v in sd.items() if k.endswith("running_var")}
    torch.save({"model": sd, "epoch": 299}, path)
    return sd


def test_an_official_checkpoint_loads_by_name_and_a_new_class_count_reinitialises_the_head(tmp_path) -> None:
    path = tmp_path / "internimage_t_1k_224.pth"
    sd = save_official_checkpoint(path)
    model, report = build_model_with_report("internimage_t", 3, pretrained_path=str(path))
    assert (report.matched_by, report.reinitialised) == ("by name", ["head.bias", "head.weight"])
    assert report.loaded == report.total - 2
    assert head_names(model) == {"head.weight", "head.bias"}
    for k, v in model.state_dict().items():
        if k.startswith("head."):
            assert v.shape[0] == 3 and not v.any()  # zeroed by zero_head
        elif not k.endswith("num_batches_tracked"):  # a step counter: rockcls does not copy it
            assert torch.equal(v, sd[k]), k


def test_an_official_checkpoint_loads_whole_at_1000_classes_and_through_timm(tmp_path) -> None:
    path = tmp_path / "internimage_t_1k_224.pth"
    sd = save_official_checkpoint(path, seed=1)
    _, report = build_model_with_report("internimage_t", 1000, pretrained_path=str(path))
    assert (report.loaded, report.reinitialised) == (report.total, [])
    model = timm.create_model("internimage_t", pretrained=True, num_classes=5,
                              pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(model.levels[2].blocks[17].dcn.offset.weight, sd["levels.2.blocks.17.dcn.offset.weight"])
    assert model.head.weight.shape == (5, 768)


# ---------------------------------------------------------------------------- timm's model API

def test_internimage_t_trains_a_step_on_64px_images_with_finite_gradients() -> None:
    torch.manual_seed(0)
    model = timm.create_model("internimage_t", pretrained=False, num_classes=3)
    x = torch.randn(2, 3, 64, 64)
    loss = F.cross_entropy(model(x), torch.tensor([0, 2]))
    loss.backward()
    assert math.isfinite(loss.item())
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.patch_embed.conv1.weight.grad.abs().sum() > 0


def test_the_timm_api_rockcls_uses() -> None:
    model = timm.create_model("internimage_t", pretrained=False, num_classes=3, drop_path_rate=0.0).eval()
    assert timm.is_model("internimage_xl") and model.num_classes == 3
    cfg = model.pretrained_cfg
    assert (cfg["input_size"], cfg["num_classes"], cfg["first_conv"], cfg["classifier"]) == (
        (3, 224, 224), 1000, "patch_embed.conv1", "head")
    assert timm.get_pretrained_cfg("internimage_l").input_size == (3, 384, 384)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (1, 512, 2, 2)
        assert model.forward_head(feats, pre_logits=True).shape == (1, 768)
        torch.testing.assert_close(model.forward_head(feats), model(x))
        model.reset_classifier(7)
        assert model.get_classifier().out_features == 7 and model(x).shape == (1, 7)
        model.reset_classifier(0)
        assert model(x).shape == (1, 768)


def test_grad_checkpointing_recomputes_layers_and_gives_the_same_gradients(monkeypatch) -> None:
    torch.manual_seed(0)
    model = timm.create_model("internimage_t", num_classes=2, drop_path_rate=0.0)
    x = torch.randn(2, 3, 32, 32)  # conv_head's BatchNorm needs two values per channel: 2 images of 1x1
    layer, calls = model.levels[1].blocks[0], []
    forward = layer.forward
    monkeypatch.setattr(layer, "forward", lambda t: calls.append(1) or forward(t))  # recomputing skips hooks
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        calls.clear()
        model.zero_grad()
        model(x).sum().backward()
        assert len(calls) == (2 if enable else 1)  # the backward pass ran the layer again
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_layer_decay_groups_from_stem_to_head() -> None:
    with torch.device("meta"):
        model = timm.create_model("internimage_t", num_classes=3)
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.9)
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    at = {n: scale[id(p)] for n, p in model.named_parameters()}
    layers = 1 + sum(internimage.ARCHS["internimage_t"].depths) + 4 + 1  # stem, layers, 4 level ends, head
    assert len(set(at.values())) == layers
    assert at["patch_embed.conv1.weight"] == pytest.approx(0.9 ** (layers - 1))
    assert at["patch_embed.conv1.weight"] < at["levels.0.blocks.0.dcn.offset.weight"] \
        < at["levels.0.downsample.conv.weight"] < at["levels.1.blocks.0.mlp.fc1.weight"] \
        < at["levels.3.blocks.3.mlp.fc2.weight"] < at["head.weight"] == 1.0
    assert at["conv_head.0.weight"] == 1.0


def test_rockcls_trains_internimage_t_from_an_official_checkpoint(mlflow_store, synthetic_dir, tmp_path) -> None:
    save_official_checkpoint(tmp_path / "internimage_t_1k_224.pth")
    result = run_training(tiny_config(synthetic_dir, backbone="internimage_t", epochs=1, batch_size=12,
                                      pretrained_path=str(tmp_path / "internimage_t_1k_224.pth"), gallery_size=0))
    assert math.isfinite(result.cv_macro_f1)
    # predict, ensemble, the registry and serving rebuild the fold networks from their checkpoints
    from rockcls.runs.lookup import load_run_predictor

    predictor = load_run_predictor(result.run_id)
    assert [type(m).__name__ for m, _ in predictor.models] == ["InternImage"] * 2
    pred = predictor.predict([str(p) for p in sorted(Path(synthetic_dir).rglob("*.png"))[:3]], device="cpu")
    assert pred.logits.shape == (3, len(result.classes)) and np.isfinite(pred.logits).all()
