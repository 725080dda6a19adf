"""Datasets on disk: the index of a class-folder tree or a CSV (paths, labels, ids), the problems
found while indexing, and the fingerprints of the files. Images are opened by
`rockcls.data.images` only; the split into folds is `rockcls.data.folds`.

Indexing lists folders with ``os.scandir`` (no per-file ``stat``); validation decodes every image
once, in threads (OpenCV releases the GIL), and caches the verdicts under a fingerprint of the
file list and each file's size, mtime, ctime and inode (and the pixel cap), so a second run on
unchanged data only lists and stats the files."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from rockcls.core.errors import DataError, first_line
from rockcls.core.text import hash_bytes, is_utf8, shown, utf8_escaped
from rockcls.data.images import IMAGE_EXTENSIONS

SHOWN = 3  # problems named in the one-line error; the report file lists them all


# Kinds of data problems (singular -> plural), reported together by validation.
BAD_IMAGE = "bad image"


EMPTY_CLASS = "empty class folder"


FEW_IMAGES = "class with too few images"


EMPTY_LABEL = "empty label"


UNKNOWN_LABEL = "unknown label"


UNREADABLE = "unreadable folder entry"


PLURALS = {BAD_IMAGE: "bad images", EMPTY_CLASS: "empty class folders", FEW_IMAGES: "classes with too few images",
           EMPTY_LABEL: "empty labels", UNKNOWN_LABEL: "unknown labels", UNREADABLE: "unreadable folder entries"}


log = logging.getLogger("rockcls")


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


def list_files(folder: str | os.PathLike, hidden: list[str] | None = None,
               unreadable: list[str] | None = None) -> list[str]:
    """Every non-hidden file under ``folder``; hidden folders (.ipynb_checkpoints, ...) are skipped
    (and their paths appended to ``hidden`` when given).

    Ordered as ``sorted(Path.rglob(...))`` orders them (by path components), so ids, folds and
    fingerprints do not depend on how the folder was listed. ``os.scandir`` gives file types
    from the directory listing, so no file is ``stat``-ed here; symlinked folders are not
    followed (as with ``rglob``). An entry whose type cannot be read (a symbolic link loop) or a
    sub-folder that cannot be listed is returned like a file, and appended to ``unreadable``:
    reading it fails later, so it is reported as a bad file, not as a traceback.
    """
    found: list[str] = []
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        if e.name.startswith("."):
            if hidden is not None:
                hidden.append(e.path)
            continue
        try:
            if e.is_dir():
                if not e.is_symlink():
                    found += list_files(e.path, hidden, unreadable)
                continue
        except OSError:  # ELOOP from is_dir, or EACCES listing the sub-folder
            if unreadable is not None:
                unreadable.append(e.path)
        found.append(e.path)
    return found


def _is_image_name(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def _relative_ids(paths: Sequence[str], root: Path) -> list[str]:
    """``os.path.relpath(p, root)`` for paths listed under ``root`` (a string cut: 10x faster)."""
    prefix = os.path.join(str(root), "")
    return [p[len(prefix):] if p.startswith(prefix) else os.path.relpath(p, root) for p in paths]


def _file_ids(paths: Sequence[str], root: Path) -> list[str]:
    """The ids of files listed under ``root``: their relative paths as UTF-8 text.

    Ids are written to CSV files and the tracking store, so a name that is not valid UTF-8 gets
    its ``\\xNN`` escaped form (`utf8_escaped`) as id; its path keeps the exact name, so the file
    is still read and its logits files hold the exact name.
    """
    relative = _relative_ids(paths, root)
    ids = [utf8_escaped(i) for i in relative]
    escaped = [(r, i) for r, i in zip(relative, ids) if r != i]
    if escaped:
        if len(set(ids)) < len(ids):
            raise DataError(f"data: the escaped id of {shown(escaped[0][0])} names another file of "
                            f"{shown(str(root))} too; rename the files whose names are not valid UTF-8")
        log.warning("%d file name(s) are not valid UTF-8; their ids are written with \\xNN escapes, first: %s -> %s",
                    len(escaped), shown(escaped[0][0]), escaped[0][1])
    return ids


def _split_images(files: Sequence[str], ignored: list[str], unreadable: Sequence[str] = ()) -> list[str]:
    """The image files of ``files``, and the ``unreadable`` entries whatever their name (they may
    be images: reading them reports why they cannot be); the others go to ``ignored``."""
    keep = set(unreadable)
    images = []
    for p in files:
        (images if p in keep or _is_image_name(p) else ignored).append(p)
    return images


def _unreadable(path: str, exc: OSError) -> Problem:
    return (UNREADABLE, path, f"unreadable ({exc.strerror or exc})")


def _class_dirs(root: Path) -> tuple[list[Path], list[Problem]]:
    """The class sub-folders of ``root``, and the entries whose type cannot be read (a symbolic
    link loop): each may be a class folder, so each is a problem, not a silent omission."""
    dirs: list[Path] = []
    problems: list[Problem] = []
    with os.scandir(root) as entries:
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                if e.is_dir():
                    dirs.append(Path(e.path))
            except OSError as exc:
                problems.append(_unreadable(e.path, exc))
    bad = next((d for d in dirs if not is_utf8(d.name)), None)
    if bad is not None:
        raise DataError(f"data: class folder {shown(str(bad))} has a name that is not valid UTF-8 (class names "
                        f"are the predicted labels); rename it")
    return sorted(dirs), sorted(problems)


def _index_class_folders(root: Path, classes: Sequence[str] | None) -> DatasetIndex:
    class_dirs, problems = _class_dirs(root)
    if not class_dirs:
        raise DataError(f"data: {root} has no class sub-folders (expected {root}/<class>/*.png)")
    names = _class_names([d.name for d in class_dirs], classes, str(root))
    label_of = {name: k for k, name in enumerate(names)}
    paths: list[str] = []
    labels: list[int] = []
    ignored: list[str] = []
    for d in class_dirs:
        if d.name not in label_of:
            problems.append((UNKNOWN_LABEL, str(d), f"class folder not among the classes {', '.join(names)}"))
            continue
        unreadable: list[str] = []
        try:
            files = list_files(d, hidden=ignored, unreadable=unreadable)
        except OSError as exc:
            problems.append(_unreadable(str(d), exc))
            continue
        images = _split_images(files, ignored, unreadable)
        if not images:
            problems.append((EMPTY_CLASS, str(d), "holds no images"))
        paths += images
        labels += [label_of[d.name]] * len(images)
    return DatasetIndex(paths, np.asarray(labels, dtype=np.int64), names, _file_ids(paths, root), str(root),
                        ignored=ignored, problems=problems)


def _index_flat_folder(root: Path) -> DatasetIndex:
    ignored: list[str] = []
    unreadable: list[str] = []
    try:
        files = list_files(root, hidden=ignored, unreadable=unreadable)
    except OSError as exc:
        raise DataError(f"data: cannot list {shown(str(root))} ({exc.strerror or exc})") from None
    paths = _split_images(files, ignored, unreadable)
    if not paths:
        raise DataError(f"data: {root} holds no images")
    return DatasetIndex(paths, np.full(len(paths), -1, dtype=np.int64), [], _file_ids(paths, root), str(root),
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
    names = ", ".join(map(shown, _relative_ids(index.ignored[:SHOWN], Path(index.root))))
    more = f" and {len(index.ignored) - SHOWN} more" if len(index.ignored) > SHOWN else ""
    log.info("ignored %d file(s) that are not images (no image extension) or hidden: %s%s",
             len(index.ignored), names, more)


def _index_csv(csv_path: Path, classes: Sequence[str] | None, labeled: bool) -> DatasetIndex:
    try:
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"data: cannot read CSV {csv_path}: {first_line(exc, 300)}") from None
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
        h.update(hash_bytes(f"{p}\0{fields}\n"))
    return h.hexdigest()[:16]


def file_fingerprint(paths: Sequence[str]) -> str:
    """Hash of paths, sizes, mtimes, ctimes and inodes: changes when any file is added, removed,
    rewritten or replaced (see `stat_files` for what cannot hide a change)."""
    return stats_fingerprint(paths, stat_files(paths))


def content_fingerprint(index: DatasetIndex) -> str:
    """Hash of ids and labels: equal for the same dataset wherever it is stored."""
    h = hashlib.sha1()
    for i, y in zip(index.ids, index.labels.tolist()):
        h.update(hash_bytes(f"{i}\0{y}\n"))
    h.update(hash_bytes("\0".join(index.classes)))
    return h.hexdigest()[:16]


def report_path(root: str) -> Path:
    """Where the problems of the dataset at ``root`` are listed when the caller names no file."""
    digest = hashlib.sha1(hash_bytes(str(Path(root).resolve()))).hexdigest()[:8]
    return Path(tempfile.gettempdir()) / f"rockcls-data-problems-{digest}.tsv"


def write_problems(problems: Sequence[Problem], path: Path) -> None:
    def clean(text: str) -> str:
        return utf8_escaped(" ".join(str(text).split()))  # one row per problem, whatever the file names hold

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
    first = "; ".join(f"{shown(where)}: {detail}" for _, where, detail in problems[:SHOWN])
    hint = (". Fix or remove the bad images, or pass skip_bad_images=true to leave them out"
            if BAD_IMAGE in counts else "")
    return DataError(f"data: {summary}; first: {first}; {listed}{hint}")


def write_atomic(path: Path, payload: bytes) -> None:
    """Write to a temporary name and rename, so readers never see a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)
