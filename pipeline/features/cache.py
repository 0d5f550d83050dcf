"""The on-disk feature cache: one folder per cache key, one zarr array per shard.

Layout of `CACHE/<key>/` (the folder's name ends in the key's digest):
    meta.json                     what produced these numbers (backbone, weights SHA-256, preprocessing,
                                  layer, precision, dimension); the key it describes must have the
                                  folder's digest, or the whole folder is unreadable
    features.zarr/<shard>-<tag>   a (rows, dim) float32 zarr v3 array; attribute `image_ids` names the rows
    shards/<shard>.json           the completion record, written last: rows, ids, SHA-256 of the data, and
                                  `checksum`, a SHA-256 over all of that and the key's digest
    index.sqlite                  image id -> (shard, row), derived from the records (`features/index.py`)

A shard is present only when its record exists, passes its checksum (so its ids are the ones written, in
the order written, for this key) and names an array that is there; its data is checked against the
record's SHA-256 whenever it is read: zarr reads a chunk that was never written as zeros without
complaint, so the array alone proves nothing. Records of the first format (no `checksum`: their ids
were not covered) are not trusted: the shard is computed again. A key folder is built in
`CACHE/.staging/` and renamed into place, so it never lacks its meta.json; arrays are written there too
and renamed into place, then the record is replaced atomically, so a run killed at any moment leaves
whole shards only, and a task that runs twice just leaves an orphan for `gc`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.core.errors import CacheError, OutputError, first_line
from pipeline.core.hashing import bytes_sha256
from pipeline.core.io import fsync_dir, write_json_atomic
from pipeline.features.index import CacheIndex, ShardInfo, forget_index, open_index
from pipeline.features.records import (
    RECORD_FORMAT,
    UNREADABLE,
    array_sha256,
    load_array,
    read_record,
    record_checksum,
)
from pipeline.images.decode import DECODER

if TYPE_CHECKING:
    import dask.array as da

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1  # of the key: part of every key's digest, so changing it recomputes every cache
_STAGING = ".staging"
_ORPHAN_GRACE_S = 3600  # gc leaves younger unrecorded arrays alone: a running task may be committing them
_KEY_NAME = re.compile(r"[^.].*-[0-9a-f]{16}")
_META_UNREADABLE = "meta.json cannot be read"  # a permission, not damage: gc leaves the key alone


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
    runtime: str = "torch"  # what ran the network (features.device.resolve_runtime)
    f32: str = ""  # OpenVINO bf16: the modules kept in f32, comma-separated (features.openvino_precise)

    @property
    def digest(self) -> str:
        fields_ = asdict(self)
        if self.runtime == "torch":  # keys made before there was a choice of runtime keep their digest
            del fields_["runtime"]
        if not self.f32:  # as do keys made before modules were kept in f32
            del fields_["f32"]
        text = json.dumps({**fields_, "format": FORMAT_VERSION}, sort_keys=True)
        return bytes_sha256(text.encode())[:16]

    @property
    def dirname(self) -> str:
        runtime = "" if self.runtime == "torch" else f"{self.runtime}-"
        return f"{self.backbone}-{self.layer}-{self.precision}-{runtime}{self.digest}"


def _fsync_tree(root: Path) -> None:
    for folder, _dirs, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as fh:
                os.fsync(fh.fileno())


def _tree_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


class FeatureStore:
    """The shards of one cache key."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.arrays = self.root / "features.zarr"
        self.records_dir = self.root / "shards"
        self.digest = self.root.name.rpartition("-")[2]  # the key's digest, which every record covers

    @classmethod
    def create(cls, cache_dir: str | os.PathLike, key: CacheKey, provenance: dict | None = None) -> FeatureStore:
        """Open the store of `key`, creating it if needed (safe when several processes race). A complete
        store is only read, so a fully cached extraction works on a read-only cache; a meta.json that is
        missing or damaged is written again from `key` (the records do not depend on it)."""
        store = cls(Path(cache_dir) / key.dirname)
        meta_problem = store._meta_problem()
        if meta_problem is None and (store.arrays / "zarr.json").is_file() and store.records_dir.is_dir():
            return store
        meta = {**asdict(key), "key": key.dirname, "format": FORMAT_VERSION, **(provenance or {})}
        try:
            if not store.root.exists():
                store._build(meta)
            else:
                store.records_dir.mkdir(parents=True, exist_ok=True)
                if not (store.arrays / "zarr.json").exists():
                    import zarr

                    zarr.open_group(store=str(store.arrays), mode="a")
                if meta_problem is not None:
                    logger.warning(f"warning: cache {store.root.name}: {meta_problem}; written again from the key")
                    write_json_atomic(store.root / "meta.json", meta)
        except OSError as exc:
            raise OutputError(f"cannot write the feature cache {store.root}: "
                              f"{exc.strerror or first_line(exc)}") from exc
        return store

    def _build(self, meta: dict) -> None:
        """A new key's folder, complete with its meta.json, built in staging and renamed into place: a
        key folder without meta.json is then always damage, never a store being created."""
        import zarr

        staging = self.root.parent / _STAGING / f"{self.root.name}-{uuid.uuid4().hex[:8]}"
        try:
            (staging / "shards").mkdir(parents=True)
            zarr.open_group(store=str(staging / "features.zarr"), mode="a")
            write_json_atomic(staging / "meta.json", meta)
            _fsync_tree(staging)
            try:
                os.rename(staging, self.root)
            except OSError:
                if not (self.root / "meta.json").is_file():
                    raise
                return  # another process created the key first
            fsync_dir(self.root.parent)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @classmethod
    def all_in(cls, cache_dir: str | os.PathLike) -> list[FeatureStore]:
        """Every key folder: a folder named like a key that holds meta.json, records or arrays (so a key
        whose meta.json is missing is listed, and checked, too)."""
        cache_dir = Path(cache_dir)
        if not cache_dir.is_dir():
            raise CacheError(f"cache folder not found: {cache_dir}")
        return [cls(p) for p in sorted(cache_dir.iterdir())
                if _KEY_NAME.fullmatch(p.name) and p.is_dir()
                and any((p / name).exists() for name in ("meta.json", "shards", "features.zarr"))]

    def _meta_problem(self) -> str | None:
        """Why meta.json cannot be trusted, or None: it must describe the key whose digest names the folder."""
        path = self.root / "meta.json"
        try:
            meta = json.loads(path.read_text())
        except FileNotFoundError:
            return "meta.json is missing"
        except OSError as exc:
            return f"{_META_UNREADABLE} ({exc.strerror or first_line(exc)})"
        except ValueError as exc:
            return f"meta.json is not valid JSON ({first_line(exc)})"
        try:
            key = CacheKey(**{f.name: meta[f.name] for f in fields(CacheKey) if f.name in meta})
            matches = key.dirname == self.root.name
        except (KeyError, TypeError, ValueError):
            matches = False
        if not matches:
            return "meta.json does not describe this key (edited, or written by another version)"
        return None

    @property
    def meta(self) -> dict:
        """meta.json, once it has been checked against the folder's digest."""
        problem = self._meta_problem()
        if problem is not None:
            raise CacheError(f"cache {self.root}: {problem}; `pipeline extract` writes it again, "
                             "`pipeline cache gc` drops the key")
        return json.loads((self.root / "meta.json").read_text())

    def _read_record(self, path: Path) -> tuple[dict | None, str | None]:
        """(the record, None) if it is trusted, else (None, why not)."""
        return read_record(path, self.digest)

    def _scan(self) -> tuple[dict[str, dict], dict[Path, str]]:
        """One pass over the records: (trusted records by shard id, record files that are not, with why)."""
        records, untrusted = {}, {}
        for path in sorted(self.records_dir.glob("*.json")):
            record, problem = self._read_record(path)
            if record is None:
                untrusted[path] = problem
            else:
                records[path.stem] = record
        return records, untrusted

    def records(self) -> dict[str, dict]:
        """Completion records by shard id; a damaged record counts as absent (its shard is redone)."""
        return self._scan()[0]

    @property
    def lookup(self) -> CacheIndex:
        """This key's index (content id -> shard, row), opened once per process and kept up to date."""
        return open_index(self.root, self._read_record)

    def index(self) -> dict[str, tuple[str, int]]:
        """image id -> (shard id, row) over all committed shards whose array is on disk."""
        return self.lookup.everything()

    def have(self, image_ids: Iterable[str]) -> set[str]:
        """Those of `image_ids` the cache holds, found through the index (no record is read)."""
        return set(self.lookup.locate(image_ids))

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
        try:
            zarr.create_array(store=str(staging), data=features, chunks=(max(rows, 1), dim),
                              attributes={"image_ids": image_ids})
            _fsync_tree(staging)
            os.rename(staging, self.arrays / array_name)
            fsync_dir(self.arrays)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise OutputError(f"cannot write the feature cache {self.root}: "
                              f"{exc.strerror or first_line(exc)}") from exc
        record = {"format": RECORD_FORMAT, "array": array_name, "rows": rows, "dim": dim,
                  "sha256": array_sha256(features), "image_ids": list(image_ids), "seconds": seconds}
        record["checksum"] = record_checksum(self.digest, record)
        write_json_atomic(self.records_dir / f"{shard}.json", record)

    def read(self, image_ids: list[str]) -> da.Array:
        """Rows for `image_ids` in that order, as a lazy Dask array; each shard is checked when read,
        against its record (the data's SHA-256, and the ids of the rows the index pointed to)."""
        import dask
        import dask.array as da

        located = self.lookup.locate(image_ids)
        missing = [i for i in image_ids if i not in located]
        if missing:
            raise CacheError(f"{len(missing)} images are not in cache {self.root.name} "
                             f"(first: {missing[0]}); run `pipeline extract` first")
        dim = self.meta["dim"]  # checked against the folder's digest, which every record covers
        if not image_ids:
            return da.zeros((0, dim), dtype=np.float32)
        wanted: dict[str, dict[int, str]] = {}
        for image_id, (shard, row) in located.items():
            wanted.setdefault(shard, {})[row] = image_id
        shards = self.lookup.shards(sorted(wanted))
        parts, offsets, total = [], {}, 0
        for shard in sorted(wanted):
            info = shards[shard]
            loaded = dask.delayed(_load_checked, pure=True)(self, info, tuple(sorted(wanted[shard].items())))
            parts.append(da.from_delayed(loaded, shape=(info.rows, dim), dtype=np.float32))
            offsets[shard], total = total, total + info.rows
        positions = np.fromiter((offsets[located[i][0]] + located[i][1] for i in image_ids), dtype=np.int64,
                                count=len(image_ids))
        return da.concatenate(parts)[positions]

    def _damage(self) -> tuple[dict[str, tuple[dict, str]], dict[Path, str], list[str]]:
        """(shard -> (record, why) for shards that fail their check, record files not trusted -> why,
        where the index disagrees with the records)."""
        records, untrusted = self._scan()
        index_problems = self.lookup.problems(records) if self.records_dir.is_dir() else []
        damaged = {}
        for shard, record in records.items():
            try:
                load_array(self.arrays / record["array"], record)
            except CacheError as exc:
                damaged[shard] = (record, str(exc).split(";")[0])
        return damaged, untrusted, index_problems

    def verify(self) -> list[str]:
        """One line per problem: meta.json missing, unreadable or not this key's; a shard that changed, is
        truncated or unreadable; a record that is broken, fails its checksum or is of the first format; an
        index that disagrees with the records."""
        meta_problem = self._meta_problem()
        damaged, untrusted, index_problems = self._damage()
        return ([f"{self.root.name}: {meta_problem}"] if meta_problem else []) + (
            [f"{self.root.name}: shard {shard}: {why}" for shard, (_record, why) in damaged.items()]
            + [f"{self.root.name}: shard {p.stem}: {why}" for p, why in untrusted.items()]
            + [f"{self.root.name}: {why}" for why in index_problems])

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

        An index that disagrees with the records is deleted (the next run rebuilds it from them). Each
        record is read again just before it is removed, so a shard that a concurrent run has just
        committed again is left alone. A key whose meta.json is missing or not its own goes whole (a key
        folder is created with its meta.json, so this is damage, not a store being created); one whose
        meta.json cannot be read (no permission) is left for a person to look at."""
        meta_problem = self._meta_problem()
        if meta_problem is not None:
            if meta_problem.startswith(_META_UNREADABLE):
                return []
            shutil.rmtree(self.root, ignore_errors=True)
            return [f"{self.root.name}: unreadable key ({meta_problem})"]
        damaged, untrusted, index_problems = self._damage()
        removed = []
        if index_problems:
            forget_index(self.root)
            removed.append(f"{self.root.name}: index ({len(index_problems)} shards disagreed; rebuilt on the next run)")
        for shard, (record, _why) in damaged.items():
            path = self.records_dir / f"{shard}.json"
            if (self._read_record(path)[0] or {}).get("array") == record["array"]:
                path.unlink(missing_ok=True)
                removed.append(f"{self.root.name}: damaged shard {shard}")
            shutil.rmtree(self.arrays / record["array"], ignore_errors=True)
        for path, why in untrusted.items():
            if self._read_record(path)[0] is None:
                path.unlink(missing_ok=True)
                removed.append(f"{self.root.name}: unreadable record {path.stem}" if why == UNREADABLE
                               else f"{self.root.name}: untrusted record {path.stem} ({why})")
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
        """What `cache ls` shows; a key whose meta.json cannot be trusted shows `?` (verify says why)."""
        try:
            meta = self.meta
        except CacheError:
            meta = {"backbone": "?", "layer": "?", "precision": "?", "dim": "?"}
        records = self.records()
        return {"key": self.root.name, "backbone": meta["backbone"], "layer": meta["layer"],
                "precision": meta["precision"], "dim": meta["dim"], "shards": len(records),
                "rows": sum(r["rows"] for r in records.values()), "bytes": _tree_size(self.root),
                "images_per_second": _images_per_second(records.values())}


def _load_checked(store: FeatureStore, info: ShardInfo, rows: tuple[tuple[int, str], ...]) -> np.ndarray:
    """A shard's data, proved to be what its record describes, with `rows` (row, image id) as the record
    has them: an index that is wrong fails the read instead of handing out another image's features."""
    record, problem = store._read_record(store.records_dir / f"{info.shard}.json")
    if record is None or record["array"] != info.array or any(
            row >= record["rows"] or record["image_ids"][row] != image_id for row, image_id in rows):
        raise CacheError(f"cache {store.root.name}: the index disagrees with the record of shard {info.shard}"
                         f"{f' ({problem})' if problem else ''}; run `pipeline cache verify` then `pipeline cache gc`")
    return load_array(store.arrays / record["array"], record)


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
