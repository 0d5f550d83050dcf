"""SHA-256, the one content hash of the package: image ids, weights and saved-head checksums."""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stream_sha256(fh) -> str:
    """SHA-256 of an open binary file, read from its current position to the end."""
    return hashlib.file_digest(fh, "sha256").hexdigest()


@lru_cache(maxsize=32)
def _memo_sha256(path: str, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as fh:
        return stream_sha256(fh)


def file_sha256(path: str | os.PathLike, memo: bool = False) -> str:
    """SHA-256 of a file. `memo=True` remembers it by (path, size, mtime), for large files hashed
    often (weights); leave it off where a file may be rewritten within the clock's resolution."""
    if memo:
        stat = os.stat(path)
        return _memo_sha256(str(Path(path)), stat.st_size, stat.st_mtime_ns)
    with open(path, "rb") as fh:
        return stream_sha256(fh)
