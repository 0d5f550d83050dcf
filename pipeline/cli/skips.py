"""The one summary of skipped files that every command prints, and where its full list goes."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from pipeline.core.paths import path_text

SHOWN = 10  # skipped files printed with their reasons; the rest are counted


def print_skips(skipped: Sequence[tuple[str, str]], count: int | None = None,
                full_list: str | os.PathLike | None = None, hint: str = "") -> None:
    """The first ten skipped files with their reasons, then "... and N more", then where the full list
    is. `count` when `skipped` holds only the first few (batch's log line keeps 20); `hint` says how
    to get the full list where the command writes none. Names are written by `path_text`."""
    count = len(skipped) if count is None else count
    for path, reason in skipped[:SHOWN]:
        print(f"skipped {path_text(path)}: {path_text(reason)}")
    if count > SHOWN:
        print(f"... and {count - SHOWN} more" + (f" ({hint})" if hint and not full_list else ""))
    if count and full_list:
        print(f"full list, with reasons: {path_text(full_list)}")


def skip_list_beside(out: str | os.PathLike) -> Path:
    """Where a command that writes `out` (predict's CSV) puts its skip list: `NAME.skipped.csv` beside it."""
    out = Path(out)
    return out.with_name(f"{out.stem}.skipped.csv")


def report_skips(skipped: Sequence[tuple[str, str]], full_list: str | os.PathLike | None = None) -> None:
    """Print the summary of `skipped`, first writing the full list to `full_list` (a command's --skipped
    FILE, or its default) when there is one; without one, the summary says how to get it."""
    from pipeline.app.skiplist import write_skip_list

    if full_list is not None:
        write_skip_list(full_list, list(skipped))
    print_skips(skipped, full_list=full_list, hint="--skipped FILE lists them all")
