"""Durable file writes: a result is written to a temporary file beside its target, flushed to disk and
renamed over the target, so a reader sees the old file or the new one, never half of one.

Every writer here turns an `OSError` (disk full, read-only folder, no permission) into one `OutputError`
line naming the file it could not write: `cannot write PATH: No space left on device`.
"""

from __future__ import annotations

import errno
import json
import os
import uuid
from collections.abc import Collection, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

from pipeline.core.errors import OutputError, first_line

# What a failing write reports, as opposed to a bug: the disk (or quota) is full, the file system is
# read-only or failing, the folder is not ours to write.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
                          errno.EIO})


def output_error(path: str | os.PathLike, exc: OSError) -> OutputError:
    """`cannot write PATH: REASON`, one line."""
    return OutputError(f"cannot write {path}: {exc.strerror or first_line(exc)}")


@contextmanager
def writing(path: str | os.PathLike, errnos: Collection[int] | None = None) -> Iterator[None]:
    """Inside, an `OSError` becomes an `OutputError` naming `path` (only one whose errno is in `errnos`,
    when given: the block does more than write `path`, and other errors are not about it)."""
    try:
        yield
    except OSError as exc:
        if errnos is not None and exc.errno not in errnos:
            raise
        raise output_error(path, exc) from exc


def make_folder(folder: str | os.PathLike) -> Path:
    """`folder` and its parents, or an `OutputError` naming it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {folder}: {exc.strerror or first_line(exc)}") from exc
    return folder


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (it survives a power cut, not only a killed process)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", newline: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file beside `path` for writing; on a clean exit it is synced and renamed over
    `path`, on an error it is removed and `path` is left as it was.

    Errors opening, syncing or renaming, and those of the block with an errno of `WRITE_ERRNOS` (a full
    disk surfaces in the block's own writes), raise `OutputError` naming `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    fh = None
    try:
        with writing(path):
            fh = open(tmp, mode, newline=newline)  # noqa: SIM115 - closed below, before the rename
        with writing(path, WRITE_ERRNOS):
            yield fh
        with writing(path):
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
            os.replace(tmp, path)
    except BaseException:
        if fh is not None:
            with suppress(OSError):  # closing flushes what is buffered: on a full disk, that fails again
                fh.close()
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    with writing(path):
        fsync_dir(path.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path) as fh:
        fh.write(text)


def write_json_atomic(path: str | os.PathLike, payload: Any, **dump_options: Any) -> None:
    """`payload` as indented JSON; `dump_options` go to json.dumps (`default=`, `allow_nan=`). The
    text is built before the file is opened, so a payload that cannot be written leaves no file."""
    write_text_atomic(path, json.dumps(payload, indent=1, **dump_options))
