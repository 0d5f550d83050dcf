"""The skip list: every file a command skipped, with its reason, as `path,reason` CSV rows."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from pipeline.core.io import atomic_write, make_folder
from pipeline.core.paths import path_text


def write_skip_list(path: str | os.PathLike, skipped: list[tuple[str, str]]) -> None:
    """`path,reason` rows of the files an extraction skipped, written whole or not at all (an
    `OutputError` naming the file if it cannot be); names as `path_text` writes them (`bad\\xe9.jpg` for
    a name that is not valid UTF-8)."""
    path = Path(path)
    make_folder(path.parent)
    with atomic_write(path, newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "reason"])
        writer.writerows([path_text(name), path_text(reason)] for name, reason in skipped)
