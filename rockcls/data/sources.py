"""What training and prediction read images from: the checked dataset (validate_images: every problem reported at once, results kept with the cache), the cache or the files themselves (open_source), and the torch Dataset over them."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from rockcls.core.progress import track
from rockcls.core.text import shown
from rockcls.data import cache, images
from rockcls.data.cache import CacheSettings, open_cache
from rockcls.data.images import (
    decode_image,
    load_checked,
    map_in_threads,
    max_pixels_setting,
    to_chw_tensor,
)
from rockcls.data.index import (
    BAD_IMAGE,
    EMPTY_CLASS,
    FEW_IMAGES,
    DatasetIndex,
    Problem,
    problems_error,
    report_path,
    stat_files,
    stats_fingerprint,
    write_atomic,
)

log = logging.getLogger("rockcls")


def validate_images(index: DatasetIndex, *, skip_bad: bool, cache_dir: Path | None = None,
                    workers: int = 8, progress: Callable[[int], None] | None = None,
                    cache_size: int = 0, min_per_class: int = 1, report: Path | None = None) -> DatasetIndex:
    """Decode every image once (in threads; cached by fingerprint) and drop or reject bad ones.

    Every problem is reported in one go: those indexing left in ``index.problems``, the bad
    images (unless ``skip_bad``) and the classes left with fewer than ``min_per_class`` usable
    images. They are written to ``report`` (a TSV file; default: one in the temp folder) and the
    DataError names it with the counts by kind.

    With ``cache_size`` (and a ``cache_dir``) the same decode pass also fills the decoded-image
    cache at that resolution (`rockcls.data.cache`), so a first run decodes each file once, not twice.
    A second run on unchanged files decodes nothing.
    """
    reasons = _cached_check(index.paths, cache_dir, workers, progress, cache_size)
    bad = [(p, r) for p, r in zip(index.paths, reasons) if r]
    kept = index.subset(np.asarray([not r for r in reasons], dtype=bool))
    kept.skipped, kept.problems = bad, []
    problems = list(index.problems) + ([] if skip_bad else [(BAD_IMAGE, p, r) for p, r in bad])
    empty = {Path(where).name for kind, where, _ in index.problems if kind == EMPTY_CLASS}  # reported already
    problems += _class_size_problems(kept, min_per_class, skip=empty)
    report = report or report_path(index.root)
    if problems:
        raise problems_error(problems, report)
    report.unlink(missing_ok=True)  # a list from an earlier run would describe data that is fixed now
    if bad:
        log.warning("skipping %d bad image(s), first: %s (%s); the run lists them in skipped_images.tsv",
                    len(bad), shown(bad[0][0]), bad[0][1])
    return kept


def _class_size_problems(index: DatasetIndex, min_per_class: int, skip: set[str]) -> list[Problem]:
    if (index.labels < 0).all():
        return []
    counts = np.bincount(index.labels[index.labels >= 0], minlength=len(index.classes))
    return [(FEW_IMAGES, f"class {name!r}", "has no usable images" if n == 0 else
             f"has {n} usable image(s), the split needs {min_per_class}")
            for name, n in zip(index.classes, counts) if n < min_per_class and name not in skip]


def _cached_check(paths: Sequence[str], cache_dir: Path | None, workers: int,
                  progress: Callable[[int], None] | None, cache_size: int = 0) -> list[str]:
    stats = stat_files(paths)
    # The pixel cap decides verdicts too: another cap, other verdicts.
    name = f"{stats_fingerprint(paths, stats)}-{max_pixels_setting()}px.json"
    cache_file = Path(cache_dir) / "index" / name if cache_dir else None
    reasons = _load_reasons(cache_file, len(paths))
    known = reasons is not None
    if cache_size > 0 and cache_dir is not None:
        if reasons is None or not cache.has_cache(cache_dir, paths, stats, reasons, size=cache_size):
            reasons = cache.build_cache(paths, cache_dir=Path(cache_dir), size=cache_size, workers=workers,
                                        stats=stats, progress=progress).reasons
    elif reasons is None:
        reasons = _check_all(paths, workers, progress)
    if cache_file is not None and not known:
        write_atomic(cache_file, json.dumps({"reasons": reasons}).encode())
    return reasons


def _load_reasons(cache_file: Path | None, n: int) -> list[str] | None:
    if cache_file is None or not cache_file.is_file():
        return None
    try:
        reasons = json.loads(cache_file.read_text())["reasons"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable or foreign file: decode again and overwrite it
    return reasons if isinstance(reasons, list) and len(reasons) == n else None


def _check_all(paths: Sequence[str], workers: int, progress: Callable[[int], None] | None) -> list[str]:
    reasons = []
    results = map_in_threads(lambda p: load_checked(p)[0], paths, workers=workers)
    for reason in track(results, total=len(paths), desc="checking images"):
        reasons.append(reason)
        if progress:
            progress(1)
    return reasons


class FileSource:
    """Reads rows of an index straight from disk (decodes the full image every time)."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, row: int) -> np.ndarray:
        return images.load_image(self.paths[row])  # looked up at call time: tests count decodes


class BytesSource:
    """Rows given as encoded image bytes (a request's images); a row's errors name it ``row N``."""

    def __init__(self, payloads: Sequence[bytes]):
        self.payloads = list(payloads)

    def __len__(self) -> int:
        return len(self.payloads)

    def read(self, row: int) -> np.ndarray:
        return decode_image(self.payloads[row], f"row {row}")


def open_source(index: DatasetIndex, settings: CacheSettings | None = None):
    """The image source a dataset reads from: the decoded-image cache (built here if missing) when
    ``settings`` ask for one (size > 0), else (no settings, or no pixel cache) the files themselves."""
    if settings is None or settings.size <= 0:
        return FileSource(index.paths)
    return open_cache(index.paths, cache_dir=settings.folder, size=settings.size, workers=settings.workers)


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
        return to_chw_tensor(img), int(self.labels[i]), i
