"""Datasets on disk: indexing, decoding, validation, splits. The only module that opens images."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from rockcls.errors import DataError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
MIN_SIDE = 8


@dataclass
class DatasetIndex:
    """Image files with their integer labels (-1 when unlabeled) and sorted class names."""

    paths: list[str]
    labels: np.ndarray
    classes: list[str]
    ids: list[str]
    root: str = ""
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, keep: np.ndarray) -> "DatasetIndex":
        keep = np.asarray(keep, dtype=bool)
        pick = np.flatnonzero(keep)
        return DatasetIndex([self.paths[i] for i in pick], self.labels[pick], self.classes,
                            [self.ids[i] for i in pick], self.root, list(self.skipped))


# ---------------------------------------------------------------------------- indexing

def index_dataset(source: str | os.PathLike, classes: Sequence[str] | None = None,
                  labeled: bool = True) -> DatasetIndex:
    """Index a class-per-folder tree, a folder of images (``labeled=False``) or a CSV."""
    src = Path(source)
    if not str(source):
        raise DataError("data: no dataset given (set data=PATH)")
    if not src.exists():
        raise DataError(f"data: {source} does not exist")
    if src.is_file():
        return _index_csv(src, classes, labeled)
    if labeled:
        return _index_class_folders(src, classes)
    return _index_flat_folder(src)


def _is_candidate(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".")


def _index_class_folders(root: Path, classes: Sequence[str] | None) -> DatasetIndex:
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DataError(f"data: {root} has no class sub-folders (expected {root}/<class>/*.png)")
    found = [d.name for d in class_dirs]
    names = _check_classes(found, classes, str(root))
    paths, labels, bad = [], [], []
    for d in class_dirs:
        files = sorted(p for p in d.rglob("*") if _is_candidate(p))
        images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
        bad += [(str(p), "not an image file (extension)") for p in files if p not in images]
        if not images:
            raise DataError(f"data: class folder {d} holds no images")
        paths += [str(p) for p in images]
        labels += [names.index(d.name)] * len(images)
    ids = [os.path.relpath(p, root) for p in paths]
    index = DatasetIndex(paths, np.asarray(labels, dtype=np.int64), names, ids, str(root))
    index.skipped = bad
    return index


def _index_flat_folder(root: Path) -> DatasetIndex:
    paths = sorted(str(p) for p in root.rglob("*")
                   if _is_candidate(p) and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise DataError(f"data: {root} holds no images")
    ids = [os.path.relpath(p, root) for p in paths]
    return DatasetIndex(paths, np.full(len(paths), -1, dtype=np.int64), [], ids, str(root))


def _check_classes(found: Sequence[str], classes: Sequence[str] | None, where: str) -> list[str]:
    names = sorted(set(found))
    if classes is None:
        if len(names) < 2:
            raise DataError(f"data: {where} has a single class ({names[0]!r}); need at least two")
        return names
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"data: unknown label(s) in {where}: {', '.join(map(str, unknown[:5]))} "
                        f"(model classes: {', '.join(classes)})")
    return list(classes)


def _index_csv(csv_path: Path, classes: Sequence[str] | None, labeled: bool) -> DatasetIndex:
    try:
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"data: cannot read CSV {csv_path}: {str(exc).splitlines()[0]}") from None
    required = ["img_path", "label"] if labeled else ["img_path"]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"data: CSV {csv_path} lacks column(s) {', '.join(missing)} "
                        f"(has: {', '.join(df.columns)})")
    if df.empty:
        raise DataError(f"data: CSV {csv_path} has no rows")
    base = csv_path.parent
    paths = [str(p if Path(p).is_absolute() else base / p) for p in df["img_path"]]
    ids = list(df["ID"]) if "ID" in df.columns else list(df["img_path"])
    if not labeled:
        return DatasetIndex(paths, np.full(len(paths), -1, dtype=np.int64), list(classes or []), ids, str(base))
    empty = df.index[df["label"].str.strip() == ""]
    if len(empty):
        raise DataError(f"data: CSV {csv_path} row {empty[0] + 2} has an empty label")
    names = _check_classes(list(df["label"]), classes, str(csv_path))
    labels = np.asarray([names.index(x) for x in df["label"]], dtype=np.int64)
    return DatasetIndex(paths, labels, names, ids, str(base))


# ---------------------------------------------------------------------------- decoding

def load_image(path: str) -> np.ndarray:
    """Decode any common image to RGB uint8 HxWx3 (EXIF-rotated; gray/RGBA/16-bit converted)."""
    try:
        buf = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise DataError(f"{path}: unreadable ({exc.strerror or exc})") from None
    if buf.size == 0:
        raise DataError(f"{path}: empty file")
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR)  # applies EXIF orientation, converts depth to 8 bit
    if img is None:
        return _load_with_pil(path)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _load_with_pil(path: str) -> np.ndarray:
    """Formats OpenCV cannot decode (GIF, some TIFF): Pillow, or a DataError."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float32)
                arr = (arr / max(float(arr.max()), 1.0) * 255.0).astype(np.uint8)
                return np.stack([arr] * 3, axis=-1)
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: not a decodable image ({type(exc).__name__})") from None


def check_image(path: str) -> tuple[str, int, int]:
    """Return ("", h, w) for a usable image or (reason, 0, 0)."""
    try:
        img = load_image(path)
    except DataError as exc:
        return str(exc).split(": ", 1)[-1], 0, 0
    h, w = img.shape[:2]
    if min(h, w) < MIN_SIDE:
        return f"too small ({w}x{h} px, need {MIN_SIDE})", 0, 0
    return "", h, w


# ---------------------------------------------------------------------------- validation

def file_fingerprint(paths: Sequence[str]) -> str:
    """Hash of paths, sizes and mtimes: changes when any file is added, removed or rewritten."""
    h = hashlib.sha1()
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()[:16]


def content_fingerprint(index: DatasetIndex) -> str:
    """Hash of ids and labels: equal for the same dataset wherever it is stored."""
    h = hashlib.sha1()
    for i, y in zip(index.ids, index.labels.tolist()):
        h.update(f"{i}\0{y}\n".encode())
    h.update("\0".join(index.classes).encode())
    return h.hexdigest()[:16]


def validate_images(index: DatasetIndex, *, skip_bad: bool, cache_dir: Path | None = None,
                    workers: int = 8, progress: Callable[[int], None] | None = None) -> DatasetIndex:
    """Decode every image once (in threads; cached by fingerprint) and drop or reject bad ones."""
    reasons = _cached_check(index.paths, cache_dir, workers, progress)
    bad = [(p, r) for p, r in zip(index.paths, reasons) if r] + list(index.skipped)
    if bad and not skip_bad:
        listing = "; ".join(f"{p}: {r}" for p, r in bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise DataError(f"data: {len(bad)} bad image(s): {listing}{more}. "
                        f"Fix or remove them, or pass skip_bad_images=true")
    if bad:
        warnings.warn(f"skipping {len(bad)} bad image(s), first: {bad[0][0]} ({bad[0][1]})", stacklevel=2)
    kept = index.subset(np.asarray([not r for r in reasons], dtype=bool))
    kept.skipped = bad
    _check_nonempty_classes(kept)
    return kept


def _check_nonempty_classes(index: DatasetIndex) -> None:
    if (index.labels < 0).all():
        return
    counts = np.bincount(index.labels, minlength=len(index.classes))
    for name, n in zip(index.classes, counts):
        if n == 0:
            raise DataError(f"data: class {name!r} has no usable images")


def _cached_check(paths: Sequence[str], cache_dir: Path | None, workers: int,
                  progress: Callable[[int], None] | None) -> list[str]:
    cache_file = Path(cache_dir) / "index" / f"{file_fingerprint(paths)}.json" if cache_dir else None
    if cache_file is not None and cache_file.is_file():
        return json.loads(cache_file.read_text())["reasons"]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # cv2 decodes without the GIL
        reasons = []
        for r, _, _ in pool.map(check_image, paths, chunksize=64):
            reasons.append(r)
            if progress:
                progress(1)
    if cache_file is not None:
        write_atomic(cache_file, json.dumps({"reasons": reasons}).encode())
    return reasons


def write_atomic(path: Path, payload: bytes) -> None:
    """Write to a temporary name and rename, so readers never see a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- splits

def make_folds(labels: np.ndarray, *, folds: int, val_fraction: float, seed: int) -> np.ndarray:
    """Fold id of each sample: its validation fold. folds=1: 0 for the holdout, -1 train-only."""
    from sklearn.model_selection import StratifiedKFold, train_test_split

    counts = np.bincount(labels)
    need = max(folds, 2)
    if counts.min() < need:
        cls = int(np.argmin(counts))
        raise DataError(f"data: class #{cls} has {counts.min()} image(s), fewer than the {need} "
                        f"a stratified split with folds={folds} needs")
    fold_of = np.full(len(labels), -1, dtype=np.int64)
    positions = np.arange(len(labels))
    if folds == 1:
        _, val = train_test_split(positions, test_size=val_fraction, stratify=labels, random_state=seed)
        fold_of[val] = 0
        return fold_of
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, val) in enumerate(splitter.split(positions, labels)):
        fold_of[val] = k
    return fold_of


def split_fingerprint(index: DatasetIndex, fold_of: np.ndarray) -> str:
    h = hashlib.sha1(content_fingerprint(index).encode())
    h.update(np.asarray(fold_of, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------- torch dataset

class FileSource:
    """Reads rows of an index straight from disk (decodes the full image every time)."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, row: int) -> np.ndarray:
        return load_image(self.paths[row])


def open_source(index: DatasetIndex, **_: object) -> FileSource:
    """The image source a dataset reads from."""
    return FileSource(index.paths)


class ImageDataset(torch.utils.data.Dataset):
    """Rows of an image source as uint8 CHW tensors, with their label and position.

    ``transform`` is albumentations-style (HWC uint8 in and out); the position (index into
    ``rows``) is what samplers and the hard-negative memory refer to.
    """

    def __init__(self, source, rows: Sequence[int], labels: np.ndarray,
                 transform: Callable[..., dict] | None = None):
        self.source = source
        self.rows = np.asarray(rows, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        img = self.source.read(int(self.rows[i]))
        if self.transform is not None:
            img = self.transform(image=img)["image"]
        img = np.ascontiguousarray(img)
        return torch.from_numpy(img).permute(2, 0, 1), int(self.labels[i]), i
