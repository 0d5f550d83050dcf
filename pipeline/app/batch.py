"""`pipeline batch CONFIG`: the recurring job that predicts new images with saved heads.

Each run scans the input folders and lists, extracts features only for images the cache lacks, applies
every configured head to the images it has not predicted yet, and adds one CSV per head for the run
(`OUTPUT/<head>/run-<run_id>.csv`). What was predicted is read back from those files, keyed by image id
(content) and head identity (the SHA-256 of the head file), so a changed head predicts everything again.

Safe under a scheduler: runs hold an exclusive lock (flock) on `OUTPUT/.batch.lock`; a run file is
written under a hidden temporary name, fsynced and renamed into place, and only then is the run's line
appended to the log. A run killed at any moment leaves complete files or none, and the cache keeps
every finished shard, so the next run redoes only what is missing, without duplicate rows.
"""

from __future__ import annotations

import csv
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from tqdm.auto import tqdm

from pipeline.app.batch_state import (
    SKIP_RECORD,
    append_log,
    batch_lock,
    check_log,
    log_entry,
    new_run_id,
    now,
    predicted_ids,
    record_skips,
    recover,
)
from pipeline.app.config import parse_config
from pipeline.core.errors import ConfigError, PipelineError, first_line
from pipeline.core.hashing import file_sha256
from pipeline.core.io import fsync_dir
from pipeline.core.names import is_safe_name
from pipeline.heads.bundle import load_bundle
from pipeline.heads.predict import feature_options, predict_with
from pipeline.images.data import Dataset, hash_files, scan

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_PARTIAL, EXIT_LOCKED = 0, 1, 2, 3, 4
BATCH_KEYS = {"inputs": "a folder or text file of image paths, or a list of them",
              "heads": "a list of saved head files (.joblib), or a mapping of name to file",
              "features": "a mapping with cache_dir, device, batch_size, shard_size, scheduler",
              "output_dir": "the folder that receives one predictions file per head and run",
              "log": "the run log file (one JSON object per line)",
              "chunk_size": "a positive integer: images whose features are in memory at once"}
BATCH_FEATURES = ("cache_dir", "device", "batch_size", "shard_size", "scheduler")
DEFAULT_CHUNK = 2048


@dataclass
class BatchConfig:
    path: Path
    inputs: list[Path]
    heads: dict[str, Path]
    features: dict
    output_dir: Path
    log: Path
    chunk_size: int = DEFAULT_CHUNK


@dataclass
class Head:
    name: str
    path: Path
    sha256: str  # the head's identity: a refitted or replaced file predicts every image again
    bundle: dict
    options: dict  # extract() options that remake its training features


@dataclass
class HeadRun:
    rows: int = 0
    file: Path | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # path -> reason
    computed: int = 0


# --------------------------------------------------------------------------- config

def _paths(value: object, key: str, path: Path) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, str) for v in items):
        raise ConfigError(f"{path}: '{key}' must be {BATCH_KEYS[key]}, got {value!r}")
    return items


def _near(config: Path, name: str) -> Path:
    """Inputs and heads are taken from the config file's folder, like a run config's data paths."""
    return Path(name) if Path(name).is_absolute() else config.parent / name


def _head_files(value: object, path: Path) -> dict[str, Path]:
    if value == {}:
        raise ConfigError(f"{path}: 'heads' must be {BATCH_KEYS['heads']}, got {{}}")
    named = value if isinstance(value, dict) else {Path(p).name.removesuffix(".joblib"): p
                                                   for p in _paths(value, "heads", path)}
    if isinstance(value, list) and len(named) != len(value):
        raise ConfigError(f"{path}: 'heads': two head files have the same name; give them names "
                          "(heads: {name: file, ...})")
    heads = {}
    for name, file in named.items():
        if not isinstance(file, str) or not is_safe_name(name):
            raise ConfigError(f"{path}: 'heads.{name}': the name must be letters, digits, '_', '-' or '.' "
                              f"(it names a folder) and the value a file path, got {file!r}")
        if name == SKIP_RECORD:
            raise ConfigError(f"{path}: 'heads.{name}': the name is taken by the output folder's record of "
                              "skipped files; choose another")
        if not _near(path, file).is_file():
            raise ConfigError(f"{path}: 'heads.{name}': head file not found: {_near(path, file)}")
        heads[str(name)] = _near(path, file)
    return heads


def load_batch_config(path: str | os.PathLike) -> BatchConfig:
    """Validate a batch config in full (file and key named on error) before anything runs."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {first_line(exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with keys {', '.join(BATCH_KEYS)}")
    for key in raw:
        if key not in BATCH_KEYS:
            raise ConfigError(f"{path}: unknown key {key!r}; expected one of: {', '.join(BATCH_KEYS)}")
    for key in ("inputs", "heads", "output_dir", "log"):
        if key not in raw:
            raise ConfigError(f"{path}: '{key}' is required: {BATCH_KEYS[key]}")
    features = raw.get("features") or {}
    unknown = [k for k in features if k not in BATCH_FEATURES] if isinstance(features, dict) else []
    if unknown:
        raise ConfigError(f"{path}: 'features.{unknown[0]}' does not apply to batch runs (the heads fix the "
                          f"backbones, layers and precision); expected one of: {', '.join(BATCH_FEATURES)}")
    features = parse_config({"features": features}, path)["features"]  # the run configs' type checks
    inputs = []
    for i, name in enumerate(_paths(raw["inputs"], "inputs", path)):
        if not _near(path, name).exists():
            raise ConfigError(f"{path}: 'inputs[{i}]': folder or file list not found: {_near(path, name)}")
        inputs.append(_near(path, name))
    for key in ("output_dir", "log"):
        if not isinstance(raw[key], str) or not raw[key]:
            raise ConfigError(f"{path}: '{key}' must be {BATCH_KEYS[key]}, got {raw[key]!r}")
    chunk = raw.get("chunk_size", DEFAULT_CHUNK)
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ConfigError(f"{path}: 'chunk_size' must be {BATCH_KEYS['chunk_size']}, got {chunk!r}")
    return BatchConfig(path, inputs, _head_files(raw["heads"], path), features, Path(raw["output_dir"]),
                       Path(raw["log"]), chunk)


def load_heads(config: BatchConfig) -> list[Head]:
    """Every head loaded and its features checked against this installation. Called under the lock, so a
    run that waited for another one applies the head files as they are when it starts."""
    heads = []
    for name, path in config.heads.items():
        try:
            sha = file_sha256(path)
        except OSError as exc:
            raise ConfigError(f"{config.path}: 'heads.{name}': cannot read {path}: {exc.strerror or exc}") from None
        bundle = load_bundle(path)
        heads.append(Head(name, path, sha, bundle, feature_options(bundle, path)))
    return heads


# --------------------------------------------------------------------------- the run

def scan_inputs(inputs: list[Path]) -> Dataset:
    """Every visible file under each folder (recursively; hidden files and folders, such as uploads in
    progress, are left alone) and every path of each list file, without labels."""
    paths: list[Path] = []
    skipped: list[tuple[str, str]] = []
    for source in inputs:
        if source.is_dir():
            paths += sorted(p for p in source.rglob("*") if p.is_file()
                            and not any(part.startswith(".") for part in p.relative_to(source).parts))
        else:
            listed = scan(source, allow_empty_list=True)
            paths += listed.paths
            skipped += listed.skipped
    paths = list(dict.fromkeys(paths))
    return Dataset(paths, np.full(len(paths), -1), [], skipped)


def _predict_head(head: Head, pending: list[Path], done: set[str], config: BatchConfig, run_id: str,
                  bar: tqdm) -> HeadRun:
    """Stream one head's pending images chunk by chunk into `OUTPUT/<head>/run-<run_id>.csv`, committed
    atomically once complete; memory holds one chunk's features at a time. Rows are checked against
    `done` (grown as they are written) by the id extraction computed, so a file rewritten during the
    run with content already predicted does not give a second row."""
    result = HeadRun()
    folder = config.output_dir / head.name
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"run-{run_id}.csv"
    tmp = folder / f".{final.name}.tmp"
    options = {k: v for k, v in config.features.items() if v is not None}
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["run_id", "head", "head_sha256", "path", "image_id", "predicted_class",
                         *[f"p_{c}" for c in head.bundle["classes"]]])
        for start in range(0, len(pending), config.chunk_size):
            chunk = pending[start:start + config.chunk_size]
            predictions = predict_with(head.bundle, Dataset(chunk, np.full(len(chunk), -1), [], []),
                                       progress=False, **options, **head.options)
            for row in predictions.rows():
                if row[1] not in done:  # row: path, image id, ...
                    done.add(row[1])
                    writer.writerow([run_id, head.name, head.sha256, *row])
                    result.rows += 1
            result.computed += predictions.report.computed
            result.skipped.update(predictions.report.skipped)
            bar.update(len(chunk))
        fh.flush()
        os.fsync(fh.fileno())
    if result.rows:
        os.replace(tmp, final)
        fsync_dir(folder)
        result.file = final
    else:
        tmp.unlink()
    return result


def _work(config: BatchConfig, heads: list[Head], entry: dict, progress: bool) -> tuple[dict[str, str], set[str]]:
    """Fills `entry` as it goes, so a run that fails midway logs what it saw, skipped and left undone;
    returns every skipped file with its reason, and every path looked at."""
    dataset = scan_inputs(config.inputs)
    scanned = {str(p) for p in dataset.paths} | {path for path, _ in dataset.skipped}
    skipped = dict(dataset.skipped)
    entry["seen"] = len(dataset.paths) + len(dataset.skipped)
    ids = hash_files(dataset.paths)
    skipped.update((str(p), "unreadable file") for p, i in zip(dataset.paths, ids, strict=True) if i is None)
    _note_skipped(entry, skipped)
    copies: dict[str, list[Path]] = {}  # content id -> every path with that content, the first predicts
    for path, image_id in zip(dataset.paths, ids, strict=True):
        if image_id is not None:
            copies.setdefault(image_id, []).append(path)
    first_path = {image_id: paths[0] for image_id, paths in copies.items()}
    later_copies = {str(paths[0]): paths[1:] for paths in copies.values() if len(paths) > 1}
    done = {head.name: predicted_ids(config.output_dir / head.name, head.sha256) for head in heads}
    pending = {head.name: [p for i, p in first_path.items() if i not in done[head.name]] for head in heads}
    entry["new"] = entry["failed"] = len({path for paths in pending.values() for path in paths})
    with tqdm(total=sum(map(len, pending.values())), unit="img", desc="batch",
              disable=None if progress else True) as bar:
        for i, head in enumerate(heads):
            bar.set_description(head.name)
            result = _predict_head(head, pending[head.name], done[head.name], config, entry["run_id"], bar)
            entry["heads"][head.name].update(rows=result.rows, file=str(result.file) if result.file else None)
            entry["predicted"] += result.rows
            entry["computed"] += result.computed
            entry["failed"] = len({path for later in heads[i + 1:] for path in pending[later.name]})
            skipped.update(result.skipped)
            skipped.update(_skipped_copies(result.skipped, later_copies))
            _note_skipped(entry, skipped)
    return skipped, scanned


def _skipped_copies(skipped: dict[str, str], later_copies: dict[str, list[Path]]) -> dict[str, str]:
    """Only the first path of each content is predicted; when it fails, its copies (several identical
    truncated uploads, say) are skipped too, each named, instead of vanishing from the report."""
    return {str(copy): f"{reason} (same bytes as {path})" for path, reason in skipped.items()
            for copy in later_copies.get(path, [])}


def _note_skipped(entry: dict, skipped: dict[str, str], key: str = "skipped") -> None:
    entry[key] = len(skipped)
    entry[f"{key}_files"] = [{"path": os.path.abspath(p), "reason": r} for p, r in list(skipped.items())[:20]]


def run_batch(config_path: str | os.PathLike, scheduler: str | None = None, on_lock: str = "wait",
              progress: bool = True) -> dict:
    """One batch run; returns its log entry (`exit_code` says how it went).

    Config and head errors raise before anything is written; a run that fails once working is logged
    with status "failed" (what it committed is kept) and, for a bug, re-raised."""
    config = load_batch_config(config_path)
    if scheduler:
        config.features["scheduler"] = scheduler
    with batch_lock(config.output_dir, on_lock):
        heads = load_heads(config)
        check_log(config.log)
        try:
            recover(config.output_dir, config.log)
        except OSError as exc:
            raise ConfigError(f"cannot tidy up after earlier runs in {config.output_dir}: {exc}") from None
        started = time.perf_counter()
        entry = log_entry(new_run_id(), {h.name: {"file": None, "sha256": h.sha256, "rows": 0} for h in heads},
                           "running")
        entry["scheduler"] = config.features.get("scheduler")
        try:
            skipped, scanned = _work(config, heads, entry, progress)
            new = record_skips(config.output_dir, skipped, scanned)
            _note_skipped(entry, {path: skipped[path] for path in new}, key="new_skipped")
            entry.update(status="partial" if entry["new_skipped"] else "ok",
                         exit_code=EXIT_PARTIAL if entry["new_skipped"] else EXIT_OK)
        except Exception as exc:
            entry.update(status="failed", exit_code=EXIT_FAILED, error=first_line(exc))
            if not isinstance(exc, PipelineError | OSError):
                _finish(config, entry, started)
                raise
        _finish(config, entry, started)
    return entry


def _finish(config: BatchConfig, entry: dict, started: float) -> None:
    entry.update(ended=now(), seconds=round(time.perf_counter() - started, 3))
    append_log(config.log, entry)
