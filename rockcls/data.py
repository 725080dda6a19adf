"""Datasets on disk: indexing, decoding, validation, splits. The only module that opens images.

Indexing lists folders with ``os.scandir`` (no per-file ``stat``); validation decodes every image
once, in threads (OpenCV releases the GIL), and caches the verdicts under a fingerprint of the
file list and each file's size, mtime, ctime and inode (and the pixel cap), so a second run on
unchanged data only lists and stats the files.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import logging
import stat
import sys
import tempfile
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import cv2
import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from rockcls.config import default_cache_dir
from rockcls.errors import ConfigError, DataError
from rockcls.progress import track

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
MIN_SIDE = 8
SHOWN = 3  # problems named in the one-line error; the report file lists them all

# Kinds of data problems (singular -> plural), reported together by validation.
BAD_IMAGE = "bad image"
EMPTY_CLASS = "empty class folder"
FEW_IMAGES = "class with too few images"
EMPTY_LABEL = "empty label"
UNKNOWN_LABEL = "unknown label"
PLURALS = {BAD_IMAGE: "bad images", EMPTY_CLASS: "empty class folders", FEW_IMAGES: "classes with too few images",
           EMPTY_LABEL: "empty labels", UNKNOWN_LABEL: "unknown labels"}

# Bad images are reported once, by validation, naming the file; OpenCV's own per-file warnings
# on stderr would only repeat that (thousands of lines on a large dataset).
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)

log = logging.getLogger("rockcls")
T = TypeVar("T")
R = TypeVar("R")
FileStat = tuple[int, int, int, int] | None
Problem = tuple[str, str, str]  # (kind, where: a path, folder, CSV row or class, detail)


@dataclass
class DatasetIndex:
    """Image files with their integer labels (-1 when unlabeled) and sorted class names.

    ``skipped``: bad images left out (path, reason); ``ignored``: files that are not part of the
    dataset (no image extension, hidden); ``problems``: what indexing found wrong, reported by
    validation together with the bad images.
    """

    paths: list[str]
    labels: np.ndarray
    classes: list[str]
    ids: list[str]
    root: str = ""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, keep: np.ndarray) -> "DatasetIndex":
        keep = np.asarray(keep, dtype=bool)
        pick = np.flatnonzero(keep)
        return DatasetIndex([self.paths[i] for i in pick], self.labels[pick], self.classes,
                            [self.ids[i] for i in pick], self.root, list(self.skipped), list(self.ignored),
                            list(self.problems))


# ---------------------------------------------------------------------------- indexing

def index_dataset(source: str | os.PathLike, classes: Sequence[str] | None = None,
                  labeled: bool = True, *, check: bool = True) -> DatasetIndex:
    """Index a class-per-folder tree, a folder of images (``labeled=False``) or a CSV.

    Files without an image extension and hidden files are not part of the dataset (as in
    torchvision's ImageFolder): they are counted and logged once. Problems of single entries
    (an empty class folder, an empty or unknown label) end in one DataError listing all of them,
    or with ``check=False`` stay in ``index.problems`` for `validate_images` to report together
    with the bad images. A dataset that cannot be indexed at all raises at once.
    """
    src = Path(source)
    if not str(source):
        raise DataError("data: no dataset given (set data=PATH)")
    if not src.exists():
        raise DataError(f"data: {source} does not exist")
    if src.is_file():
        index = _index_csv(src, classes, labeled)
    elif labeled:
        index = _index_class_folders(src, classes)
    else:
        index = _index_flat_folder(src)
    _log_ignored(index)
    if check and index.problems:
        raise problems_error(index.problems, report_path(index.root))
    return index


def list_files(folder: str | os.PathLike, hidden: list[str] | None = None) -> list[str]:
    """Every non-hidden file under ``folder``; hidden folders (.ipynb_checkpoints, ...) are skipped
    (and their paths appended to ``hidden`` when given).

    Ordered as ``sorted(Path.rglob(...))`` orders them (by path components), so ids, folds and
    fingerprints do not depend on how the folder was listed. ``os.scandir`` gives file types
    from the directory listing, so no file is ``stat``-ed here; symlinked folders are not
    followed (as with ``rglob``).
    """
    found: list[str] = []
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        if e.name.startswith("."):
            if hidden is not None:
                hidden.append(e.path)
        elif e.is_dir():
            if not e.is_symlink():
                found += list_files(e.path, hidden)
        else:
            found.append(e.path)
    return found


def _is_image_name(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def _relative_ids(paths: Sequence[str], root: Path) -> list[str]:
    """``os.path.relpath(p, root)`` for paths listed under ``root`` (a string cut: 10x faster)."""
    prefix = os.path.join(str(root), "")
    return [p[len(prefix):] if p.startswith(prefix) else os.path.relpath(p, root) for p in paths]


def _split_images(files: Sequence[str], ignored: list[str]) -> list[str]:
    """The image files of ``files``; the others go to ``ignored``."""
    images = []
    for p in files:
        (images if _is_image_name(p) else ignored).append(p)
    return images


def _index_class_folders(root: Path, classes: Sequence[str] | None) -> DatasetIndex:
    with os.scandir(root) as entries:
        class_dirs = sorted(Path(e.path) for e in entries if e.is_dir() and not e.name.startswith("."))
    if not class_dirs:
        raise DataError(f"data: {root} has no class sub-folders (expected {root}/<class>/*.png)")
    names = _class_names([d.name for d in class_dirs], classes, str(root))
    label_of = {name: k for k, name in enumerate(names)}
    paths: list[str] = []
    labels: list[int] = []
    ignored: list[str] = []
    problems: list[Problem] = []
    for d in class_dirs:
        if d.name not in label_of:
            problems.append((UNKNOWN_LABEL, str(d), f"class folder not among the classes {', '.join(names)}"))
            continue
        images = _split_images(list_files(d, hidden=ignored), ignored)
        if not images:
            problems.append((EMPTY_CLASS, str(d), "holds no images"))
        paths += images
        labels += [label_of[d.name]] * len(images)
    return DatasetIndex(paths, np.asarray(labels, dtype=np.int64), names, _relative_ids(paths, root), str(root),
                        ignored=ignored, problems=problems)


def _index_flat_folder(root: Path) -> DatasetIndex:
    ignored: list[str] = []
    paths = _split_images(list_files(root, hidden=ignored), ignored)
    if not paths:
        raise DataError(f"data: {root} holds no images")
    return DatasetIndex(paths, np.full(len(paths), -1, dtype=np.int64), [], _relative_ids(paths, root), str(root),
                        ignored=ignored)


def _class_names(found: Sequence[str], classes: Sequence[str] | None, where: str) -> list[str]:
    """The given ``classes``, or the sorted names found (at least two)."""
    if classes is not None:
        return list(classes)
    names = sorted(set(found))
    if len(names) < 2:
        what = f"a single class ({names[0]!r})" if names else "no labelled samples"
        raise DataError(f"data: {where} has {what}; need at least two classes")
    return names


def _log_ignored(index: DatasetIndex) -> None:
    if not index.ignored:
        return
    shown = ", ".join(_relative_ids(index.ignored[:SHOWN], Path(index.root)))
    more = f" and {len(index.ignored) - SHOWN} more" if len(index.ignored) > SHOWN else ""
    log.info("ignored %d file(s) that are not images (no image extension) or hidden: %s%s",
             len(index.ignored), shown, more)


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
    given = [x.strip() for x in df["label"]]
    names = _class_names([x for x in given if x], classes, str(csv_path))
    label_of = {name: k for k, name in enumerate(names)}
    problems: list[Problem] = []
    for row, x in enumerate(given):
        where = f"{csv_path} row {row + 2}"  # the header is line 1
        if not x:
            problems.append((EMPTY_LABEL, where, "empty label"))
        elif x not in label_of:
            problems.append((UNKNOWN_LABEL, where, f"label {x!r} is not one of the classes {', '.join(names)}"))
    keep = np.asarray([x in label_of for x in given], dtype=bool)
    labels = np.asarray([label_of.get(x, -1) for x in given], dtype=np.int64)
    index = DatasetIndex(paths, labels, names, ids, str(base)).subset(keep)
    index.problems = problems
    return index


# ---------------------------------------------------------------------------- decoding

# Formats a file may be: read from the header before anything is decoded. Pillow knows many
# more (EPS among them, which it renders by running Ghostscript on the file): none is opened.
ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF")
DEFAULT_MAX_PIXELS = 100_000_000
MAX_PIXELS_ENV = "ROCKCLS_MAX_PIXELS"
IN_PLACE_PIXELS = 32_000_000


def max_pixels_setting() -> int:
    """The pixel cap of every decode: ``$ROCKCLS_MAX_PIXELS``, or 100 million (10000 x 10000)."""
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"{MAX_PIXELS_ENV}: expected a positive number of pixels, got {raw!r}")
    return value


def load_image(path: str, max_pixels: int | None = None) -> np.ndarray:
    """Decode any common image to RGB uint8 HxWx3 (EXIF-rotated; gray/RGBA/16-bit converted).

    Every problem with the file (unreadable, not a regular file, not an allowed format, over the
    pixel cap, broken data, out of memory) is a DataError naming it; nothing else escapes.
    """
    return decode_image(read_image_file(path), path, max_pixels)


def read_image_file(path: str, max_bytes: int = 0, *, follow_links: bool = True) -> bytes:
    """The bytes of a regular file (a FIFO or device would block or never end: refused)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if not follow_links:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        # O_NONBLOCK: opening a FIFO without a writer must not hang; it changes nothing for files.
        fd = os.open(path, flags)
    except (OSError, ValueError, TypeError) as exc:  # ValueError: a NUL byte in the path
        raise DataError(f"{_shown(path)}: unreadable ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        data = _read_regular(fd, path, max_bytes)
    finally:
        os.close(fd)
    if max_bytes and len(data) > max_bytes:  # it grew after the fstat
        raise DataError(f"{_shown(path)}: too large (over {max_bytes} bytes)")
    return data


def _read_regular(fd: int, path: str, max_bytes: int) -> bytes:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{_shown(path)}: unreadable (not a regular file)")
    if max_bytes and st.st_size > max_bytes:
        raise DataError(f"{_shown(path)}: too large ({st.st_size} bytes, limit {max_bytes})")
    want = max_bytes + 1 if max_bytes else sys.maxsize  # +1: sees a file that grew past the cap
    chunks, got = [], 0
    try:
        while got < want:
            chunk = os.read(fd, min(want - got, max(st.st_size + 1 - got, 1 << 16)))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    except (OSError, MemoryError) as exc:
        raise DataError(f"{_shown(path)}: unreadable ({getattr(exc, 'strerror', None) or exc})") from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def read_under_root(path: str, root: str, max_bytes: int) -> bytes:
    """The bytes of a regular file inside the folder ``root`` (absolute, already a realpath).

    ``path`` is relative to ``root`` or absolute. Symbolic links and '..' are resolved first, and
    the result must still lie inside ``root``; the final open does not follow a link, so one put
    in place after the check is refused too. Every refusal raises a DataError; the caller, not
    this function, decides how much of its reason a client may see.
    """
    try:
        real = os.path.realpath(os.path.join(root, path))  # an absolute path replaces root here
        inside = os.path.commonpath([real, root]) == root
    except (ValueError, TypeError, OSError):  # a NUL byte, mixed path kinds
        raise DataError(f"{_shown(str(path))}: unreadable (not a valid path)") from None
    if not inside:
        raise DataError(f"{_shown(path)}: outside {root}")
    return read_image_file(real, max_bytes, follow_links=False)


def _shown(name: str) -> str:
    return name if name.isprintable() else ascii(name)


def decode_image(data: bytes, name: str, max_pixels: int | None = None) -> np.ndarray:
    """Decode image bytes (``name`` only labels errors), refusing more than ``max_pixels``."""
    if not data:
        raise DataError(f"{_shown(name)}: empty file")
    limit = max_pixels or max_pixels_setting()
    try:
        return _decode_checked(data, limit)
    except _Refused as exc:
        raise DataError(f"{_shown(name)}: {exc}") from None
    except MemoryError:
        raise DataError(f"{_shown(name)}: not decodable (out of memory)") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is this file's problem alone
        raise DataError(f"{_shown(name)}: not a decodable image ({type(exc).__name__})") from None


class _Refused(Exception):
    """A file refused before (or instead of) decoding; the message is the reason."""


def _decode_checked(data: bytes, limit: int) -> np.ndarray:
    w, h = _header_size(data, limit)
    if w * h > limit:
        raise _Refused(f"too large ({w}x{h} px, limit {limit} px; see {MAX_PIXELS_ENV})")
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)  # EXIF-rotated, 8 bit
    if img is None:
        img = _decode_with_pil(data)
    elif img.shape[0] * img.shape[1] <= limit:
        # In place is 4x slower (20 vs 4.4 ms at 12 Mpx) but needs no second copy: worth it only
        # where that copy is hundreds of MB.
        big = img.shape[0] * img.shape[1] > IN_PLACE_PIXELS
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB, dst=img if big else None)
    if img.shape[0] * img.shape[1] > limit:  # a decoder that disagrees with the header
        raise _Refused(f"too large ({img.shape[1]}x{img.shape[0]} px, limit {limit} px)")
    return img


def _header_size(data: bytes, limit: int) -> tuple[int, int]:
    """(width, height) from the header of an allowed format; nothing is decoded here."""
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as im:
            return im.size
    except UnidentifiedImageError:
        raise _Refused(f"not a decodable image (not {', '.join(ALLOWED_FORMATS)})") from None
    except Image.DecompressionBombError:  # Pillow's own cap, checked as it reads the header
        raise _Refused(f"too large (over {2 * Image.MAX_IMAGE_PIXELS} px, limit {limit} px; "
                       f"see {MAX_PIXELS_ENV})") from None


def _decode_with_pil(data: bytes) -> np.ndarray:
    """What OpenCV cannot decode (some TIFF, odd GIF): Pillow, restricted to the allowed formats."""
    with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.float32)
            arr = (arr / max(float(arr.max()), 1.0) * 255.0).astype(np.uint8)
            return np.stack([arr] * 3, axis=-1)
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def load_checked(path: str) -> tuple[str, np.ndarray | None]:
    """("", image) for a usable image, (reason, None) otherwise. Never raises on a bad file."""
    try:
        img = load_image(path)
    except DataError as exc:
        return str(exc).split(": ", 1)[-1], None
    h, w = img.shape[:2]
    if min(h, w) < MIN_SIDE:
        return f"too small ({w}x{h} px, need {MIN_SIDE})", None
    return "", img


def check_image(path: str) -> tuple[str, int, int]:
    """Return ("", h, w) for a usable image or (reason, 0, 0)."""
    reason, img = load_checked(path)
    if img is None:
        return reason, 0, 0
    return "", img.shape[0], img.shape[1]


def map_in_threads(fn: Callable[[T], R], items: Iterable[T], *, workers: int,
                   window: int = 0) -> Iterator[R]:
    """``map(fn, items)`` in a thread pool, in order, with at most ``window`` results in flight.

    ``ThreadPoolExecutor.map`` submits every item up front: with 380k decoded images waiting for
    a slower consumer that is unbounded memory. Threads suffice because OpenCV and file reads
    release the GIL.
    """
    workers = max(1, workers)
    window = window or 4 * workers
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for item in items:
            if len(pending) >= window:
                yield pending.popleft().result()
            pending.append(pool.submit(fn, item))
        while pending:
            yield pending.popleft().result()


# ---------------------------------------------------------------------------- fingerprints

def stat_files(paths: Sequence[str]) -> list[FileStat]:
    """(size, mtime_ns, ctime_ns, inode) of each file, None if it cannot be stat-ed (~1.5 us a file).

    mtime can be set back by anyone (``touch -d``, ``os.utime``, ``cp -p``, ``rsync -t``); ctime
    cannot: the kernel moves it to "now" on every write, rename, chmod or utime. A file rewritten
    with its old size and mtime restored therefore still changes its fingerprint, and one replaced
    by another file (a rename over it) changes its inode too.
    """
    out: list[FileStat] = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
        except (OSError, ValueError):
            out.append(None)
    return out


def stats_fingerprint(paths: Sequence[str], stats: Sequence[FileStat]) -> str:
    """Hash of paths and their stats (as ``file_fingerprint``, from stats already taken)."""
    h = hashlib.sha1()
    for p, st in zip(paths, stats):
        fields = "missing" if st is None else "\0".join(map(str, st))
        h.update(f"{p}\0{fields}\n".encode())
    return h.hexdigest()[:16]


def file_fingerprint(paths: Sequence[str]) -> str:
    """Hash of paths, sizes, mtimes, ctimes and inodes: changes when any file is added, removed,
    rewritten or replaced (see `stat_files` for what cannot hide a change)."""
    return stats_fingerprint(paths, stat_files(paths))


def content_fingerprint(index: DatasetIndex) -> str:
    """Hash of ids and labels: equal for the same dataset wherever it is stored."""
    h = hashlib.sha1()
    for i, y in zip(index.ids, index.labels.tolist()):
        h.update(f"{i}\0{y}\n".encode())
    h.update("\0".join(index.classes).encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------- validation

def validate_images(index: DatasetIndex, *, skip_bad: bool, cache_dir: Path | None = None,
                    workers: int = 8, progress: Callable[[int], None] | None = None,
                    cache_size: int = 0, min_per_class: int = 1, report: Path | None = None) -> DatasetIndex:
    """Decode every image once (in threads; cached by fingerprint) and drop or reject bad ones.

    Every problem is reported in one go: those indexing left in ``index.problems``, the bad
    images (unless ``skip_bad``) and the classes left with fewer than ``min_per_class`` usable
    images. They are written to ``report`` (a TSV file; default: one in the temp folder) and the
    DataError names it with the counts by kind.

    With ``cache_size`` (and a ``cache_dir``) the same decode pass also fills the decoded-image
    cache at that resolution (`rockcls.cache`), so a first run decodes each file once, not twice.
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
                    len(bad), bad[0][0], bad[0][1])
    return kept


def _class_size_problems(index: DatasetIndex, min_per_class: int, skip: set[str]) -> list[Problem]:
    if (index.labels < 0).all():
        return []
    counts = np.bincount(index.labels[index.labels >= 0], minlength=len(index.classes))
    return [(FEW_IMAGES, f"class {name!r}", "has no usable images" if n == 0 else
             f"has {n} usable image(s), the split needs {min_per_class}")
            for name, n in zip(index.classes, counts) if n < min_per_class and name not in skip]


def report_path(root: str) -> Path:
    """Where the problems of the dataset at ``root`` are listed when the caller names no file."""
    digest = hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:8]
    return Path(tempfile.gettempdir()) / f"rockcls-data-problems-{digest}.tsv"


def write_problems(problems: Sequence[Problem], path: Path) -> None:
    def clean(text: str) -> str:
        return " ".join(str(text).split())  # one row per problem, whatever the file names hold

    rows = "".join(f"{clean(k)}\t{clean(w)}\t{clean(d)}\n" for k, w, d in problems)
    write_atomic(path, f"kind\twhere\tdetail\n{rows}".encode())


def problems_error(problems: Sequence[Problem], report: Path) -> DataError:
    """One line: the counts by kind, the first few problems and the file that lists them all."""
    report = Path(report).absolute()
    try:
        write_problems(problems, report)
        listed = f"all {len(problems)} listed in {report}"
    except OSError as exc:
        listed = f"the full list could not be written to {report} ({exc.strerror or exc})"
    counts: dict[str, int] = {}
    for kind, _, _ in problems:
        counts[kind] = counts.get(kind, 0) + 1
    summary = ", ".join(f"{n} {kind if n == 1 else PLURALS.get(kind, kind)}" for kind, n in counts.items())
    first = "; ".join(f"{where}: {detail}" for _, where, detail in problems[:SHOWN])
    hint = (". Fix or remove the bad images, or pass skip_bad_images=true to leave them out"
            if BAD_IMAGE in counts else "")
    return DataError(f"data: {summary}; first: {first}; {listed}{hint}")


def _cached_check(paths: Sequence[str], cache_dir: Path | None, workers: int,
                  progress: Callable[[int], None] | None, cache_size: int = 0) -> list[str]:
    stats = stat_files(paths)
    # The pixel cap decides verdicts too: another cap, other verdicts.
    name = f"{stats_fingerprint(paths, stats)}-{max_pixels_setting()}px.json"
    cache_file = Path(cache_dir) / "index" / name if cache_dir else None
    reasons = _load_reasons(cache_file, len(paths))
    known = reasons is not None
    if cache_size > 0 and cache_dir is not None:
        from rockcls import cache  # cache.py builds on this module: imported here, not at the top

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


def write_atomic(path: Path, payload: bytes) -> None:
    """Write to a temporary name and rename, so readers never see a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
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
        _check_holdout(len(labels), len(counts), val_fraction)
        _, val = train_test_split(positions, test_size=val_fraction, stratify=labels, random_state=seed)
        fold_of[val] = 0
        return fold_of
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, val) in enumerate(splitter.split(positions, labels)):
        fold_of[val] = k
    return fold_of


def _check_holdout(n: int, classes: int, val_fraction: float) -> None:
    """A stratified holdout needs an image of every class on each side (as scikit-learn counts)."""
    n_val = math.ceil(val_fraction * n)
    if n_val < classes:
        raise DataError(f"data: folds=1 with val_fraction={val_fraction} holds out {n_val} of {n} images, "
                        f"fewer than the {classes} classes; raise val_fraction or add images")
    if n - n_val < classes:
        raise DataError(f"data: folds=1 with val_fraction={val_fraction} leaves {n - n_val} of {n} images "
                        f"to train on, fewer than the {classes} classes; lower val_fraction or add images")


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


class BytesSource:
    """Rows given as encoded image bytes (a request's images); a row's errors name it ``row N``."""

    def __init__(self, payloads: Sequence[bytes]):
        self.payloads = list(payloads)

    def __len__(self) -> int:
        return len(self.payloads)

    def read(self, row: int) -> np.ndarray:
        return decode_image(self.payloads[row], f"row {row}")


def open_source(index: DatasetIndex, *, cfg: Any = None, cache_dir: str | Path | None = None,
                cache_size: int = 0, workers: int = 4, **_: object):
    """The image source a dataset reads from: the decoded-image cache, or the files themselves.

    ``cfg`` (a TrainConfig) decides: ``cfg.cache`` true reads from the cache at
    ``resolve_cache_size(cfg.img_size, cfg.cache_size)`` in ``cfg.cache_dir`` (built here if
    missing). Without ``cfg``, ``cache_size > 0`` asks for the cache explicitly.
    """
    if cfg is not None:
        if not getattr(cfg, "cache", False):
            return FileSource(index.paths)
        from rockcls.cache import resolve_cache_dir, resolve_cache_size

        cache_size = resolve_cache_size(cfg.img_size, cfg.cache_size)
        cache_dir = resolve_cache_dir(cfg.cache_dir)
        workers = max(4, 2 * cfg.num_workers)
    if cache_size <= 0:
        return FileSource(index.paths)
    from rockcls.cache import open_cache

    return open_cache(index.paths, cache_dir=Path(cache_dir or default_cache_dir()), size=cache_size,
                      workers=workers)


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


def to_chw_tensor(img: np.ndarray) -> torch.Tensor:
    """HWC array -> contiguous CHW tensor of the same dtype.

    ``cv2.split`` de-interleaves the channels with SIMD into the CHW buffer, so the batch is
    then stacked with plain copies: 0.7 ms for 32 images at 224 px against 1.9 ms for stacking
    permuted views (a strided copy); a warm-cache worker spends about 8 ms on such a batch.
    """
    if img.ndim == 2:
        img = img[..., None]
    out = np.empty((img.shape[2], *img.shape[:2]), dtype=img.dtype)
    cv2.split(img, list(out))
    return torch.from_numpy(out)
