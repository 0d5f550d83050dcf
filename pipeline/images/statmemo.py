"""The stat memo: content ids remembered by what `stat` says of a file, so an unchanged file is never opened.

One SQLite table (WAL mode) per feature cache, `CACHE/stat-memo.sqlite`: (folder, name) -> size,
mtime_ns, inode, device, content id, and a check over all of these. A file whose stat matches its row
has that id without being read; any difference (rewritten, touched, replaced by a rename, moved to
another disk) reads and hashes it again. It is a cache of the cache: deleting it costs one full read
on the next run, and a memo that is not a database, fails SQLite's check, or holds a row whose check
does not match is rebuilt or re-hashed, never trusted. Writes happen in the process that scans (the
batch client, not Dask workers), inside short transactions; WAL and a busy timeout let several
processes share one memo.

Rows of deleted files are pruned, at next to no cost on an unchanged run. The range query that looks
up a folder's files a block at a time also meets the rows in that range that were not asked for (in a
folder scanned in order: files deleted since); once the scan of a folder tree has completed, `prune`
adds each folder's rows outside the ranges asked about and every row of a folder never asked about
(one index search per folder), and deletes those whose file no longer exists. Rows under entries the
scan could not read (an unreadable folder, a link to a disk that is not mounted) stay. A run that
stops before its scan ends prunes nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import struct
import time
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

from pipeline.core.errors import first_line
from pipeline.images.data import Dataset, FileStat, hash_file, map_files

logger = logging.getLogger(__name__)

MEMO_NAME = "stat-memo.sqlite"
BLOCK = 4096  # files identified at a time (one memo query per folder and block)
_SCHEMA = 2  # 2: CRC-32 row checks (1 held SHA-256 text)
_STAT = struct.Struct("<qqQQ")  # size, mtime_ns, inode, device
_BUSY_TIMEOUT_S = 60.0
_SETTLE_NS = 2 * 10**9  # a file modified this recently is hashed but not remembered (see `_remember`)
_CREATE = """CREATE TABLE IF NOT EXISTS memo (
    dir BLOB NOT NULL, name BLOB NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    ino INTEGER NOT NULL, dev INTEGER NOT NULL, id TEXT NOT NULL, checksum INTEGER NOT NULL,
    PRIMARY KEY (dir, name)) WITHOUT ROWID"""
# The first folder after a given one, up to a bound: one index search (a tree's folders: "top/" to "top0").
_NEXT_FOLDER = "SELECT dir FROM memo WHERE dir > ? AND dir < ? ORDER BY dir LIMIT 1"


def _checksum(folder: bytes, name: bytes, stat: FileStat, image_id: str) -> int:
    """A bit flipped anywhere in a row (its id above all) fails this CRC-32, and the file is read again.
    It guards against damage, not against someone who can write the cache (and so every record too)."""
    return zlib.crc32(b"\0".join([folder, name, _STAT.pack(*stat), image_id.encode()]))


def _busy(exc: sqlite3.Error) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED (any extended code): another connection holds the lock for now."""
    return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in (5, 6)


def _encoded(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")  # os.fsencode, faster


def memo_path(cache_dir: str | os.PathLike) -> Path | None:
    """The cache's stat memo, its folder created if need be; None where it cannot be (a read-only place)."""
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError:
        return None
    return Path(cache_dir) / MEMO_NAME


def _files(paths: list[tuple[str, FileStat]]) -> dict[bytes, list[tuple[int, bytes]]]:
    """Positions in `paths` by folder, with the file's name, as the memo keys them (bytes: any name)."""
    folders: dict[bytes, list[tuple[int, bytes]]] = {}
    for i, (path, _stat) in enumerate(paths):
        folder, _, name = _encoded(path).rpartition(b"/")
        folders.setdefault(folder, []).append((i, name))
    return folders


def _under(row: tuple[bytes, bytes], spare: set[bytes]) -> bool:
    """Whether the file of a memo row (folder, name) is one of `spare` or lies under one of them."""
    folder, name = row
    if folder + b"/" + name in spare:
        return True
    while folder:
        if folder in spare:
            return True
        folder = folder.rpartition(b"/")[0]
    return False


class StatMemo:
    """Content ids of files by their stat; `ids` returns them, reading only files that are new or changed.

    `path=None` keeps no memo (every file is read); `rehash=True` reads every file, and rewrites its row."""

    def __init__(self, path: str | os.PathLike | None, rehash: bool = False,
                 hasher: Callable[[Path], str] = hash_file) -> None:
        self.path = Path(path) if path is not None else None
        self.rehash = rehash
        self.hasher = hasher
        self.hits = self.hashed = 0
        # For `prune`: per folder, the name ranges `ids` asked about; rows in them it was not asked for.
        self.ranges: dict[bytes, list[tuple[bytes, bytes]]] = {}
        self.unasked: set[tuple[bytes, bytes]] = set()
        self.started_ns = time.time_ns()
        self.db = self._open()

    def _open(self) -> sqlite3.Connection | None:
        """The memo's database, created if needed; one that is damaged is deleted and made anew. Without
        a usable file (a read-only cache, a full disk) there is no memo, and every file is hashed, as
        before: a note, not a warning (the run's `files read` says it), and the file is left as it is."""
        if self.path is None:
            return None
        damaged = False
        deadline = time.monotonic() + _BUSY_TIMEOUT_S
        while True:
            try:
                db = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
            except sqlite3.Error as exc:
                logger.info(f"no stat memo ({self.path}: {first_line(exc)}); every file is read")
                return None
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute(_CREATE)
                if db.execute("PRAGMA user_version").fetchone()[0] not in (0, _SCHEMA):
                    raise sqlite3.DatabaseError("written by another version")
                if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                    raise sqlite3.DatabaseError("failed its integrity check")
                db.execute(f"PRAGMA user_version={_SCHEMA}")
                return db
            except sqlite3.DatabaseError as exc:
                db.close()
                if _busy(exc) and time.monotonic() < deadline:
                    # another process is creating the memo or switching it to WAL: SQLite reports some of those
                    # lock conflicts at once, without waiting out the busy timeout
                    time.sleep(0.05)
                    continue
                if isinstance(exc, sqlite3.OperationalError):  # read-only, a full disk, busy: not damage, kept
                    logger.info(f"no stat memo ({self.path}: {first_line(exc)}); every file is read")
                    return None
                if damaged:
                    logger.warning(f"warning: no stat memo ({self.path}: {first_line(exc)}); every file is read")
                    return None
                logger.warning(f"warning: the stat memo {self.path} is damaged ({first_line(exc)}); rebuilt")
                self.delete()
                damaged = True

    def delete(self) -> None:
        """Remove the memo's files (it is rebuilt as files are hashed)."""
        assert self.path is not None
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self.path}{suffix}")

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None

    def __enter__(self) -> StatMemo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _known(self, folder: bytes, names: list[bytes]) -> dict[bytes, tuple[FileStat, str]]:
        """The rows of `names` in `folder` whose check passes (none with `rehash`): one range query per
        folder and batch. The range is noted, and so is every row in it that is not one of `names` (for
        `prune`: in a folder scanned in order, a file deleted since)."""
        if self.db is None:
            return {}
        low, high = min(names), max(names)
        self.ranges.setdefault(folder, []).append((low, high))
        rows = self.db.execute("SELECT name, size, mtime_ns, ino, dev, id, checksum FROM memo "
                               "WHERE dir = ? AND name BETWEEN ? AND ?", (folder, low, high))
        wanted = set(names)
        known = {}
        for name, size, mtime_ns, ino, dev, image_id, check in rows:
            if name not in wanted:
                self.unasked.add((folder, name))
                continue
            stat = FileStat(size, mtime_ns, ino, dev)
            if not self.rehash and check == _checksum(folder, name, stat, image_id):
                known[name] = (stat, image_id)
        return known

    def ids(self, paths: list[tuple[str, FileStat]], workers: int = 4) -> list[str | None]:
        """Content ids of `paths` (absolute, each with the stat a scan just took), in order; None where a
        file cannot be read. Files whose stat matches the memo are not opened."""
        ids: list[str | None] = [None] * len(paths)
        todo: list[tuple[int, bytes, bytes]] = []
        for folder, entries in _files(paths).items():
            known = self._known(folder, [name for _i, name in entries])
            for i, name in entries:
                row = known.get(name)
                if row is not None and row[0] == paths[i][1]:
                    ids[i] = row[1]
                else:
                    todo.append((i, folder, name))
        self.hits += len(paths) - len(todo)
        self.hashed += len(todo)

        def one(i: int) -> str | None:
            try:
                return self.hasher(Path(paths[i][0]))
            except OSError:
                return None

        for (i, _folder, _name), image_id in zip(todo, map_files(one, [t[0] for t in todo], workers), strict=True):
            ids[i] = image_id
        self._remember([(folder, name, paths[i][1], ids[i]) for i, folder, name in todo if ids[i] is not None])
        return ids

    def prune(self, folders: Iterable[str], spared: Iterable[str] = ()) -> int:
        """Delete the rows of files under `folders` (absolute, normalised) that no longer exist: call it
        once `ids` has seen every file of those folder trees. The rows looked at are those `ids` met
        without being asked for them, those of each folder outside the name ranges `ids` asked about,
        and every row of a folder it never asked about; each is deleted if its file is gone, unless it
        lies under `spared` (what the scan could not read: a folder, a link to one). An unchanged run
        costs one index search per folder. Returns the number of rows deleted."""
        if self.db is None:
            return 0
        tops = [_encoded(folder).rstrip(b"/") for folder in folders]
        rows = {(folder, name) for folder, name in self.unasked
                if any(folder == top or folder.startswith(top + b"/") for top in tops)}
        for top in tops:
            rows.update(self._outside(top))
            below = top + b"/"
            while found := self.db.execute(_NEXT_FOLDER, (below, top + b"0")).fetchone():  # "0" follows "/"
                below = found[0]
                rows.update(self._outside(below))
        spare = {_encoded(path) for path in spared}
        stale = [row for row in rows if not os.path.lexists(row[0] + b"/" + row[1]) and not _under(row, spare)]
        if stale:
            try:
                with self.db:
                    self.db.execute("BEGIN IMMEDIATE")
                    self.db.executemany("DELETE FROM memo WHERE dir = ? AND name = ?", stale)
            except sqlite3.Error as exc:  # they are pruned on a later run
                logger.warning(f"warning: the stat memo {self.path} was not pruned ({first_line(exc)})")
                return 0
        return len(stale)

    def _outside(self, folder: bytes) -> set[tuple[bytes, bytes]]:
        """The rows of `folder` outside the name ranges `ids` asked about (all of them if none)."""
        assert self.db is not None
        bounds: list[bytes | None] = [None]  # gaps between the ranges, merged, as (after, before) pairs
        for low, high in sorted(self.ranges.get(folder, [])):
            if bounds[-1] is None or low > bounds[-1]:
                bounds += [low, high]
            else:
                bounds[-1] = max(bounds[-1], high)
        bounds.append(None)
        rows = set()
        for after, before in zip(bounds[::2], bounds[1::2], strict=True):
            query = "SELECT name FROM memo WHERE dir = ?" + (" AND name > ?" if after is not None else "") + \
                (" AND name < ?" if before is not None else "")
            rows.update((folder, name) for (name,) in self.db.execute(
                query, [folder, *(b for b in (after, before) if b is not None)]))
        return rows

    def _remember(self, rows: list[tuple[bytes, bytes, FileStat, str]]) -> None:
        """Store new ids; the stat is the one taken before the file was read, so a file written while it
        was hashed has a row that no longer matches, and is read again next time. A file modified in the
        last two seconds is not remembered: the file system's clock ticks coarsely, and a rewrite of the
        same size within the same tick would leave its stat as it was."""
        rows = [row for row in rows if row[2].mtime_ns < self.started_ns - _SETTLE_NS]
        if self.db is None or not rows:
            return
        try:
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                self.db.executemany("INSERT OR REPLACE INTO memo VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                    [(folder, name, *stat, image_id, _checksum(folder, name, stat, image_id))
                                     for folder, name, stat, image_id in rows])
        except sqlite3.Error as exc:  # a full disk, say: the ids are right, only the next run reads again
            logger.warning(f"warning: the stat memo {self.path} was not updated ({first_line(exc)})")


def dataset_ids(dataset: Dataset, cache_dir: str | os.PathLike, rehash: bool = False) -> tuple[list[str | None], int]:
    """Content ids of a scanned dataset's files (None: unreadable) through the cache's stat memo, and how
    many files were read to hash them; a scanned folder's rows of files it no longer holds are pruned."""
    ids: list[str | None] = []
    with StatMemo(memo_path(cache_dir), rehash) as memo:
        for start in range(0, len(dataset.paths), BLOCK):
            block: list[tuple[str, FileStat]] = []
            places: list[int] = []  # where each of `block` goes in this block's ids
            paths = dataset.paths[start:start + BLOCK]
            for i, path in enumerate(paths):
                try:
                    block.append((os.path.abspath(path), FileStat.of(os.stat(path))))
                    places.append(i)
                except OSError:
                    continue
            found: list[str | None] = [None] * len(paths)
            for i, image_id in zip(places, memo.ids(block), strict=True):
                found[i] = image_id
            ids += found
        if dataset.source is not None and dataset.source.is_dir():
            memo.prune([os.path.abspath(dataset.source)], [os.path.abspath(path) for path, _why in dataset.skipped])
        return ids, memo.hashed
