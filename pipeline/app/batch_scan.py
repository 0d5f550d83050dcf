"""What a batch run finds in its inputs, and the content id of each file, read through the stat memo.

Folders are walked as a stream (`iter_files`: `os.scandir`, one sorted list of names per folder on the
current path), files are identified a block at a time, and only the paths and ids are kept: at a million
files, memory holds about a million short strings, not a million `Path` and `stat` objects.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from pipeline.images.data import FileStat, iter_files, scan
from pipeline.images.statmemo import BLOCK, StatMemo, memo_path


@dataclass
class Inputs:
    """Every usable file of a config's inputs, in order, with its content id (None: unreadable)."""

    paths: list[str] = field(default_factory=list)  # absolute, normalised
    ids: list[str | None] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # path -> why it is not used
    opened: int = 0  # files read to hash them (new or changed since the memo saw them)


def _found(inputs: list[Path], skipped: dict[str, str]) -> Iterator[tuple[str, FileStat]]:
    """Every visible file under each folder (recursively, links to folders followed; hidden files and
    folders, such as uploads in progress, are left alone) and every path of each list file, once each.
    Paths are absolute and normalised (`os.path.abspath`: `configs/../incoming` is `incoming`, a
    symlinked folder keeps its name), so the same file has the same path whatever the config says."""
    seen: set[str] = set()

    def skip(path: str, reason: str) -> None:
        skipped.setdefault(os.path.abspath(path), reason)

    for source in inputs:
        if source.is_dir():  # absolute and normalised already
            found: Iterator[tuple[str, FileStat | None]] = iter_files(os.path.abspath(source), skip)
        else:
            listed = scan(source, allow_empty_list=True)
            for path, reason in listed.skipped:
                skip(path, reason)
            found = ((os.path.abspath(path), None) for path in listed.paths)
        for text, stat in found:
            if text in seen:
                continue
            if stat is None:  # a listed file: scan() checked it is one, its stat is taken now
                try:
                    stat = FileStat.of(os.stat(text))
                except OSError as exc:
                    skip(text, f"unreadable: {exc.strerror or exc}")
                    continue
            seen.add(text)
            yield text, stat


def identify(inputs: list[Path], cache_dir: str | os.PathLike, rehash: bool = False,
             on_progress: Callable[[int, bool], None] | None = None) -> Inputs:
    """Scan `inputs` and identify every file by content, opening only those the cache's stat memo has
    not seen as they are now (every file with `rehash`). `on_progress(files, done)` hears the running
    count when the scan starts, after each block, and once more with `done` at the end. Once the scan
    is complete, the memo forgets the files under each input folder that it did not find (deleted)."""
    result = Inputs()
    if on_progress:
        on_progress(0, False)
    stream = _found(inputs, result.skipped)
    with StatMemo(memo_path(cache_dir), rehash) as memo:
        while block := list(islice(stream, BLOCK)):
            result.paths += [path for path, _stat in block]
            result.ids += memo.ids(block)
            if on_progress:
                on_progress(len(result.paths), False)
        memo.prune([os.path.abspath(source) for source in inputs if source.is_dir()], result.skipped)
        result.opened = memo.hashed
    if on_progress:
        on_progress(len(result.paths), True)
    return result
