"""Completion records of the feature cache: what makes a shard trusted, and the checked read of its data.

A record (`CACHE/<key>/shards/<shard>.json`) names the shard's array, its rows, dimension, the SHA-256 of
its data and its image ids in row order, with a checksum over all of that and the key's digest. It is
the source of truth of the cache: the index (`pipeline.features.index`) is derived from the records.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from pipeline.core.errors import CacheError
from pipeline.core.hashing import bytes_sha256

RECORD_FORMAT = 2  # of the completion records; 2 added `checksum` (over the ids and the key's digest)
ARRAY_NAME = re.compile(r"[0-9a-f]{16}-[0-9a-f]{8}")
UNREADABLE = "completion record is unreadable"


def array_sha256(array: np.ndarray) -> str:
    return bytes_sha256(np.ascontiguousarray(array, dtype="<f4").tobytes())


def record_checksum(key_digest: str, record: dict) -> str:
    """SHA-256 over every field of a completion record but `checksum` itself (the data's SHA-256, the
    row count, the image ids in row order, the array's name) and the digest of the key the record
    belongs to: reordered or exchanged ids, or a record copied into another key's folder, fail it."""
    fields_ = {name: value for name, value in record.items() if name != "checksum"}
    return bytes_sha256(json.dumps([key_digest, fields_], sort_keys=True).encode())


def record_problem(shard: str, record: object, key_digest: str) -> str | None:
    """Why a record is not trusted, or None. Every field must have the right type and agree with the
    others and with the checksum; the array name must be one this code writes, so a tampered record
    cannot point gc elsewhere."""
    if not isinstance(record, dict):
        return UNREADABLE
    if "checksum" not in record and "format" not in record:
        return ("completion record of an older version (its checksum does not cover the image ids); "
                "the next extract computes the shard again")
    ids, rows = record.get("image_ids"), record.get("rows")
    if not (record.get("format") == RECORD_FORMAT and isinstance(record.get("checksum"), str)
            and isinstance(record.get("array"), str) and ARRAY_NAME.fullmatch(record["array"]) is not None
            and record["array"].startswith(shard) and isinstance(rows, int) and isinstance(record.get("dim"), int)
            and isinstance(record.get("sha256"), str) and isinstance(ids, list) and len(ids) == rows
            and all(isinstance(i, str) for i in ids)):
        return UNREADABLE
    if record["checksum"] != record_checksum(key_digest, record):
        return "completion record does not match its checksum (its image ids or fields were changed)"
    return None


def load_array(path: Path, record: dict) -> np.ndarray:
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




def read_record(path: Path, key_digest: str) -> tuple[dict | None, str | None]:
    """(the record, None) if it is trusted, else (None, why not)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None, UNREADABLE
    problem = record_problem(path.stem, record, key_digest)
    return (record, None) if problem is None else (None, problem)
