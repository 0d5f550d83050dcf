"""What batch runs keep on disk besides their predictions: the lock that serialises them, the run log,
the record of skipped files, and the repair of runs killed between writing their files and their log line.
"""

from __future__ import annotations

import csv
import fcntl
import json
import logging
import os
import platform
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from pipeline.app.batch_heads import CHECKED_HEADS
from pipeline.core.errors import ConfigError, OutputError, PipelineError
from pipeline.core.io import write_json_atomic, writing
from pipeline.core.paths import path_text

logger = logging.getLogger(__name__)

LOCK_NAME = ".batch.lock"
SKIP_RECORD = "skipped.json"


class LockBusy(PipelineError):
    """Another batch run holds the output folder's lock (and the caller chose not to wait)."""


@contextmanager
def batch_lock(folder: Path, on_lock: str = "wait") -> Iterator[None]:
    """Hold `folder/.batch.lock` for the run; the kernel releases it when the process dies, even by kill -9."""
    path = folder / LOCK_NAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a+")  # noqa: SIM115 - held open for the whole run: closing it releases the lock
    except OSError as exc:
        raise ConfigError(f"cannot create the batch lock {path}: {exc.strerror or exc}") from None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text().strip() or "a batch run"
            if on_lock == "exit":
                raise LockBusy(f"another batch run ({holder}) holds {path}; exiting without doing anything "
                               "(--on-lock wait queues behind it)") from None
            logger.warning(f"waiting for the batch run that holds {path_text(path)} ({holder})")
            fcntl.flock(fh, fcntl.LOCK_EX)
        with suppress(OSError):  # the holder's note is for people: a full disk must not stop the run here
            fh.truncate(0)
            fh.write(f"pid {os.getpid()} on {platform.node()} since {now()}\n")
            fh.flush()
        yield


def new_run_id() -> str:
    """UTC time to the microsecond, then a random tag: run files sort in the order the runs (serialised
    by the lock) started, which is how the latest prediction of an image is found."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ") + f"-{uuid.uuid4().hex[:6]}"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def run_files(output_dir: Path) -> list[Path]:
    return sorted(output_dir.glob("*/run-*.csv"))


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


class HeadLog(_Record):
    file: str | None  # the run's predictions file of this head; None when it predicted nothing
    sha256: str | None  # of the head file; None for a recovered run whose file has no rows
    rows: int


class SkippedFile(_Record):
    path: str  # absolute, as `path_text` writes it
    reason: str


class BatchLogEntry(_Record):
    """One line of the batch log. Every line has every key, so a reader of the log finds the same fields
    on every line; what a recovered run cannot know (it was killed before it could say) stays None, and
    so do the new skips of a run that failed before it could compare them with the record."""

    run_id: str
    status: Literal["running", "ok", "partial", "failed", "recovered"]
    started: str | None
    ended: str | None
    seen: int | None  # files looked at, skipped ones included
    opened: int | None  # files read to identify them: new or changed since the stat memo saw them
    new: int | None  # images (by content) some head had not predicted yet
    skipped: int | None
    failed: int | None  # new images left unpredicted by a failure
    computed: int | None  # feature rows computed (not found in the cache)
    new_skipped: int | None  # skips no earlier run reported (they set the partial exit code)
    predicted: int
    seconds: float | None
    exit_code: int | None
    heads: dict[str, HeadLog]
    skipped_files: list[SkippedFile] | None  # the first 20
    new_skipped_files: list[SkippedFile] | None  # the first 20
    scheduler: str | None
    host: str | None
    pid: int | None
    error: str | None
    note: str | None

    @classmethod
    def begin(cls, run_id: str, heads: dict[str, HeadLog]) -> BatchLogEntry:
        """The entry of a run starting now, in this process; filled in as the run goes."""
        return cls(run_id=run_id, status="running", started=now(), ended=None, seen=0, opened=0, new=0, skipped=0,
                   failed=0, computed=0, new_skipped=None, predicted=0, seconds=None, exit_code=None, heads=heads,
                   skipped_files=[], new_skipped_files=None, scheduler=None, host=platform.node(), pid=os.getpid(),
                   error=None, note=None)

    @classmethod
    def recovered(cls, run_id: str, heads: dict[str, HeadLog], ended: str, note: str) -> BatchLogEntry:
        """The entry of a run killed after writing its files, before its log line: what the files say."""
        return cls(run_id=run_id, status="recovered", started=None, ended=ended, seen=None, opened=None, new=None,
                   skipped=None, failed=None, computed=None, new_skipped=None,
                   predicted=sum(h.rows for h in heads.values()), seconds=None, exit_code=None, heads=heads,
                   skipped_files=None, new_skipped_files=None, scheduler=None, host=None, pid=None,
                   error=None, note=note)


def append_log(log: Path, entry: BatchLogEntry) -> None:
    """One JSON line, fsynced; a line cut short by an earlier kill (or a full disk) is closed first, so
    this one parses. An `OutputError` naming the log if the line cannot be written."""
    with writing(log):
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a+b") as fh:
            if fh.tell():
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    fh.write(b"\n")
            fh.write(json.dumps(entry.model_dump(mode="json")).encode() + b"\n")
            fh.flush()
            os.fsync(fh.fileno())


def read_log(log: Path) -> list[dict]:
    """The log's entries as written (`BatchLogEntry`, as JSON); a line a kill cut short is left out."""
    entries = []
    for line in log.read_text().splitlines() if log.is_file() else []:
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    return entries


def recover(output_dir: Path, log: Path) -> None:
    """Under the lock: drop temporary files of killed runs, and log runs whose files were committed but
    whose own log line was never written (killed between the two), so the log accounts for every file."""
    for tmp in [*output_dir.glob("*/.run-*.csv.tmp"), *output_dir.glob(f".{SKIP_RECORD}.*.tmp"),
                *output_dir.glob(f".{CHECKED_HEADS}.*.tmp")]:
        tmp.unlink(missing_ok=True)
    logged = {e.get("run_id") for e in read_log(log)}
    unlogged: dict[str, list[Path]] = {}
    for path in run_files(output_dir):
        run_id = path.stem.removeprefix("run-")
        if run_id not in logged:
            unlogged.setdefault(run_id, []).append(path)
    for run_id, paths in unlogged.items():
        heads = {}
        for path in paths:
            with open(path, newline="") as fh:
                rows = list(csv.DictReader(fh))
            heads[path.parent.name] = HeadLog(file=path_text(path), sha256=rows[0].get("head_sha256") if rows else None,
                                              rows=len(rows))
        ended = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(max(p.stat().st_mtime for p in paths)))
        append_log(log, BatchLogEntry.recovered(
            run_id, heads, ended, "the run was killed after writing these files, before its log line"))


def _file_state(path: str) -> list[int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def _deleted(state: object, path: str) -> bool:
    """A file that existed when it was skipped and is gone now. A listed path that never existed
    ("file not found", no file state) stays: another config may list it and would report it again."""
    return isinstance(state, dict) and state.get("file") is not None and not os.path.exists(path)


def known_skips(output_dir: Path) -> dict[str, dict]:
    """OUTPUT/skipped.json by absolute path: each skip earlier runs reported, with its reason and the
    file's state then. Unreadable or cut short, it counts as empty (every skip is reported again)."""
    try:
        record = output_dir / SKIP_RECORD
        known = json.loads(record.read_text()) if record.is_file() else {}
    except (OSError, ValueError):
        known = {}
    return {os.path.abspath(path): state for path, state in known.items()} if isinstance(known, dict) else {}


def still_broken(known: dict[str, dict], path: str) -> bool:
    """Whether `path` is a file an earlier run skipped and that has not changed (size, mtime) since."""
    state = known.get(os.path.abspath(path))
    return isinstance(state, dict) and state.get("file") is not None and state["file"] == _file_state(path)


def _state(state: object) -> object:
    """What says whether a skip is news: its reason and the file's state, not which config recorded it."""
    return {k: v for k, v in state.items() if k != "config"} if isinstance(state, dict) else state


def record_skips(output_dir: Path, skipped: dict[str, str], looked_at: set[str], config: str) -> list[str]:
    """Merge this run's skips into OUTPUT/skipped.json and return those no earlier run reported. A file
    that stays broken would otherwise make every scheduled run exit 3 forever; it is reported once, and
    again only if it changes (size or mtime) or fails for another reason. Each entry names the config
    (its absolute path) whose run recorded it. Entries this run did not look at leave when that config
    was this one (the path is no longer in any of its inputs) or when the file was deleted; those of
    another config sharing the folder stay; those it read fine leave. `looked_at`: the paths this run
    found in its inputs, or at least those of them that the record holds."""
    record = output_dir / SKIP_RECORD
    known = known_skips(output_dir)
    current = {os.path.abspath(path): {"reason": reason, "file": _file_state(path), "config": config}
               for path, reason in skipped.items()}
    new = [path for path in skipped
           if _state(known.get(os.path.abspath(path))) != _state(current[os.path.abspath(path)])]
    met = {os.path.abspath(path) for path in looked_at}
    kept = {path: state for path, state in known.items() if path not in met and not _deleted(state, path)
            and not (isinstance(state, dict) and state.get("config") == config)}
    merged = kept | current
    if merged != known:
        try:
            # The exact names, to map back to the files on the next run: a name that is not valid UTF-8
            # is kept by JSON's \udcNN escapes (ASCII output), which json.loads returns as the same str.
            write_json_atomic(record, merged, ensure_ascii=True)
        except OutputError as exc:  # the predictions are committed: say so, and report every skip as new
            logger.warning(f"warning: {path_text(str(exc))}")
            return list(skipped)
    return new


def check_log(log: Path) -> None:
    """A log that cannot be written is found before the work, not after it."""
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab"):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot write the run log {log}: {exc.strerror or exc}") from None
