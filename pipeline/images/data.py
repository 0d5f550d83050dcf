"""Finding images and identifying them by content.

An image's id is a hash of its bytes, so a renamed, moved or duplicated file maps to the same
cached row. Scanning never stops at a bad entry: it records the reason, and the caller skips it.
Decoding is `pipeline.images.decode`.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple, TypeVar

import numpy as np

from pipeline.core.errors import ConfigError, DataError
from pipeline.core.hashing import bytes_sha256, stream_sha256
from pipeline.core.paths import path_text

T = TypeVar("T")
R = TypeVar("R")
ID_LENGTH = 32  # hex characters of SHA-256 kept as the image id (128 bits)


@dataclass
class Dataset:
    """Image paths with optional labels; `labels[i]` indexes `class_names`, or is -1 if unlabelled."""

    paths: list[Path]
    labels: np.ndarray
    class_names: list[str]
    skipped: list[tuple[str, str]]  # (path, reason) for files rejected while scanning
    source: Path | None = None  # the folder or list scanned, for messages
    ids: list[str | None] | None = None  # content ids of `paths` when the caller already has them

    @property
    def empty_classes(self) -> list[str]:
        """Class folders with no files: a head fitted on this data never predicts them."""
        labels = np.asarray(self.labels, dtype=int)
        counts = np.bincount(labels[labels >= 0], minlength=len(self.class_names))
        return [name for name, count in zip(self.class_names, counts, strict=True) if count == 0]

    @property
    def split_like_classes(self) -> list[str]:
        """Class folders named like splits (train, val, test): likely the folder holding the splits,
        given where one split was meant."""
        return [name for name in self.class_names if name.lower() in SPLIT_NAMES]


# Class folder names that are split names: `--data` given the folder that holds the splits.
SPLIT_NAMES = frozenset({"train", "training", "val", "valid", "validation", "test", "testing"})


def _unusable(path: Path, exc: OSError) -> str:
    """Why a folder entry that cannot be followed is skipped."""
    if exc.errno == errno.ELOOP:
        return "symbolic link loop"
    if exc.errno == errno.ENOENT and os.path.islink(path):
        return "broken symbolic link (its target does not exist)"
    return f"unreadable: {exc.strerror or exc}"


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device")):
        if test(mode):
            return name
    return "not a regular file"


def _entries(folder: Path) -> tuple[list[tuple[Path, tuple[int, int]]], list[Path], list[tuple[str, str]]]:
    """The visible entries of one folder, links followed: sub-folders with their (device, inode), regular
    files, and a reason for every other entry. Hidden names (a leading dot: uploads in progress, editor
    and notebook leftovers) are left alone. Raises OSError when `folder` itself cannot be listed."""
    folders, files, skipped = [], [], []
    for path, found in _classified(str(folder), _visible_names(folder)):
        if isinstance(found, str):
            skipped.append((path, found))
        elif isinstance(found, FileStat):
            files.append(Path(path))
        else:
            folders.append((Path(path), found))
    return folders, files, skipped


class FileStat(NamedTuple):
    """What tells whether a file changed without opening it: size, modification time, inode and device."""

    size: int
    mtime_ns: int
    ino: int
    dev: int

    @classmethod
    def of(cls, info: os.stat_result) -> FileStat:
        return cls(info.st_size, info.st_mtime_ns, info.st_ino, info.st_dev)


def _visible_names(folder: str | os.PathLike) -> list[str]:
    """The folder's names without hidden ones, sorted; the only list a scan holds per folder."""
    with os.scandir(folder) as listing:
        return sorted(entry.name for entry in listing if not entry.name.startswith("."))


def _classified(folder: str, names: list[str]) -> Iterator[tuple[str, FileStat | tuple[int, int] | str]]:
    """Each name of `folder` as a path, links followed: a regular file's `FileStat`, a sub-folder's
    (device, inode), or why the entry is not used. Paths are strings: a scan of a million files makes
    no `Path` objects."""
    prefix = folder.rstrip("/") + "/"
    for name in names:
        path = prefix + name
        try:
            info = os.stat(path)
        except OSError as exc:
            yield path, _unusable(path, exc)
            continue
        if stat.S_ISDIR(info.st_mode):
            yield path, (info.st_dev, info.st_ino)
        elif stat.S_ISREG(info.st_mode):
            yield path, FileStat.of(info)
        else:
            yield path, f"not a regular file ({_kind(info.st_mode)})"


def _identity(folder: str | os.PathLike) -> tuple[int, int]:
    info = os.stat(folder)
    return info.st_dev, info.st_ino


_LOOP = "symbolic link loop (leads back to a folder that contains it)"


def iter_files(folder: str | os.PathLike, on_skip: Callable[[str, str], None],
               above: frozenset[tuple[int, int]] = frozenset()) -> Iterator[tuple[str, FileStat]]:
    """Every regular file under `folder` (its path as a string) with its `FileStat`, streamed in sorted
    order (that of `sorted()` on the paths as `Path`: depth first, the names of each folder in order),
    following links to folders but never round a loop. `on_skip(path, reason)` hears of everything else
    that is not used: links whose target is missing, link loops, folders that cannot be read, pipes and
    devices; nothing is dropped without a reason, except hidden names. Memory holds the sorted names of
    the folders on the current path only. `above`: the (device, inode) of folders that contain `folder`."""
    folder = str(Path(folder))  # normalised as a Path would be: `a/./b/` is `a/b`
    try:
        top = above | {_identity(folder)}
        stack = [(folder, top, _classified(folder, _visible_names(folder)))]
    except OSError as exc:
        on_skip(str(folder), f"unreadable folder: {exc.strerror or exc}")
        return
    while stack:
        _current, ancestors, entries = stack[-1]
        item = next(entries, None)
        if item is None:
            stack.pop()
            continue
        path, found = item
        if isinstance(found, str):
            on_skip(path, found)
        elif isinstance(found, FileStat):
            yield path, found
        elif found in ancestors:
            on_skip(path, _LOOP)
        else:
            try:
                names = _visible_names(path)
            except OSError as exc:
                on_skip(path, f"unreadable folder: {exc.strerror or exc}")
                continue
            stack.append((path, ancestors | {found}, _classified(path, names)))


def walk_files(folder: str | os.PathLike, above: frozenset[tuple[int, int]] = frozenset()) -> tuple[
        list[Path], list[tuple[str, str]]]:
    """`iter_files` gathered: every regular file under `folder`, sorted, and a sorted `(path, reason)`
    for everything else that is not used."""
    skipped: list[tuple[str, str]] = []
    files = [Path(path) for path, _stat in iter_files(folder, lambda path, reason: skipped.append((path, reason)),
                                                      above)]
    return files, sorted(skipped)


def scan(source: str | os.PathLike, allow_empty_list: bool = False) -> Dataset:
    """An image folder (`DIR/<class>/<image>`), a flat folder of images, or a text file listing paths.

    Every entry that is not used has a reason in `skipped` (see `walk_files`); a class folder with no
    files is still a class (`Dataset.empty_classes` names it)."""
    source = Path(source)
    if source.is_file():
        return _scan_list(source, allow_empty_list)
    if not source.is_dir():
        raise DataError(f"data folder or file list not found: {source}")
    try:
        top = _identity(source)
        folders, loose, unusable = _entries(source)
    except OSError as exc:
        raise DataError(f"cannot read the data folder {source}: {exc.strerror or exc}") from None
    if not folders:
        if not loose:
            reasons = f" ({len(unusable)} unusable entries, the first {unusable[0][0]}: {unusable[0][1]})" \
                if unusable else ""
            raise DataError(f"no images in {source}{reasons}")
        return Dataset(loose, np.full(len(loose), -1), [], unusable, source)
    paths, labels, class_names = [], [], []
    skipped = [(str(p), "not inside a class folder") for p in loose] + unusable
    for class_dir, identity in folders:
        if identity == top:
            skipped.append((str(class_dir), _LOOP))
            continue
        files, unused = walk_files(class_dir, frozenset({top}))
        paths += files
        labels += [len(class_names)] * len(files)
        class_names.append(path_text(class_dir.name))  # a label: text, whatever the folder's bytes
        skipped += unused
    if not paths:
        raise DataError(f"no images in the class folders of {source}")
    return Dataset(paths, np.asarray(labels), class_names, skipped, source)


def _listed_reason(path: Path) -> str | None:
    """Why a path from a file list is not used, or None when it is a regular file."""
    try:
        info = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ENOENT and not os.path.islink(path):
            return "file not found"
        return _unusable(path, exc)
    if stat.S_ISREG(info.st_mode):
        return None
    return "a folder, not a file (list files name images)" if stat.S_ISDIR(info.st_mode) else \
        f"not a regular file ({_kind(info.st_mode)})"


def _scan_list(list_file: Path, allow_empty: bool = False) -> Dataset:
    """One path per line; relative paths are taken from the list's own folder; '#' starts a comment.
    `allow_empty` for a queue that a scheduled job reads: an emptied list means nothing new.

    A listed name need not be valid UTF-8 (`find DIR -type f > list.txt` writes the bytes of every name):
    its bytes are the file's name, as for a name found in a folder. A NUL byte, which no path holds,
    marks a file that is not a list (an image given by mistake)."""
    base = list_file.parent
    try:
        raw = list_file.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read the file list {list_file}: {exc.strerror or exc}") from None
    if b"\0" in raw:
        raise DataError(f"{list_file} is not a text file listing image paths")
    paths, skipped = [], []
    for line in os.fsdecode(raw).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path = Path(line) if Path(line).is_absolute() else base / line
        reason = _listed_reason(path)
        (paths.append(path) if reason is None else skipped.append((str(path), reason)))
    if not paths and not skipped and not allow_empty:
        raise DataError(f"no paths listed in {list_file}")
    return Dataset(paths, np.full(len(paths), -1), [], skipped, list_file)


def require_labelled(dataset: Dataset, what: str) -> Dataset:
    """`dataset` itself, or a ConfigError naming `what` when it is not a labelled folder."""
    if not dataset.class_names:
        raise ConfigError(f"{what} must be a labelled folder (DIR/<class>/<image>)")
    return dataset


def test_labels(train_classes: list[str], test: Dataset, what: str) -> np.ndarray:
    """The test split's labels in the training split's class order (the test folder may hold fewer
    classes); a ConfigError, opening with `what`, names test classes that training lacks."""
    unknown = sorted(set(test.class_names) - set(train_classes))
    if unknown:
        raise ConfigError(f"{what} has classes the training folder lacks: {', '.join(unknown)}")
    return np.asarray([train_classes.index(test.class_names[i]) for i in test.labels], dtype=int)


def content_id(data: bytes) -> str:
    return bytes_sha256(data)[:ID_LENGTH]


def stream_id(fh: BinaryIO) -> str:
    """The same id as `content_id` of what the open file holds from its position on, streamed."""
    return stream_sha256(fh)[:ID_LENGTH]


def hash_file(path: Path) -> str:
    """The same id as `content_id` of the file's bytes, streamed."""
    with open(path, "rb") as fh:
        return stream_id(fh)


# A photo the page cache holds (tens of KB) is read and hashed in about 0.03 ms, where handing it to a
# thread pool costs about 0.06 ms: such files are hashed fastest in the calling thread (measured: 720
# flowers12 files in 16 ms, against 26-65 ms in 2-8 threads). Large files, or files waiting on a disk
# or a network share, are hashed faster several at a time (hashing and reading release the GIL).
QUICK_FILE_S = 1e-4  # the mean seconds a file under which files are read in the calling thread
_QUICK_ALLOWANCE = 8  # files' worth of QUICK_FILE_S granted up front (a first slow file switches at once)


def map_files(one: Callable[[T], R], items: Sequence[T], workers: int = 4) -> list[R]:
    """`[one(item) for item in items]` where `one` reads a file: in the calling thread while files
    prove quick (mean under QUICK_FILE_S), the rest in `workers` threads as soon as they do not."""
    results: list[R] = []
    started = time.perf_counter()
    for item in items:
        results.append(one(item))
        if time.perf_counter() - started > QUICK_FILE_S * (len(results) + _QUICK_ALLOWANCE):
            break
    if len(results) < len(items):
        with ThreadPoolExecutor(workers) as pool:
            results += pool.map(one, items[len(results):])
    return results


def hash_files(paths: list[Path], workers: int = 4) -> list[str | None]:
    """Content ids in order; None where the file cannot be read (it is then skipped by the caller)."""
    def one(path: Path) -> str | None:
        try:
            return hash_file(path)
        except OSError:
            return None
    return map_files(one, paths, workers)
