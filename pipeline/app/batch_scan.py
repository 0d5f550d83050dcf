"""What a batch run finds in its inputs, and the content id of each file, read through the stat memo.

Folders are walked as a stream (`iter_files`: `os.scandir`, one sorted list of names per folder on the
current path) and files are identified a block at a time: `Scan` hands each block of paths and ids to
its reader and keeps none of them, so what a run holds per file is up to the reader (a batch rerun
keeps nothing of a file already predicted). Only a path met again in a later input is remembered, for
inputs that overlap (a folder, or a list file, followed by others).
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
    seen: set[str] = set()  # paths a later input may list again (a folder's paths are distinct)

    def skip(path: str, reason: str) -> None:
        skipped.setdefault(os.path.abspath(path), reason)

    for number, source in enumerate(inputs, 1):
        remember = number < len(inputs) or not source.is_dir()
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
            if remember:
                seen.add(text)
            yield text, stat


class Scan:
    """Iterating over a `Scan` identifies every file of `inputs` by content, one block of paths and ids
    (None: unreadable) at a time, opening only the files the cache's stat memo has not seen as they are
    now (every file with `rehash`). `skipped` (path -> why it is not used), `files` and `opened` (read to
    hash them: new or changed since the memo saw them) grow as it goes. `on_progress(files, done)` hears
    the running count when the scan starts, after each block, and once more with `done` at the end.
    Once the scan is complete, the memo forgets the files under each input folder that it did not find."""

    def __init__(self, inputs: list[Path], cache_dir: str | os.PathLike, rehash: bool = False,
                 on_progress: Callable[[int, bool], None] | None = None) -> None:
        self.inputs, self.cache_dir, self.rehash, self.on_progress = inputs, cache_dir, rehash, on_progress
        self.skipped: dict[str, str] = {}
        self.files = self.opened = 0

    def __iter__(self) -> Iterator[tuple[list[str], list[str | None]]]:
        if self.on_progress:
            self.on_progress(0, False)
        stream = _found(self.inputs, self.skipped)
        with StatMemo(memo_path(self.cache_dir), self.rehash) as memo:
            while block := list(islice(stream, BLOCK)):
                ids = memo.ids(block)
                self.files += len(block)
                self.opened = memo.hashed
                yield [path for path, _stat in block], ids
                if self.on_progress:
                    self.on_progress(self.files, False)
            memo.prune([os.path.abspath(source) for source in self.inputs if source.is_dir()], self.skipped)
        if self.on_progress:
            self.on_progress(self.files, True)


def identify(inputs: list[Path], cache_dir: str | os.PathLike, rehash: bool = False,
             on_progress: Callable[[int, bool], None] | None = None) -> Inputs:
    """A whole `Scan` gathered: every file's path and id, in order (for tools and tests; a batch run
    streams the scan instead)."""
    whole = Scan(inputs, cache_dir, rehash, on_progress)
    result = Inputs(skipped=whole.skipped)
    for paths, ids in whole:
        result.paths += paths
        result.ids += ids
    result.opened = whole.opened
    return result
