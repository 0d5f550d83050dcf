"""The on-disk feature cache: one folder per cache key, one zarr array per shard.

Layout of `CACHE/<key>/`:
    meta.json                     what produced these numbers (backbone, weights SHA-256, preprocessing,
                                  layer, precision, dimension)
    features.zarr/<shard>-<tag>   a (rows, dim) float32 zarr v3 array; attribute `image_ids` names the rows
    shards/<shard>.json           the completion record, written last: rows, ids, SHA-256 of the data

A shard is present only when its record exists (and names an array that is there); its data is checked
against the record's checksum whenever it is read: zarr reads a chunk that was never written as zeros
without complaint, so the array alone proves nothing. Arrays are
written in `CACHE/.staging/` and renamed into place, then the record is replaced atomically, so a run
killed at any moment leaves whole shards only, and a task that runs twice just leaves an orphan for `gc`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.core.errors import CacheError
from pipeline.core.hashing import bytes_sha256
from pipeline.core.io import fsync_dir, write_json_atomic
from pipeline.images.data import DECODER

if TYPE_CHECKING:
    import dask.array as da

FORMAT_VERSION = 1
_STAGING = ".staging"
_ORPHAN_GRACE_S = 3600  # gc leaves younger unrecorded arrays alone: a running task may be committing them
_ARRAY_NAME = re.compile(r"[0-9a-f]{16}-[0-9a-f]{8}")


@dataclass(frozen=True)
class CacheKey:
    """Everything that changes the numbers; two runs share rows only when all of it matches."""

    backbone: str
    weights_sha256: str
    preprocess: dict
    layer: str
    precision: str
    dim: int
    module: str = ""  # the tapped module inside the network, in case a layer name is ever remapped
    decoder: str = DECODER

    @property
    def digest(self) -> str:
        text = json.dumps({**asdict(self), "format": FORMAT_VERSION}, sort_keys=True)
        return bytes_sha256(text.encode())[:16]

    @property
    def dirname(self) -> str:
        return f"{self.backbone}-{self.layer}-{self.precision}-{self.digest}"


def array_sha256(array: np.ndarray) -> str:
    return bytes_sha256(np.ascontiguousarray(array, dtype="<f4").tobytes())


def _valid_record(shard: str, record: object) -> bool:
    """A record is trusted only if every field has the right type and they agree with each other;
    the array name must be one this code writes, so a tampered record cannot point gc elsewhere."""
    if not isinstance(record, dict):
        return False
    ids, rows = record.get("image_ids"), record.get("rows")
    return (isinstance(record.get("array"), str) and _ARRAY_NAME.fullmatch(record["array"]) is not None
            and record["array"].startswith(shard) and isinstance(rows, int) and isinstance(record.get("dim"), int)
            and isinstance(record.get("sha256"), str) and isinstance(ids, list) and len(ids) == rows
            and all(isinstance(i, str) for i in ids))


def _fsync_tree(root: Path) -> None:
    for folder, _dirs, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as fh:
                os.fsync(fh.fileno())


def _tree_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _load_array(path: Path, record: dict) -> np.ndarray:
    """Read one shard and prove it is the one the record describes."""
    try:
        import zarr

        data = zarr.open_array(store=str(path), mode="r")[:]
    except Exception as exc:  # zarr/numcodecs raise many types for damaged files
        raise CacheError(f"shard {path} is unreadable ({type(exc).__name__}: {exc}); "
                         "run `pipeline cache verify` then `pipeline cache gc`") from exc
    if data.shape != (record["rows"], record["dim"]) or array_sha256(data) != record["sha256"]:
        raise CacheError(f"shard {path} does not match its completion record (changed or truncated "
                         "since written); run `pipeline cache gc` to drop it, the next run recomputes it")
    return data


class FeatureStore:
    """The shards of one cache key."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.arrays = self.root / "features.zarr"
        self.records_dir = self.root / "shards"

    @classmethod
    def create(cls, cache_dir: str | os.PathLike, key: CacheKey, provenance: dict | None = None) -> FeatureStore:
        """Open the store of `key`, creating it if needed (safe when several processes race)."""
        store = cls(Path(cache_dir) / key.dirname)
        try:
            store.records_dir.mkdir(parents=True, exist_ok=True)
            if not (store.arrays / "zarr.json").exists():
                import zarr

                zarr.open_group(store=str(store.arrays), mode="a")
            if not (store.root / "meta.json").exists():
                write_json_atomic(store.root / "meta.json", {**asdict(key), "key": key.dirname,
                                                              "format": FORMAT_VERSION, **(provenance or {})})
        except OSError as exc:
            raise CacheError(f"cannot write the feature cache in {cache_dir}: {exc.strerror or exc}") from None
        return store

    @classmethod
    def all_in(cls, cache_dir: str | os.PathLike) -> list[FeatureStore]:
        cache_dir = Path(cache_dir)
        if not cache_dir.is_dir():
            raise CacheError(f"cache folder not found: {cache_dir}")
        return [cls(p.parent) for p in sorted(cache_dir.glob("*/meta.json"))]

    @property
    def meta(self) -> dict:
        try:
            return json.loads((self.root / "meta.json").read_text())
        except (OSError, ValueError) as exc:
            raise CacheError(f"{self.root / 'meta.json'} is unreadable: {exc}") from exc

    def _read_record(self, path: Path) -> dict | None:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return record if _valid_record(path.stem, record) else None

    def _scan(self) -> tuple[dict[str, dict], list[Path]]:
        """One pass over the records: (valid records by shard id, record files that are not valid)."""
        records, unreadable = {}, []
        for path in sorted(self.records_dir.glob("*.json")):
            record = self._read_record(path)
            if record is None:
                unreadable.append(path)
            else:
                records[path.stem] = record
        return records, unreadable

    def records(self) -> dict[str, dict]:
        """Completion records by shard id; a damaged record counts as absent (its shard is redone)."""
        return self._scan()[0]

    def _index_of(self, records: dict[str, dict]) -> dict[str, tuple[str, int]]:
        index: dict[str, tuple[str, int]] = {}
        for shard, record in records.items():
            if (self.arrays / record["array"] / "zarr.json").is_file():  # a deleted array is redone
                for row, image_id in enumerate(record["image_ids"]):
                    index.setdefault(image_id, (shard, row))
        return index

    def index(self) -> dict[str, tuple[str, int]]:
        """image id -> (shard id, row) over all committed shards whose array is on disk."""
        return self._index_of(self.records())

    def write_shard(self, shard: str, image_ids: list[str], features: np.ndarray, seconds: float | None = None) -> None:
        """Commit one shard atomically; a second commit of the same shard id is harmless.

        `seconds` is what computing these rows cost (decode and forward pass): `pipeline rank` reports
        each candidate's extraction speed from it without running the network again."""
        import zarr

        features = np.ascontiguousarray(features, dtype=np.float32)
        rows, dim = features.shape
        if rows != len(image_ids):
            raise ValueError(f"shard {shard}: {rows} feature rows for {len(image_ids)} image ids")
        array_name = f"{shard}-{uuid.uuid4().hex[:8]}"
        staging = self.root.parent / _STAGING / f"{self.root.name}-{array_name}"
        zarr.create_array(store=str(staging), data=features, chunks=(max(rows, 1), dim),
                          attributes={"image_ids": image_ids})
        _fsync_tree(staging)
        os.rename(staging, self.arrays / array_name)
        fsync_dir(self.arrays)
        write_json_atomic(self.records_dir / f"{shard}.json", {
            "array": array_name, "rows": rows, "dim": dim, "sha256": array_sha256(features),
            "image_ids": image_ids, "seconds": seconds})

    def read(self, image_ids: list[str]) -> da.Array:
        """Rows for `image_ids` in that order, as a lazy Dask array; each shard is checked when read."""
        import dask
        import dask.array as da

        records = self.records()
        index = self._index_of(records)
        missing = [i for i in image_ids if i not in index]
        if missing:
            raise CacheError(f"{len(missing)} images are not in cache {self.root.name} "
                             f"(first: {missing[0]}); run `pipeline extract` first")
        dim = self.meta["dim"]
        if not image_ids:
            return da.zeros((0, dim), dtype=np.float32)
        parts, offsets, total = [], {}, 0
        for shard in sorted({index[i][0] for i in image_ids}):
            record = records[shard]
            loaded = dask.delayed(_load_array, pure=True)(self.arrays / record["array"], record)
            parts.append(da.from_delayed(loaded, shape=(record["rows"], dim), dtype=np.float32))
            offsets[shard], total = total, total + record["rows"]
        positions = np.fromiter((offsets[index[i][0]] + index[i][1] for i in image_ids), dtype=np.int64,
                                count=len(image_ids))
        return da.concatenate(parts)[positions]

    def _damage(self) -> tuple[dict[str, tuple[dict, str]], list[Path]]:
        """(shard -> (record, why) for shards that fail their check, record files that are not valid)."""
        records, unreadable = self._scan()
        damaged = {}
        for shard, record in records.items():
            try:
                _load_array(self.arrays / record["array"], record)
            except CacheError as exc:
                damaged[shard] = (record, str(exc).split(";")[0])
        return damaged, unreadable

    def verify(self) -> list[str]:
        """One line per problem: a shard that changed, is truncated or unreadable, or a broken record."""
        damaged, unreadable = self._damage()
        return ([f"{self.root.name}: shard {shard}: {why}" for shard, (_record, why) in damaged.items()]
                + [f"{self.root.name}: shard {p.stem}: completion record is unreadable" for p in unreadable])

    def orphans(self, min_age_s: float = 0.0) -> list[Path]:
        """Arrays no record points to (a task that ran twice, or died between rename and record)."""
        if not self.arrays.is_dir():
            return []
        used = {r["array"] for r in self.records().values()}
        now = time.time()
        return [p for p in sorted(self.arrays.iterdir())
                if p.is_dir() and p.name not in used and now - p.stat().st_mtime >= min_age_s]

    def gc(self) -> list[str]:
        """Drop damaged shards (so the next run recomputes them) and old leftovers; return what went.

        Each record is read again just before it is removed, so a shard that a concurrent run has just
        committed again is left alone."""
        damaged, unreadable = self._damage()
        removed = []
        for shard, (record, _why) in damaged.items():
            path = self.records_dir / f"{shard}.json"
            if (self._read_record(path) or {}).get("array") == record["array"]:
                path.unlink(missing_ok=True)
                removed.append(f"{self.root.name}: damaged shard {shard}")
            shutil.rmtree(self.arrays / record["array"], ignore_errors=True)
        for path in unreadable:
            if self._read_record(path) is None:
                path.unlink(missing_ok=True)
                removed.append(f"{self.root.name}: unreadable record {path.stem}")
        for orphan in self.orphans(_ORPHAN_GRACE_S):
            shutil.rmtree(orphan, ignore_errors=True)
            removed.append(f"{self.root.name}: orphan array {orphan.name}")
        now = time.time()
        for tmp in self.records_dir.glob(".*.tmp"):  # a record write cut short by a kill
            if now - tmp.stat().st_mtime >= _ORPHAN_GRACE_S:
                tmp.unlink(missing_ok=True)
                removed.append(f"{self.root.name}: unfinished record {tmp.name}")
        return removed

    def summary(self) -> dict:
        meta = self.meta
        records = self.records()
        return {"key": self.root.name, "backbone": meta["backbone"], "layer": meta["layer"],
                "precision": meta["precision"], "dim": meta["dim"], "shards": len(records),
                "rows": sum(r["rows"] for r in records.values()), "bytes": _tree_size(self.root),
                "images_per_second": _images_per_second(records.values())}


def _images_per_second(records: Iterable[dict]) -> float | None:
    """Rows per second of extraction over the shards that recorded their cost (older ones did not)."""
    timed = [r for r in records if isinstance(r.get("seconds"), int | float) and r["seconds"] > 0]
    seconds = sum(r["seconds"] for r in timed)
    return sum(r["rows"] for r in timed) / seconds if timed else None


def clean_staging(cache_dir: str | os.PathLike, min_age_s: float = _ORPHAN_GRACE_S) -> list[str]:
    """Staging folders left by killed runs (never complete, never read)."""
    staging = Path(cache_dir) / _STAGING
    now = time.time()
    gone = []
    for path in sorted(staging.glob("*")) if staging.is_dir() else []:
        if now - path.stat().st_mtime >= min_age_s:
            shutil.rmtree(path, ignore_errors=True)
            gone.append(f"staging leftover {path.name}")
    return gone
