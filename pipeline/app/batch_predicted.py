"""Which images a head has predicted already, read back from its run files, held as raw digests.

A batch run asks, for every file it scans, whether each head has predicted its content. At a million
files a Python set of id strings costs about 100 bytes per image; the ids are hex SHA-256 prefixes, so
`PredictedIds` keeps them as one sorted numpy array of their bytes (16 per image) and answers a block
of ids at once by binary search. Ids the run predicts itself are added to a small set.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np

from pipeline.images.data import ID_LENGTH

DIGEST = np.dtype(f"S{ID_LENGTH // 2}")  # an image id's bytes (numpy compares all of them, zeros included)
_ID = re.compile(f"[0-9a-f]{{{ID_LENGTH}}}")  # an id as `content_id` writes it: nothing else can match one
_ROWS = 65536  # rows converted at a time


def digests(ids: list[str]) -> np.ndarray:
    """The bytes of image ids as written by `content_id` (lowercase hex), as an array of `DIGEST`."""
    return np.array([bytes.fromhex(image_id) for image_id in ids], dtype=DIGEST)


class PredictedIds:
    """A set of image ids: sorted digests read back from earlier runs' files, and those this run adds."""

    def __init__(self, earlier: np.ndarray) -> None:
        self.earlier = earlier  # sorted, unique, of `DIGEST`
        self.added: set[str] = set()

    def by_earlier_runs(self, ids: np.ndarray) -> np.ndarray:
        """For each of `ids` (digests), whether an earlier run predicted it (a boolean array)."""
        if not len(self.earlier):
            return np.zeros(len(ids), dtype=bool)
        return self.earlier[np.minimum(np.searchsorted(self.earlier, ids), len(self.earlier) - 1)] == ids

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.added or bool(self.by_earlier_runs(digests([image_id]))[0])

    def add(self, image_id: str) -> None:
        self.added.add(image_id)


def _rows_at_most(path: Path) -> int:
    """An upper bound on the CSV rows of `path`: its line count, plus one for a last line without an end."""
    count = 1
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            count += chunk.count(b"\n")
    return count


def _column(header: list[str], name: str) -> int | None:
    """Where `csv.DictReader` takes column `name` from: its last occurrence in the header."""
    return len(header) - 1 - header[::-1].index(name) if name in header else None


def _read(path: Path, sha256: str, ids: np.ndarray, mine: np.ndarray, filled: int) -> int:
    """Append `path`'s rows to `ids` (their image ids' digests) and `mine` (whether the row's head SHA-256
    is `sha256`) from position `filled`; returns the new fill. A row whose id is not one `content_id`
    writes is left out: no image has it. Blank lines are not rows (as for `csv.DictReader`)."""
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None) or []
        id_at, sha_at = _column(header, "image_id"), _column(header, "head_sha256")
        if id_at is None:
            return filled
        batch: list[tuple[bytes, bool]] = []
        for row in reader:
            if len(row) > id_at and _ID.fullmatch(row[id_at]):
                batch.append((bytes.fromhex(row[id_at]), sha_at is not None and len(row) > sha_at
                              and row[sha_at] == sha256))
            if len(batch) == _ROWS:
                filled = _store(batch, ids, mine, filled)
        return _store(batch, ids, mine, filled)


def _store(batch: list[tuple[bytes, bool]], ids: np.ndarray, mine: np.ndarray, filled: int) -> int:
    end = filled + len(batch)
    if batch:
        ids[filled:end] = [digest for digest, _mine in batch]
        mine[filled:end] = [is_mine for _digest, is_mine in batch]
        batch.clear()
    return end


def predicted_ids(folder: Path, sha256: str) -> PredictedIds:
    """Image ids whose latest prediction under this head name came from this exact file. Run files sort
    by time, so a head refitted and then put back predicts again what the other version predicted.

    Memory: 16 bytes per row of the run files, plus what sorting needs when rows of another head file
    are among them (8 and 16 bytes per row more); rows all of this head (an unchanged head) sort in place."""
    paths = sorted(folder.glob("run-*.csv"))
    size = sum(_rows_at_most(path) for path in paths)
    ids, mine = np.empty(size, dtype=DIGEST), np.empty(size, dtype=bool)
    filled = 0
    for path in paths:  # oldest first: the last row of an id is its latest prediction
        filled = _read(path, sha256, ids, mine, filled)
    ids, mine = ids[:filled], mine[:filled]
    if not mine.any():
        return PredictedIds(np.empty(0, dtype=DIGEST))
    if mine.all():  # every row is of this head: which one is the latest does not matter
        ids.sort()
        repeated = ids[1:] == ids[:-1]
        return PredictedIds(ids[np.concatenate([[True], ~repeated])] if repeated.any() else ids)
    latest_first = ids[::-1]
    order = np.argsort(latest_first, kind="stable")  # each id's latest row comes first among its rows
    ordered = latest_first[order]
    first = np.concatenate([[True], ordered[1:] != ordered[:-1]])
    return PredictedIds(ordered[first & mine[::-1][order]])
