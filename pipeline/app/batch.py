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
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar

import numpy as np
from pydantic import AfterValidator, BeforeValidator, Field, PositiveInt
from pydantic_core import PydanticCustomError
from tqdm.auto import tqdm

from pipeline.app.batch_heads import Head, HeadUnusable, load_head, open_heads
from pipeline.app.batch_predicted import PredictedIds, digests, predicted_ids
from pipeline.app.batch_scan import Scan
from pipeline.app.batch_state import (
    SKIP_RECORD,
    BatchLogEntry,
    HeadLog,
    SkippedFile,
    append_log,
    batch_lock,
    check_log,
    known_skips,
    new_run_id,
    now,
    record_skips,
    recover,
    still_broken,
)
from pipeline.core.configfile import ConfigFile, from_config_folder, near_config
from pipeline.core.errors import ConfigError, OutputError, PipelineError, first_line
from pipeline.core.io import WRITE_ERRNOS, fsync_dir, make_folder, writing
from pipeline.core.names import SAFE_NAME_RULE
from pipeline.core.paths import path_text
from pipeline.core.schema import SafeName, key_path, option, problem
from pipeline.features.settings import ComputeSettings
from pipeline.heads.spec import HEAD_SUFFIX, OLD_HEAD_SUFFIX
from pipeline.images.data import Dataset

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_PARTIAL, EXIT_LOCKED = 0, 1, 2, 3, 4


# --------------------------------------------------------------------------- config

class BatchFeatures(ComputeSettings):
    """`features:` how features are computed; the heads fix the backbones, layers, precision and weights."""

    unknown_key: ClassVar[str] = ("'{key}' does not apply to batch runs (the heads fix the backbones, layers and "
                                  "precision){hint}; expected one of: {expected}")


def _listed(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _named(value: Any) -> Any:
    """Head files listed without names are named by their file names (without .skops, or .joblib)."""
    files = _listed(value)
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return value
    named = {Path(f).name.removesuffix(HEAD_SUFFIX).removesuffix(OLD_HEAD_SUFFIX): f for f in files}
    if len(named) != len(files):
        raise problem("two head files have the same name; give them names (heads: {name: file, ...})")
    return named


def _not_empty(value: Any) -> Any:
    if value == "":
        raise PydanticCustomError("empty", "empty")
    return value


NearConfig = Annotated[Path, Field(strict=False), AfterValidator(near_config)]


# The paths a batch run writes, taken from the config file's folder like its inputs.
Written = Annotated[Path, Field(strict=False), BeforeValidator(_not_empty)]
OutputDir = Annotated[Written, AfterValidator(from_config_folder("output_dir"))]
LogFile = Annotated[Written, AfterValidator(from_config_folder("log"))]


class BatchConfig(ConfigFile):
    """A batch config (`pipeline batch CONFIG`): every relative path in it (inputs, heads, output_dir,
    log, features.cache_dir) is taken from the config file's folder, so cron finds the same files."""

    inputs: Annotated[list[NearConfig], Field(min_length=1),
                      BeforeValidator(_listed, json_schema_input_type=str | list[str])] = option(
        accepts="a folder or text file of image paths, or a list of them",
        about="folders (scanned recursively, hidden files left alone) and text files listing one image path per line")
    heads: Annotated[dict[SafeName, NearConfig], Field(min_length=1),
                     BeforeValidator(_named, json_schema_input_type=str | list[str] | dict[str, str])] = option(
        accepts=f"a list of saved head files ({HEAD_SUFFIX}), or a mapping of name ({SAFE_NAME_RULE}) to file",
        about="saved heads (pipeline fit, pipeline run); each name is a folder of output_dir")
    features: Annotated[BatchFeatures, BeforeValidator(lambda v: {} if v is None else v)] = option(
        default_factory=dict, validate_default=True,
        accepts=f"a mapping with {', '.join(BatchFeatures.model_fields)}",
        about="how features are computed")
    output_dir: OutputDir = option(accepts="the folder that receives one predictions file per head and run",
                                   about="OUTPUT/<head>/run-<run_id>.csv, one file per head and run")
    log: LogFile = option(accepts="the run log file (one JSON object per line)", about="one JSON line per run")
    chunk_size: PositiveInt = option(2048, accepts="a positive integer",
                                     about="images whose features are held in memory at once")
    trust_pickle: bool = option(False, accepts="true or false",
                                about=f"load heads saved by earlier versions ({OLD_HEAD_SUFFIX}, a pickle), which "
                                      "runs any code such a file holds: only for files you trust; "
                                      "`pipeline convert-head` rewrites one in the safe format")


def load_batch_config(path: str | os.PathLike) -> BatchConfig:
    """Validate a batch config in full (file, line and key named on error) before anything runs: its
    types (`BatchConfig`), then that every input and head file is there."""
    config = BatchConfig.load(path)
    raw = config.raw
    for i, source in enumerate(config.inputs):
        if not source.exists():
            where = ("inputs", i) if isinstance(raw["inputs"], list) else ("inputs",)
            raise config.error(where, f"'{key_path(where)}': folder or file list not found: {source}")
    for i, (name, file) in enumerate(config.heads.items()):
        where = ("heads", name if isinstance(raw["heads"], dict) else i)
        if name == SKIP_RECORD:
            raise config.error(where, f"'heads.{name}': the name is taken by the output folder's record of "
                                      "skipped files; choose another")
        if not file.is_file():
            raise config.error(where, f"'heads.{name}': head file not found: {file}")
    return config


@dataclass
class HeadRun:
    rows: int = 0
    file: Path | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # path -> reason
    computed: int = 0


# --------------------------------------------------------------------------- the run

def _predict_head(head: Head, pending: list[tuple[str, str]], done: PredictedIds, config: BatchConfig, run_id: str,
                  bar: tqdm) -> HeadRun:
    """Stream one head's pending images chunk by chunk into `OUTPUT/<head>/run-<run_id>.csv`, committed
    atomically once complete; memory holds one chunk's features at a time. Rows are checked against
    `done` (grown as they are written) by the id extraction computed, so a file rewritten during the
    run with content already predicted does not give a second row. A full disk or read-only folder is
    an `OutputError` naming the run file, and leaves no part of it."""
    from pipeline.heads.predict import predict_with, prediction_columns  # scikit-learn: only to predict

    assert head.bundle is not None, "loaded by _work"
    result = HeadRun()
    folder = make_folder(config.output_dir / head.name)
    final = folder / f"run-{run_id}.csv"
    tmp = folder / f".{final.name}.tmp"
    options = config.features.model_dump(exclude_none=True)
    try:
        with writing(final, WRITE_ERRNOS), open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["run_id", "head", "head_sha256", *prediction_columns(head.bundle)])
            for start in range(0, len(pending), config.chunk_size):
                chunk = pending[start:start + config.chunk_size]
                data = Dataset([Path(path) for _i, path in chunk], np.full(len(chunk), -1), [], [],
                               ids=[image_id for image_id, _path in chunk])  # checked against the bytes decoded
                predictions = predict_with(head.bundle, data, progress=False, **options, **head.options)
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
            with writing(final):
                os.replace(tmp, final)
                fsync_dir(folder)
            result.file = final
    finally:
        with suppress(OSError):  # what is left of a failed write (a kill leaves it to the next run's recover)
            tmp.unlink(missing_ok=True)
    return result


@dataclass
class Found:
    """What a batch run keeps of its scan: nothing per file that every head has predicted already."""

    first_path: dict[str, str] = field(default_factory=dict)  # content id some head lacks -> its first path
    later_copies: dict[str, list[Path]] = field(default_factory=dict)  # that first path -> its copies
    unreadable: list[str] = field(default_factory=list)
    looked_at: set[str] = field(default_factory=set)  # paths of the skip record that the scan met


def _stream(scan: Scan, done: list[PredictedIds], known: dict[str, dict]) -> Found:
    """Stream `scan`, testing each block's ids against what earlier runs of every head predicted; only
    the paths of content some head lacks are kept: the first path of each content (which predicts) and
    its copies."""
    found = Found()
    for paths, ids in scan:
        found.looked_at.update(path for path in paths if path in known)
        readable = [(path, image_id) for path, image_id in zip(paths, ids, strict=True) if image_id is not None]
        found.unreadable += [path for path, image_id in zip(paths, ids, strict=True) if image_id is None]
        block = digests([image_id for _path, image_id in readable])
        lacking = np.zeros(len(readable), dtype=bool)
        for predicted in done:
            lacking |= ~predicted.by_earlier_runs(block)
        for k in np.flatnonzero(lacking):
            path, image_id = readable[k]
            if found.first_path.setdefault(image_id, path) != path:
                found.later_copies.setdefault(found.first_path[image_id], []).append(Path(path))
    return found


def _lacking(first_path: dict[str, str], done: PredictedIds) -> list[tuple[str, str]]:
    """(id, path) of each content in `first_path` that earlier runs did not predict, in scan order."""
    ids = list(first_path)
    predicted = done.by_earlier_runs(digests(ids))
    return [(image_id, first_path[image_id]) for image_id, has in zip(ids, predicted, strict=True) if not has]


def _work(config: BatchConfig, heads: list[Head], entry: BatchLogEntry, progress: bool, rehash: bool,
          trust_pickle: bool, on_scan: Callable[[int, bool], None] | None) -> tuple[dict[str, str], set[str]]:
    """Fills `entry` as it goes, so a run that fails midway logs what it saw, skipped and left undone;
    returns every skipped file with its reason, and every path of the skip record that it looked at. A
    head not loaded yet is loaded once it has images to predict, before the first prediction
    (`HeadUnusable` if it cannot be)."""
    done = {head.name: predicted_ids(config.output_dir / head.name, head.sha256) for head in heads}
    # A file an earlier run reported as broken, unchanged since, is tried again but is not news.
    known = known_skips(config.output_dir)
    scan = Scan(config.inputs, config.features.cache_dir, rehash, on_scan)
    found = _stream(scan, list(done.values()), known)
    skipped = scan.skipped
    entry.seen = scan.files + len(skipped)
    entry.opened = scan.opened
    found.looked_at.update(skipped)
    skipped.update((path, "unreadable file") for path in found.unreadable)
    entry.skipped, entry.skipped_files = _skips(skipped)
    pending = {head.name: _lacking(found.first_path, done[head.name]) for head in heads}
    entry.new = len({path for paths in pending.values() for _i, path in paths if not still_broken(known, path)})
    entry.failed = len({path for paths in pending.values() for _i, path in paths})
    for head in heads:
        if pending[head.name] and head.bundle is None:
            load_head(head, config, trust_pickle)
    with tqdm(total=sum(map(len, pending.values())), unit="img", desc="batch",
              disable=None if progress else True) as bar:
        for i, head in enumerate(heads):
            bar.set_description(head.name)
            result = HeadRun() if not pending[head.name] else \
                _predict_head(head, pending[head.name], done[head.name], config, entry.run_id, bar)
            entry.heads[head.name].rows = result.rows
            entry.heads[head.name].file = path_text(result.file) if result.file else None
            entry.predicted += result.rows
            entry.computed += result.computed
            entry.failed = len({path for later in heads[i + 1:] for _i, path in pending[later.name]})
            skipped.update(result.skipped)
            skipped.update(_skipped_copies(result.skipped, found.later_copies))
            entry.skipped, entry.skipped_files = _skips(skipped)
    return skipped, found.looked_at


def _skipped_copies(skipped: dict[str, str], later_copies: dict[str, list[Path]]) -> dict[str, str]:
    """Only the first path of each content is predicted; when it fails, its copies (several identical
    truncated uploads, say) are skipped too, each named, instead of vanishing from the report."""
    return {str(copy): f"{reason} (same bytes as {path})" for path, reason in skipped.items()
            for copy in later_copies.get(path, [])}


def _skips(skipped: dict[str, str]) -> tuple[int, list[SkippedFile]]:
    """How many files were skipped, and the first 20 of them, for the log line."""
    return len(skipped), [SkippedFile(path=path_text(os.path.abspath(p)), reason=path_text(r))
                          for p, r in list(skipped.items())[:20]]


def run_batch(config_path: str | os.PathLike | BatchConfig, scheduler: str | None = None, on_lock: str = "wait",
              progress: bool = True, trust_pickle: bool = False, rehash: bool = False,
              on_scan: Callable[[int, bool], None] | None = None) -> BatchLogEntry:
    """One batch run (of a config file, or of one already loaded); returns its log entry (`exit_code`
    says how it went). Files the stat memo has seen unchanged are not read (`rehash` reads them all);
    `on_scan(files, done)` hears how many files the scan has identified so far, and when it is done.

    Config and head errors raise before anything is written (a head already checked by an earlier run
    is loaded only when it has something to predict, and one that has become unusable since, its
    backbone uninstalled say, raises then, before any prediction); a run that fails once working is
    logged with status "failed" (what it committed is kept) and, for a bug, re-raised."""
    config = config_path if isinstance(config_path, BatchConfig) else load_batch_config(config_path)
    if scheduler:
        config.features.scheduler = scheduler
    with batch_lock(config.output_dir, on_lock):
        heads = open_heads(config, trust_pickle)
        check_log(config.log)
        try:
            recover(config.output_dir, config.log)
        except OSError as exc:
            raise ConfigError(f"cannot tidy up after earlier runs in {config.output_dir}: {exc}") from None
        started = time.perf_counter()
        entry = BatchLogEntry.begin(new_run_id(), {h.name: HeadLog(file=None, sha256=h.sha256, rows=0) for h in heads})
        entry.scheduler = config.features.scheduler
        try:
            skipped, looked_at = _work(config, heads, entry, progress, rehash, trust_pickle, on_scan)
            new = record_skips(config.output_dir, skipped, looked_at, os.path.abspath(config.path))
            entry.new_skipped, entry.new_skipped_files = _skips({path: skipped[path] for path in new})
            entry.status, entry.exit_code = ("partial", EXIT_PARTIAL) if entry.new_skipped else ("ok", EXIT_OK)
        except HeadUnusable:  # a config error, found late: nothing was predicted, and nothing is logged
            raise
        except Exception as exc:
            entry.status, entry.exit_code, entry.error = "failed", EXIT_FAILED, path_text(first_line(exc))
            if not isinstance(exc, PipelineError | OSError):
                _finish(config, entry, started)
                raise
        _finish(config, entry, started)
    return entry


def _finish(config: BatchConfig, entry: BatchLogEntry, started: float) -> None:
    """Append the run's log line; a line that cannot be written makes the run fail (exit 1) with the
    reason in `entry.error`, so that the caller can say so, instead of the run leaving no trace."""
    entry.ended, entry.seconds = now(), round(time.perf_counter() - started, 3)
    try:
        append_log(config.log, entry)
    except OutputError as exc:
        unlogged = f"{exc} (this run's log line was not written"
        unlogged += "; the next run logs its files as recovered)" if entry.predicted else ")"
        entry.status, entry.exit_code = "failed", EXIT_FAILED
        entry.error = f"{entry.error}; {unlogged}" if entry.error else unlogged
