"""The index of one cache key: content id -> (shard, row), so finding rows does not read every record.

`CACHE/<key>/index.sqlite` (SQLite, WAL) holds, for each completion record, the record file's stat
(size, mtime_ns, inode), whether its array is on disk, and the fields a read needs (array, rows, dim,
SHA-256); and one row per image id of each trusted record. The records stay the source of truth: on
opening, the record files are listed and stat'ed, and only those that are new, replaced or gone since
the index last saw them are read (a missing index reads them all: it is rebuilt). A damaged index file
is deleted and rebuilt; one that cannot be written (a read-only cache) is built in memory. Each
process opens an index once and keeps it (`open_index`), so the chunks of a batch run share it.
`problems` compares the whole index with the records for `pipeline cache verify`; every read also
checks the rows it is given against the shard's record (`FeatureStore.read`), so an index that is wrong
can make a read fail, never return another image's features.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import first_line

logger = logging.getLogger(__name__)

INDEX_NAME = "index.sqlite"
_SCHEMA = 1
_BUSY_TIMEOUT_S = 60.0
_QUERY_IDS = 500  # ids per lookup query (SQLite's limit on parameters is higher on every build)
_TABLES = (
    """CREATE TABLE IF NOT EXISTS shards (shard TEXT PRIMARY KEY, signature TEXT NOT NULL, trusted INTEGER NOT NULL,
       present INTEGER NOT NULL, array TEXT, rows INTEGER, dim INTEGER, sha256 TEXT)""",
    "CREATE TABLE IF NOT EXISTS rows (id TEXT NOT NULL, shard TEXT NOT NULL, row INTEGER NOT NULL, "
    "PRIMARY KEY (id, shard)) WITHOUT ROWID",
)

ReadRecord = Callable[[Path], "tuple[dict | None, str | None]"]


@dataclass(frozen=True)
class ShardInfo:
    """What reading a shard needs from its record."""

    shard: str
    array: str
    rows: int
    dim: int
    sha256: str


def _signature(info: os.stat_result) -> str:
    """A record is replaced by a rename (a new inode) and never edited in place."""
    return f"{info.st_size}:{info.st_mtime_ns}:{info.st_ino}"


class CacheIndex:
    """The index of the store at `root`; `read_record(path)` is the store's trusted read of one record."""

    def __init__(self, root: Path, read_record: ReadRecord) -> None:
        self.root = Path(root)
        self.records_dir = self.root / "shards"
        self.arrays = self.root / "features.zarr"
        self.path = self.root / INDEX_NAME
        self.read_record = read_record
        self.lock = threading.Lock()
        self.db = self._open()

    # ----------------------------------------------------------------- the file

    def _connect(self, target: str) -> sqlite3.Connection:
        db = sqlite3.connect(target, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        try:
            if target != ":memory:":
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
            for table in _TABLES:
                db.execute(table)
            if db.execute("PRAGMA user_version").fetchone()[0] not in (0, _SCHEMA) or \
                    db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("failed its integrity check")
            db.execute(f"PRAGMA user_version={_SCHEMA}")
        except sqlite3.Error:
            db.close()
            raise
        return db

    def _open(self) -> sqlite3.Connection:
        """The index file, rebuilt if damaged; in memory when the cache cannot be written."""
        for attempt in range(2):
            try:
                return self._connect(str(self.path))
            except sqlite3.DatabaseError as exc:
                readonly = isinstance(exc, sqlite3.OperationalError)
                if readonly or attempt:
                    logger.info(f"cache index {self.path} cannot be written ({first_line(exc)}); kept in memory")
                    break
                logger.warning(f"warning: the cache index {self.path} is damaged ({first_line(exc)}); rebuilt")
                self.delete()
        return self._connect(":memory:")

    def delete(self) -> None:
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self.path}{suffix}")

    def close(self) -> None:
        self.db.close()

    # ----------------------------------------------------------------- keeping it current

    def _on_disk(self) -> dict[str, str]:
        """Record files by shard id, with their signature."""
        found = {}
        with contextlib.suppress(FileNotFoundError), os.scandir(self.records_dir) as listing:
            for entry in listing:
                if entry.name.endswith(".json") and not entry.name.startswith("."):
                    with contextlib.suppress(FileNotFoundError):
                        found[entry.name[:-5]] = _signature(entry.stat())
        return found

    def _changes(self) -> tuple[dict[str, str], list[str], dict[str, int]]:
        """(records to read: shard -> signature, shards indexed before whose record is gone or replaced,
        shards whose array came or went)."""
        on_disk = self._on_disk()
        indexed = {shard: (signature, array, present) for shard, signature, array, present
                   in self.db.execute("SELECT shard, signature, array, present FROM shards")}
        to_read = {shard: sig for shard, sig in on_disk.items() if indexed.get(shard, (None,))[0] != sig}
        gone = [shard for shard in indexed if shard not in on_disk or shard in to_read]
        flipped = {}
        for shard, (_sig, array, present) in indexed.items():
            if array is not None and shard in on_disk and shard not in to_read:
                now = int((self.arrays / array / "zarr.json").is_file())
                if now != present:
                    flipped[shard] = now
        return to_read, gone, flipped

    def refresh(self) -> None:
        """Bring the index up to date with the records: read only the new, replaced or removed ones."""
        with self.lock:
            if not any(self._changes()):
                return
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")  # another process may have brought it up to date meanwhile
                to_read, gone, flipped = self._changes()
                for shard in gone:
                    self.db.execute("DELETE FROM shards WHERE shard = ?", (shard,))
                    self.db.execute("DELETE FROM rows WHERE shard = ?", (shard,))
                for shard, present in flipped.items():
                    self.db.execute("UPDATE shards SET present = ? WHERE shard = ?", (present, shard))
                for shard, signature in to_read.items():
                    self._add(shard, signature)

    def _add(self, shard: str, signature: str) -> None:
        record, _problem = self.read_record(self.records_dir / f"{shard}.json")
        if record is None:  # untrusted: remembered as such, read again only when the file changes
            self.db.execute("INSERT INTO shards VALUES (?, ?, 0, 0, NULL, NULL, NULL, NULL)", (shard, signature))
            return
        present = int((self.arrays / record["array"] / "zarr.json").is_file())
        self.db.execute("INSERT INTO shards VALUES (?, ?, 1, ?, ?, ?, ?, ?)",
                        (shard, signature, present, record["array"], record["rows"], record["dim"], record["sha256"]))
        self.db.executemany("INSERT OR IGNORE INTO rows VALUES (?, ?, ?)",
                            ((image_id, shard, row) for row, image_id in enumerate(record["image_ids"])))

    # ----------------------------------------------------------------- questions

    def locate(self, image_ids: Iterable[str]) -> dict[str, tuple[str, int]]:
        """(shard, row) of each of `image_ids` the cache holds (a shard whose array is on disk); an id in
        several shards (two runs that raced) is read from the first shard by name, as the records sort."""
        self.refresh()
        wanted = list(dict.fromkeys(image_ids))
        found: dict[str, tuple[str, int]] = {}
        with self.lock:
            for start in range(0, len(wanted), _QUERY_IDS):
                part = wanted[start:start + _QUERY_IDS]
                rows = self.db.execute(
                    "SELECT r.id, r.shard, r.row FROM rows r JOIN shards s ON s.shard = r.shard "
                    f"WHERE s.present = 1 AND r.id IN ({','.join('?' * len(part))}) ORDER BY r.shard", part)
                for image_id, shard, row in rows:
                    found.setdefault(image_id, (shard, row))
        return found

    def shards(self, names: Iterable[str]) -> dict[str, ShardInfo]:
        with self.lock:
            return {name: ShardInfo(name, *row) for name in names for row in self.db.execute(
                "SELECT array, rows, dim, sha256 FROM shards WHERE shard = ? AND trusted = 1", (name,))}

    def everything(self) -> dict[str, tuple[str, int]]:
        """Every image id the cache holds -> (shard, row)."""
        self.refresh()
        found: dict[str, tuple[str, int]] = {}
        with self.lock:
            for image_id, shard, row in self.db.execute(
                    "SELECT r.id, r.shard, r.row FROM rows r JOIN shards s ON s.shard = r.shard "
                    "WHERE s.present = 1 ORDER BY r.shard"):
                found.setdefault(image_id, (shard, row))
        return found

    def problems(self, records: dict[str, dict]) -> list[str]:
        """Where the index, once brought up to date, disagrees with the trusted `records` (by shard id):
        only an index changed by something other than this code does."""
        self.refresh()
        with self.lock:
            indexed = {shard: (array, rows, dim, sha) for shard, array, rows, dim, sha in self.db.execute(
                "SELECT shard, array, rows, dim, sha256 FROM shards WHERE trusted = 1")}
            wrong = {shard for shard, record in records.items()
                     if indexed.get(shard) != (record["array"], record["rows"], record["dim"], record["sha256"])}
            wrong |= indexed.keys() - records.keys()
            rows: dict[str, list[tuple[int, str]]] = {}
            for image_id, shard, row in self.db.execute("SELECT id, shard, row FROM rows"):
                rows.setdefault(shard, []).append((row, image_id))
        for shard, record in records.items():
            if sorted(rows.pop(shard, [])) != list(enumerate(record["image_ids"])):
                wrong.add(shard)
        wrong |= rows.keys()
        return [f"index {INDEX_NAME} disagrees with the completion record of shard {shard} "
                "(`pipeline cache gc` rebuilds the index)" for shard in sorted(wrong)]


_OPEN: dict[Path, CacheIndex] = {}
_OPEN_LOCK = threading.Lock()


def open_index(root: Path, read_record: ReadRecord) -> CacheIndex:
    """The index of the store at `root`, opened once per process and kept for later calls."""
    root = Path(root).absolute()
    with _OPEN_LOCK:
        index = _OPEN.get(root)
        if index is None or not index.path.parent.is_dir():
            index = _OPEN[root] = CacheIndex(root, read_record)
        return index


def forget_index(root: Path) -> None:
    """Close and delete the index of `root` (gc, after it was found inconsistent): the next open rebuilds it."""
    root = Path(root).absolute()
    with _OPEN_LOCK:
        index = _OPEN.pop(root, None)
    if index is not None:
        index.close()
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{root / INDEX_NAME}{suffix}")
