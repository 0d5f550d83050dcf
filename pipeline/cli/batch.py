"""`pipeline batch`: the scheduled job's command, its exit codes and what it prints."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.paths import path_text

if TYPE_CHECKING:
    from pipeline.app.batch_state import BatchLogEntry

BATCH_HELP = """The recurring job: scan the config's inputs (a file whose size, mtime, inode and device are as the
cache's stat memo last saw them is not read again), extract features only for images the cache lacks,
apply each saved head to the images it has not predicted yet (a head is loaded only when it has some,
or when OUTPUT/.heads.json has not seen its file as it is now), write OUTPUT/<head>/run-<run_id>.csv and
append one JSON line to the log. Safe to start from cron or a systemd timer: runs take a lock, and a run
killed at any moment is finished by the next one without duplicate rows.

exit codes:
  0  done: every image predicted (or nothing was new)
  1  failed while working; logged with status "failed", committed files are kept, the next run resumes;
     also when the run's log line cannot be written (a full disk): the error on stderr says so
  2  the config or a head file is unusable: nothing was predicted or logged (a head an earlier run
     checked, unchanged since, is loaded only when it has images to predict: one that has become
     unusable, its backbone uninstalled say, is found then, after the scan)
  3  partial: files were skipped that no earlier run reported (unreadable, not images; the first 20 are
     in the log line, all in OUTPUT/skipped.json), all others predicted; a file that stays broken is
     reported once (OUTPUT/skipped.json remembers it)
  4  another batch run holds the lock and --on-lock exit was given
"""


def cmd_batch(args: argparse.Namespace) -> int:
    from pipeline.app.batch import EXIT_LOCKED, load_batch_config, run_batch
    from pipeline.app.batch_state import SKIP_RECORD, LockBusy

    config = load_batch_config(args.config)
    try:
        with _scan_bar(args.quiet) as on_scan:
            entry = run_batch(config, scheduler=args.scheduler, on_lock=args.on_lock, progress=not args.quiet,
                              trust_pickle=args.trust_pickle, rehash=args.rehash, on_scan=on_scan)
    except LockBusy as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_LOCKED
    _print_batch_skips(entry, config.output_dir / SKIP_RECORD)
    for name, head in entry.heads.items():
        print(f"{name}: {head.rows} predictions" + (f" in {head.file}" if head.file else ""))
    fresh = "" if entry.new_skipped is None else f" ({entry.new_skipped} new)"
    print(f"run {entry.run_id}: {entry.status} | files seen: {entry.seen} | new: {entry.new} | "
          f"predicted: {entry.predicted} | skipped: {entry.skipped}{fresh} | "
          f"failed: {entry.failed} | files read: {entry.opened} | feature rows computed: {entry.computed} | "
          f"{entry.seconds:.1f} s")
    if entry.error:
        print(f"error: {entry.error}", file=sys.stderr)
    return entry.exit_code


@contextmanager
def _scan_bar(quiet: bool) -> Iterator[Callable[[int, bool], None] | None]:
    """The scan's progress (files found and identified so far), drawn on stderr from the scan's first
    block (after the lock and the heads) to its end."""
    if quiet:
        yield None
        return
    from tqdm.auto import tqdm

    bars: list[tqdm] = []

    def show(files: int, done: bool) -> None:
        if not bars:
            bars.append(tqdm(unit=" files", desc="scan", disable=None))
        bars[0].update(files - bars[0].n)
        if done:
            bars[0].close()

    try:
        yield show
    finally:
        for bar in bars:
            bar.close()


def _print_batch_skips(entry: BatchLogEntry, record: Path) -> None:
    """New skips as every command summarises skips; those already reported by earlier runs are counted,
    not listed again. The log line keeps the first 20 of each, `record` (OUTPUT/skipped.json) all."""
    from pipeline.cli.skips import print_skips

    listed, count = ((entry.skipped_files, entry.skipped) if entry.new_skipped is None
                     else (entry.new_skipped_files, entry.new_skipped))
    recorded = entry.new_skipped is not None  # a run that failed may not have reached the record
    print_skips([(item.path, item.reason) for item in listed or []], count or 0, record if recorded else None,
                hint="the log line lists the first 20")
    if entry.new_skipped is not None and entry.skipped > entry.new_skipped:
        print(f"{entry.skipped - entry.new_skipped} files skipped as in earlier runs (see {path_text(record)})")


def add_batch_parser(sub: argparse._SubParsersAction) -> None:
    batch = sub.add_parser("batch", help="scheduled job: predict new images with saved heads, append the results",
                           description=BATCH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    batch.add_argument("config", help="YAML batch config (see configs/batch.yaml)")
    batch.add_argument("--scheduler", metavar="ADDRESS",
                       help="dask.distributed scheduler for the extraction (overrides features.scheduler)")
    batch.add_argument("--on-lock", choices=["wait", "exit"], default="wait",
                       help="when another batch run holds the lock: wait for it (default) or exit with code 4")
    batch.add_argument("--trust-pickle", action="store_true",
                       help="also load heads saved by an earlier version (.joblib, a pickle): loading one runs any "
                            "code the file holds, so only for files you trust (as the config's trust_pickle: true)")
    batch.add_argument("--rehash", action="store_true",
                       help="read and hash every input file, even those the cache's stat memo has seen unchanged "
                            "(size, mtime, inode, device), and remember the ids again")
    batch.add_argument("--quiet", action="store_true", help="no progress bars")
    batch.set_defaults(func=cmd_batch)
