"""Durable file writes: a result is written to a temporary file beside its target, flushed to disk and
renamed over the target, so a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


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
    `path`, on an error it is removed and `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, mode, newline=newline) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path) as fh:
        fh.write(text)


def write_json_atomic(path: str | os.PathLike, payload: Any, **dump_options: Any) -> None:
    """`payload` as indented JSON; `dump_options` go to json.dumps (`default=`, `allow_nan=`). The
    text is built before the file is opened, so a payload that cannot be written leaves no file."""
    write_text_atomic(path, json.dumps(payload, indent=1, **dump_options))
