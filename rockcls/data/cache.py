"""Decode-once image cache, and ``python -m rockcls prepare`` that builds it ahead of training.

Every usable image is decoded once, resized once and stored in one uint8 file that every fold,
run and Optuna trial then memory-maps, instead of decoding full-size files every epoch.

Layout, in ``<cache_dir>/images/``:

- ``<key>.u8``  the pixels of every image, one after the other (uint8, H x W x 3, C order);
- ``<key>.npz`` the manifest: ``offsets`` (N+1 byte offsets), ``shapes`` (N x 2), size, version.

``key`` hashes the file paths and each file's size, mtime, ctime and inode together with the
cache size and format version: an added or removed file, another cache size, or any write to a
file (ctime moves on every write and cannot be set back, even when the mtime is restored), gives
another key, so the cache of an older version of the files is not read (it stays on disk until
the folder is deleted). What this does not see: a write the kernel does not record in ctime
(changes to the disk underneath the file system, some network file systems), and a change made
within the same file-system timestamp tick as the stat it is compared to.

Geometry: the shorter side is resized to the cache size with the aspect ratio kept (never
upscaled; the longer side is capped at ``MAX_ASPECT`` times the size). Squashing to a square or
padding would change what the presets see: ``seed`` crops a centred square of the original,
evaluation resizes the whole image, ``winner`` pads to a square first. Keeping the geometry
makes every preset see the same picture as from the file, only at a lower resolution.

Concurrency: a builder writes ``build.tmp-<pid>-<thread>.u8`` and ``.npz``, syncs them, then
renames the pixels and then the manifest to their ``<key>`` names. Readers open a cache only
through its manifest and check the pixel file's length against it, so they never see a torn
cache. Two builders of one key write identical bytes; the last rename wins. Temp files of
builders killed mid-way are deleted by the next build once a day old."""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np

from rockcls.core.config import default_cache_dir
from rockcls.core.errors import DataError
from rockcls.core.progress import track
from rockcls.core.text import shown
from rockcls.data.images import load_checked, map_in_threads
from rockcls.data.index import FileStat, stat_files, stats_fingerprint

log = logging.getLogger("rockcls")


CACHE_VERSION = 1


MAX_ASPECT = 4.0


STALE_BUILD_S = 24 * 3600.0


def resolve_cache_size(img_size: int, cache_size: int = 0) -> int:
    """The cache resolution: ``cache_size``, or 8/7 of the training size (256 for 224).

    The margin leaves random crops (``seed`` crops 60-100% of the shorter side) some real
    pixels to zoom into; crops that zoom further need a larger ``cache_size``.
    """
    size = int(cache_size) if cache_size > 0 else int(round(img_size * 8 / 7))
    if size < img_size:
        log.warning("cache_size %d < img_size %d: training images are upscaled from the cache", size, img_size)
    return size


def resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir) if cache_dir else default_cache_dir()


@dataclass(frozen=True)
class CacheSettings:
    """Where a command's cache lives and at what resolution: resolved once, here, for train,
    prepare and the study alike, so they all find the same cache."""

    folder: Path
    size: int  # 0 = no pixel cache (validation verdicts are still kept in ``folder``)
    workers: int


def cache_settings(*, img_size: int, cache_size: int = 0, cache_dir: str | os.PathLike | None = None,
                   workers: int = 4, enabled: bool = True) -> CacheSettings:
    """The settings of a command's cache: its folder (``cache_dir``, else the default folder), its
    resolution (`resolve_cache_size`; 0 when ``enabled`` is false: no pixel cache) and ``workers``
    decode threads. A command resolves them once and passes the object on."""
    size = resolve_cache_size(img_size, cache_size) if enabled else 0
    return CacheSettings(resolve_cache_dir(cache_dir), size, workers)


def resize_for_cache(img: np.ndarray, size: int) -> np.ndarray:
    """Shorter side to ``size`` (area interpolation), aspect kept, never upscaled."""
    h, w = img.shape[:2]
    scale = min(1.0, size / min(h, w), MAX_ASPECT * size / max(h, w))
    if scale >= 1.0:
        return np.ascontiguousarray(img)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    return cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_AREA)


class ImageCache:
    """Rows of a built cache; the pixel file is memory-mapped on first read in each process.

    Pickling drops the mapping, so DataLoader workers (fork or spawn) receive only the
    offsets and shapes and map the file themselves; the OS page cache is shared between them.
    """

    def __init__(self, data_path: Path, offsets: np.ndarray, shapes: np.ndarray, size: int):
        self.data_path, self.offsets, self.shapes, self.size = Path(data_path), offsets, shapes, size
        self._data: np.memmap | None = None

    def __len__(self) -> int:
        return len(self.shapes)

    @property
    def nbytes(self) -> int:
        return int(self.offsets[-1])

    def read(self, row: int) -> np.ndarray:
        if self._data is None:
            self._data = np.memmap(self.data_path, dtype=np.uint8, mode="r")
        h, w = (int(v) for v in self.shapes[row])
        start = int(self.offsets[row])
        # A copy: transforms may write in place, and the mapping is read-only.
        return np.array(self._data[start:start + h * w * 3]).reshape(h, w, 3)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_data": None}


def cache_key(paths: Sequence[str], stats: Sequence[FileStat], size: int) -> str:
    return f"{stats_fingerprint(paths, stats)}-s{size}-v{CACHE_VERSION}"


def cache_files(cache_dir: Path, key: str) -> tuple[Path, Path]:
    folder = Path(cache_dir) / "images"
    return folder / f"{key}.u8", folder / f"{key}.npz"


def load_cache(cache_dir: Path, paths: Sequence[str], *, size: int,
               stats: Sequence[FileStat] | None = None) -> ImageCache | None:
    """The complete cache of ``paths`` at ``size``, or None. Reads no image file."""
    stats = stat_files(paths) if stats is None else stats
    data_path, manifest_path = cache_files(cache_dir, cache_key(paths, stats, size))
    try:
        with np.load(manifest_path) as z:
            offsets, shapes = z["offsets"], z["shapes"]
            version = int(z["version"])
        on_disk = data_path.stat().st_size
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None  # absent, or damaged outside rockcls (e.g. a partial copy): build again
    if version != CACHE_VERSION or len(shapes) != len(paths) or on_disk != int(offsets[-1]):
        return None
    return ImageCache(data_path, offsets, shapes, size)


def has_cache(cache_dir: Path, paths: Sequence[str], stats: Sequence[FileStat], reasons: Sequence[str],
              *, size: int) -> bool:
    """Whether the cache of the usable ``paths`` (those with an empty reason) exists."""
    good = [i for i, r in enumerate(reasons) if not r]
    return load_cache(cache_dir, [paths[i] for i in good], size=size, stats=[stats[i] for i in good]) is not None


@dataclass
class CacheBuild:
    """One decode pass: each path's problem ("" if usable) and the cache of the usable ones."""

    reasons: list[str]
    cache: ImageCache
    seconds: float


def build_cache(paths: Sequence[str], *, cache_dir: Path, size: int, workers: int = 4,
                stats: Sequence[FileStat] | None = None,
                progress: Callable[[int], None] | None = None) -> CacheBuild:
    """Decode every path once (threads), store the usable ones resized, and return the verdicts.

    Bad images do not stop the build: they are left out of the cache and reported in
    ``reasons``, which is how validation and caching share a single decode pass.
    """
    start = time.perf_counter()
    stats = stat_files(paths) if stats is None else stats
    folder = Path(cache_dir) / "images"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cache: cannot create {folder} ({exc.strerror or exc}); set cache_dir") from None
    _remove_stale_builds(folder)
    tag = f"tmp-{os.getpid()}-{threading.get_ident()}"
    tmp_data, tmp_manifest = folder / f"build.{tag}.u8", folder / f"build.{tag}.npz"
    log.info("caching %d images at %d px in %s", len(paths), size, folder)
    try:
        reasons, offsets, shapes = _write_pixels(paths, tmp_data, size, workers, progress)
        good = [i for i, r in enumerate(reasons) if not r]
        key = cache_key([paths[i] for i in good], [stats[i] for i in good], size)
        offsets_arr = np.asarray(offsets, dtype=np.int64)
        shapes_arr = np.asarray(shapes, dtype=np.int32).reshape(-1, 2)
        with open(tmp_manifest, "wb") as f:
            np.savez(f, offsets=offsets_arr, shapes=shapes_arr, size=np.int64(size), version=np.int64(CACHE_VERSION))
            _sync(f)
        data_path, manifest_path = cache_files(cache_dir, key)
        os.replace(tmp_data, data_path)  # pixels first: a manifest in place implies its pixels are
        os.replace(tmp_manifest, manifest_path)
    except OSError as exc:
        raise _cache_write_error(exc, folder, len(paths), size) from None
    finally:
        for tmp in (tmp_data, tmp_manifest):
            tmp.unlink(missing_ok=True)
    cache = ImageCache(data_path, offsets_arr, shapes_arr, size)
    seconds = time.perf_counter() - start
    log.info("cached %d images (%.0f MB) in %.1f s", len(cache), cache.nbytes / 1e6, seconds)
    return CacheBuild(reasons, cache, seconds)


def _remove_stale_builds(folder: Path, max_age_s: float = STALE_BUILD_S) -> None:
    """Delete temp files of builders killed mid-way (a live builder's file keeps a fresh mtime)."""
    now = time.time()
    for tmp in folder.glob("build.tmp-*"):
        try:
            if now - tmp.stat().st_mtime > max_age_s:
                tmp.unlink()
        except OSError:
            pass  # another builder removed it first


def _write_pixels(paths: Sequence[str], tmp_data: Path, size: int, workers: int,
                  progress: Callable[[int], None] | None) -> tuple[list[str], list[int], list[tuple[int, int]]]:
    reasons: list[str] = []
    offsets, shapes = [0], []

    def decode(path: str) -> tuple[str, np.ndarray | None]:
        reason, img = load_checked(path)
        return reason, None if img is None else resize_for_cache(img, size)

    with open(tmp_data, "wb") as f:
        results = map_in_threads(decode, paths, workers=workers)
        for reason, img in track(results, total=len(paths), desc=f"caching images at {size} px"):
            reasons.append(reason)
            if progress:
                progress(1)
            if img is None:
                continue
            f.write(img.data)
            offsets.append(offsets[-1] + img.nbytes)
            shapes.append(img.shape[:2])
        _sync(f)
    return reasons, offsets, shapes


def _sync(f) -> None:
    """Flush to disk before the rename, so a crash cannot leave a named but empty cache."""
    f.flush()
    os.fsync(f.fileno())


def _cache_write_error(exc: OSError, folder: Path, n: int, size: int) -> DataError:
    if exc.errno == errno.ENOSPC:
        need = n * size * size * 3 / 1e9
        return DataError(f"cache: disk full in {folder} (needs about {need:.1f} GB for {n} images at "
                         f"{size} px); free space, set cache_dir, or use cache=false")
    return DataError(f"cache: cannot write in {folder} ({exc.strerror or exc}); set cache_dir or use cache=false")


def open_cache(paths: Sequence[str], *, cache_dir: Path, size: int, workers: int = 4) -> ImageCache:
    """The cache of ``paths`` at ``size``, built if missing. Every path must be a usable image."""
    stats = stat_files(paths)
    cache = load_cache(cache_dir, paths, size=size, stats=stats)
    if cache is not None:
        return cache
    built = build_cache(paths, cache_dir=cache_dir, size=size, workers=workers, stats=stats)
    bad = [(p, r) for p, r in zip(paths, built.reasons) if r]
    if bad:
        listing = "; ".join(f"{shown(p)}: {r}" for p, r in bad[:3])
        raise DataError(f"cache: {len(bad)} image(s) cannot be decoded: {listing} "
                        f"(validate the dataset first, e.g. with skip_bad_images=true)")
    return built.cache

