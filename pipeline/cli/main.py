"""The `pipeline` command. Errors a user can fix (`PipelineError`) print one line, no traceback."""

from __future__ import annotations

import argparse
import csv
import functools
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.errors import ConfigError, PipelineError
from pipeline.core.names import DEFAULT_BACKBONE

if TYPE_CHECKING:
    from pipeline.app.batch_state import BatchLogEntry

EPILOG = "Run `pipeline COMMAND --help` for the options of one command."


def _add_extract_options(parser: argparse.ArgumentParser) -> None:
    """Each option overrides the config's value (its default is the config's, then the settings')."""
    from pipeline.cli.options import add_setting
    from pipeline.features.settings import DEVICES, PRECISIONS, ExtractSettings

    add = parser.add_argument
    add("--data", metavar="PATH",
        help="image folder (DIR/<class>/<image>), flat folder, or a text file listing one image path per line")
    add("--config", metavar="FILE", help="YAML config with data: and features: sections (see configs/)")
    add("--backbone", metavar="NAME", action="append",
        help=f"registered backbone, repeatable (default: {DEFAULT_BACKBONE}; list: pipeline backbones)")
    add("--layer", metavar="LAYER", action="append",
        help="tap point, NAME or BACKBONE:NAME, repeatable (default: each backbone's last feature block)")
    setting = functools.partial(add_setting, parser, ExtractSettings, override=True)
    setting("cache_dir", "--cache", metavar="DIR")
    setting("device", choices=DEVICES)
    setting("precision", choices=PRECISIONS)
    setting("batch_size", metavar="N", type=int)
    setting("shard_size", metavar="N", type=int)
    setting("scheduler", metavar="ADDRESS")
    setting("weights", metavar="PATH")
    add("--skipped", metavar="FILE", help="where to write the CSV of skipped files (default: CACHE/skipped.csv)")
    add("--quiet", action="store_true", help="no progress bar")


def cmd_extract(args: argparse.Namespace) -> int:
    from pipeline.app.config import extract_settings
    from pipeline.features.extract import extract

    sources, settings = extract_settings(args)
    skipped: list[tuple[str, str]] = []
    for split, folder in sources.items():
        if len(sources) > 1:
            print(f"== {split}: {folder}")
        report = extract(folder, progress=not args.quiet, **settings)
        for (backbone, layer), fs in report.feature_sets.items():
            print(f"{backbone} [{layer}]: {fs.features.shape[0]} x {fs.features.shape[1]} features "
                  f"in {Path(settings['cache_dir']) / fs.cache_key}")
        for path, reason in report.skipped[:10]:
            print(f"skipped {path}: {reason}")
        if len(report.skipped) > 10:
            print(f"... and {len(report.skipped) - 10} more")
        print(report.summary())
        skipped += report.skipped
    skipped_csv = Path(args.skipped) if args.skipped else Path(settings["cache_dir"]) / "skipped.csv"
    _write_skipped(skipped_csv, skipped)
    if skipped:
        print(f"skip list ({len(skipped)} files, with reasons): {skipped_csv}")
    return 0


def _write_skipped(path: Path, skipped: list[tuple[str, str]]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path", "reason"])
            writer.writerows(skipped)
    except OSError as exc:
        raise ConfigError(f"cannot write the skip list {path}: {exc.strerror or exc}") from None


def _human_bytes(size: float) -> str:
    unit = "B"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            break
        size /= 1024
    return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"


def cmd_cache(args: argparse.Namespace) -> int:
    from pipeline.features.cache import FeatureStore, clean_staging

    stores = FeatureStore.all_in(args.cache)
    if args.action == "ls":
        if not stores:
            print(f"no feature caches in {args.cache}")
        rows = [s.summary() for s in stores]
        width = max([len(r["key"]) for r in rows] + [3])
        if rows:
            print(f"{'key':<{width}}  {'backbone':<20} {'layer':<8} {'dim':>5} {'rows':>7} {'shards':>6} size")
        for r in rows:
            print(f"{r['key']:<{width}}  {r['backbone']:<20} {r['layer']:<8} {r['dim']:>5} {r['rows']:>7} "
                  f"{r['shards']:>6} {_human_bytes(r['bytes'])}")
        return 0
    if args.action == "verify":
        problems = [p for s in stores for p in s.verify()]
        orphans = sum(len(s.orphans()) for s in stores)
        for problem in problems:
            print(problem)
        shards = sum(len(s.records()) for s in stores)
        print(f"checked {shards} shards in {len(stores)} caches: "
              f"{'OK' if not problems else f'{len(problems)} problems (pipeline cache gc drops them)'}"
              + (f"; {orphans} unreferenced arrays (harmless, gc removes them after an hour)" if orphans else ""))
        return 1 if problems else 0
    removed = [r for s in stores for r in s.gc()] + clean_staging(args.cache)
    for line in removed:
        print(f"removed {line}")
    print(f"gc: removed {len(removed)} items")
    return 0


def cmd_backbones(_args: argparse.Namespace) -> int:
    from pipeline.models.registry import get_spec, list_backbones

    for name in list_backbones():
        spec = get_spec(name)
        try:
            weights = str(spec.locate_weights())
        except PipelineError:
            weights = "weights not on disk (pass --weights PATH; see docs/guide/extract.md)"
        layers = ", ".join(f"{k}:{v.dim}" + ("*" if k == spec.default_layer else "")
                           for k, v in spec.layers.items())
        pre = spec.preprocess
        print(f"{name}\n  {spec.source}\n  weights: {weights}\n  input: resize {pre.resize}, crop {pre.crop}, "
              f"{pre.interpolation}\n  layers (name:dim, * = default): {layers}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.app.run import run

    run(args.config, progress=not args.quiet)
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from pipeline.app.fit import fit

    result = fit(args.data, args.type, args.out, args.name, args.backbone, args.source, args.cache,
                 progress=not args.quiet)
    cv = result.fitted.cv_accuracy
    score = "no cross-validation (one setting)" if cv is None else f"cross-validated accuracy {cv:.1%}"
    print(f"{result.fitted.spec.name}: {score} ({result.fitted.fit_seconds:.1f} s); "
          f"saved {result.path} and {result.path.name}.sha256")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from pipeline.heads.predict import predict, write_predictions

    result = predict(args.model, args.data, args.cache, args.device, args.scheduler, progress=not args.quiet)
    out = write_predictions(result, args.out)
    for path, reason in result.report.skipped:
        print(f"skipped {path}: {reason}")
    print(f"{len(result.proba)} predictions written to {out} ({result.report.summary()})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pipeline.heads.predict import evaluate, predict

    scores = evaluate(predict(args.model, args.data, args.cache, args.device, args.scheduler,
                              progress=not args.quiet))
    print(f"{args.model} on {args.data}: accuracy {scores['accuracy']:.1%}, macro-F1 {scores['macro_f1']:.3f} "
          f"({scores['images']} images)")
    return 0


def cmd_rank(args: argparse.Namespace) -> int:
    import json

    from pipeline.app.config import extract_settings
    from pipeline.heads.rank import as_json, rank, spearman, table
    from pipeline.reporting.report import write_rank_report

    sources, settings = extract_settings(args)
    data = sources.get("train") or next(iter(sources.values()))
    backbones, layers = settings.pop("backbones", None), settings.pop("layers", None)
    rows = rank(data, backbones or [DEFAULT_BACKBONE], layers, args.fusion, progress=not args.quiet,
                probe=not args.no_probe, **settings)
    print(table(rows))
    for score, label in (("logme", "LogME"), ("hscore", "H-score")):
        rho = spearman(rows, score)
        if rho is not None:
            print(f"Spearman correlation of {label} with probe accuracy: {rho:+.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(as_json(rows), indent=1))
        print(f"scores: {args.out}")
    print(f"best by LogME: {rows[0].candidate}; report: {write_rank_report(Path(args.report), rows)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.app.demo import run_demo

    run_demo(cache_dir=args.cache, out_dir=args.out, progress=not args.quiet)
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from pipeline.app.schema import write_reference

    for path in write_reference(Path(args.out)):
        print(f"wrote {path}")
    return 0


BATCH_HELP = """The recurring job: scan the config's inputs, extract features only for images the cache lacks,
apply each saved head to the images it has not predicted yet, write OUTPUT/<head>/run-<run_id>.csv and
append one JSON line to the log. Safe to start from cron or a systemd timer: runs take a lock, and a run
killed at any moment is finished by the next one without duplicate rows.

exit codes:
  0  done: every image predicted (or nothing was new)
  1  failed while working; logged with status "failed", committed files are kept, the next run resumes
  2  the config or a head file is unusable: nothing ran, nothing was logged
  3  partial: files were skipped that no earlier run reported (unreadable, not images; the first 20 are
     in the log line, all in OUTPUT/skipped.json), all others predicted; a file that stays broken is
     reported once (OUTPUT/skipped.json remembers it)
  4  another batch run holds the lock and --on-lock exit was given
"""


def cmd_batch(args: argparse.Namespace) -> int:
    from pipeline.app.batch import EXIT_LOCKED, run_batch
    from pipeline.app.batch_state import LockBusy

    try:
        entry = run_batch(args.config, scheduler=args.scheduler, on_lock=args.on_lock, progress=not args.quiet)
    except LockBusy as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_LOCKED
    _print_batch_skips(entry)
    for name, head in entry.heads.items():
        print(f"{name}: {head.rows} predictions" + (f" in {head.file}" if head.file else ""))
    fresh = "" if entry.new_skipped is None else f" ({entry.new_skipped} new)"
    print(f"run {entry.run_id}: {entry.status} | files seen: {entry.seen} | new: {entry.new} | "
          f"predicted: {entry.predicted} | skipped: {entry.skipped}{fresh} | "
          f"failed: {entry.failed} | feature rows computed: {entry.computed} | {entry.seconds:.1f} s")
    if entry.error:
        print(f"error: {entry.error}", file=sys.stderr)
    return entry.exit_code


def _print_batch_skips(entry: BatchLogEntry) -> None:
    """New skips first: those already reported by earlier runs are counted, not listed again."""
    listed, count = ((entry.skipped_files, entry.skipped) if entry.new_skipped is None
                     else (entry.new_skipped_files, entry.new_skipped))
    for item in listed[:10]:
        print(f"skipped {item.path}: {item.reason}")
    if count > 10:
        print(f"... and {count - 10} more (the log line lists the first 20)")
    if entry.new_skipped is not None and entry.skipped > entry.new_skipped:
        print(f"{entry.skipped - entry.new_skipped} files skipped as in earlier runs (see skipped.json "
              "in the output folder)")


def _add_batch_parser(sub: argparse._SubParsersAction) -> None:
    batch = sub.add_parser("batch", help="scheduled job: predict new images with saved heads, append the results",
                           description=BATCH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    batch.add_argument("config", help="YAML batch config (see configs/batch.yaml)")
    batch.add_argument("--scheduler", metavar="ADDRESS",
                       help="dask.distributed scheduler for the extraction (overrides features.scheduler)")
    batch.add_argument("--on-lock", choices=["wait", "exit"], default="wait",
                       help="when another batch run holds the lock: wait for it (default) or exit with code 4")
    batch.add_argument("--quiet", action="store_true", help="no progress bar")
    batch.set_defaults(func=cmd_batch)


def build_parser() -> argparse.ArgumentParser:
    from pipeline.cli.options import add_setting
    from pipeline.cli.training import add_compare_parser, add_finetune_parser
    from pipeline.features.settings import DEVICES, ExtractSettings

    parser = argparse.ArgumentParser(
        prog="pipeline", description="Transfer learning for image classification: pretrained CNN features, "
                                     "cached on disk, reused by classical heads.", epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    extract = sub.add_parser("extract", help="embed images with frozen backbones into the feature cache",
                             description="Embed images with frozen pretrained backbones into the sharded "
                                         "feature cache; only images missing from the cache are computed.")
    _add_extract_options(extract)
    extract.set_defaults(func=cmd_extract)

    cache = sub.add_parser("cache", help="list, verify or clean the feature cache",
                           description="ls: keys, rows and size; verify: re-check every shard against its "
                                       "completion record; gc: drop damaged shards and leftovers.")
    cache.add_argument("action", choices=["ls", "verify", "gc"])
    add_setting(cache, ExtractSettings, "cache_dir", "--cache", metavar="DIR")
    cache.set_defaults(func=cmd_cache)

    backbones = sub.add_parser("backbones", help="list registered backbones, their layers and weights")
    backbones.set_defaults(func=cmd_backbones)

    run = sub.add_parser("run", help="run every stage a YAML config names (extract, heads, finetune, compare)",
                         description="Extract (or reuse) features, fit and compare the config's heads, save them, "
                                     "then fine-tune (a finetune: section) and compare transfer with training from "
                                     "scratch (a compare: section); write metrics.json, predictions.csv and "
                                     "report.html to output_dir. The whole config is checked before any work.")
    run.add_argument("config", help="YAML run config (see configs/demo.yaml)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.set_defaults(func=cmd_run)

    from pipeline.heads.spec import HEAD_TYPES

    fit = sub.add_parser("fit", help="fit one head on a labelled folder and save it",
                         description="Fit one head on cached features of a labelled folder (extracting what is "
                                     "missing), choosing its settings by cross-validation, and save the bundle.")
    fit.add_argument("--data", required=True, metavar="DIR", help="labelled image folder (DIR/<class>/<image>)")
    fit.add_argument("--type", required=True, choices=list(HEAD_TYPES), help="head type")
    fit.add_argument("--name", default="head", help="name recorded in the bundle (default: head)")
    fit.add_argument("--backbone", action="append", metavar="NAME", help="backbone(s) to use, repeatable")
    fit.add_argument("--source", action="append", metavar="BACKBONE[:LAYER]",
                     help="feature source(s); several for pca_fusion (default: the first backbone's default layer)")
    add_setting(fit, ExtractSettings, "cache_dir", "--cache", metavar="DIR")
    fit.add_argument("--out", required=True, metavar="FILE", help="where to save the head (.joblib)")
    fit.add_argument("--quiet", action="store_true", help="no progress bar")
    fit.set_defaults(func=cmd_fit)

    for name, func, text in (("predict", cmd_predict, "predict classes of new images with a saved head"),
                             ("evaluate", cmd_evaluate, "score a saved head on a labelled folder")):
        sub_parser = sub.add_parser(name, help=text, description=text + "; images already in the cache are reused.")
        sub_parser.add_argument("--model", required=True, metavar="FILE", help="a saved head (.joblib)")
        sub_parser.add_argument("--data", required=True, metavar="PATH",
                                help="image folder or a text file listing image paths")
        if name == "predict":
            sub_parser.add_argument("--out", default="predictions.csv", metavar="FILE",
                                    help="CSV to write (default: predictions.csv)")
        add_setting(sub_parser, ExtractSettings, "cache_dir", "--cache", metavar="DIR")
        add_setting(sub_parser, ExtractSettings, "device", choices=DEVICES)
        sub_parser.add_argument("--scheduler", metavar="ADDRESS", help="dask.distributed scheduler address")
        sub_parser.add_argument("--quiet", action="store_true", help="no progress bar")
        sub_parser.set_defaults(func=func)

    rank = sub.add_parser("rank", help="rank backbones, layers and fusions on your labelled data",
                          description="Score every candidate (each backbone at each --layer, and each --fusion) "
                                      "on a labelled folder from cached features: LogME and H-score (no training) "
                                      "and the 5-fold CV accuracy of a linear probe (C=0.1 for all), with the "
                                      "extraction cost. Only missing features are extracted.")
    _add_extract_options(rank)
    rank.add_argument("--fusion", action="append", metavar="A+B",
                      help="a fusion candidate, sources joined by '+' (BACKBONE or BACKBONE:LAYER), repeatable")
    rank.add_argument("--no-probe", action="store_true", help="skip the linear probes (scores only, fastest)")
    rank.add_argument("--out", metavar="FILE", help="write the scores as a JSON list")
    rank.add_argument("--report", default="runs/rank", metavar="DIR",
                      help="where rank.html and rank_scores.png go (default: runs/rank)")
    rank.set_defaults(func=cmd_rank)

    add_finetune_parser(sub)
    add_compare_parser(sub)

    demo = sub.add_parser("demo", help="end-to-end demo on scikit-learn's bundled digits (no download)")
    add_setting(demo, ExtractSettings, "cache_dir", "--cache", metavar="DIR")
    demo.add_argument("--out", default="runs/demo", help="where the demo writes its images (default: runs/demo)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=cmd_demo)
    _add_batch_parser(sub)

    schema = sub.add_parser("schema", description="Write the config reference (config.md) and the JSON Schemas "
                                                   "of the run and batch configs, generated from their models.")
    schema.add_argument("--out", default="docs/reference", metavar="DIR", help="(default: %(default)s)")
    schema.set_defaults(func=cmd_schema)  # for maintainers: no help=, so it is not listed
    return parser


class _Console(logging.Handler):
    """The library's log as the command's output: information on stdout, warnings on stderr, the message
    alone. The streams are looked up per record, so a redirected sys.stdout is honoured."""

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        stream.write(self.format(record) + "\n")
        stream.flush()


@contextmanager
def _console_log() -> Iterator[None]:
    logger = logging.getLogger("pipeline")
    handler, level = _Console(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _console_log():
            return args.func(args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: completed shards are kept; rerun to finish the rest", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
