"""The `pipeline` command. Errors a user can fix (`PipelineError`) print one line, no traceback."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.errors import PipelineError
from pipeline.core.names import DEFAULT_BACKBONE

if TYPE_CHECKING:
    pass

EPILOG = "Run `pipeline COMMAND --help` for the options of one command."
TRUST_PICKLE_HELP = ("also load a head saved by an earlier version (.joblib, a pickle): loading it runs any code "
                     "the file holds, so only for a file you trust (`pipeline convert-head` rewrites it as .skops)")


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.app.run import run_config
    from pipeline.cli.skips import print_skips

    outcome = run_config(args.config, progress=not args.quiet, overwrite=args.overwrite)
    print_skips(outcome.skipped, full_list=outcome.skip_list)
    return 0


def _skip_list(args: argparse.Namespace, skipped: list[tuple[str, str]], default: Path | None = None) -> None:
    """Print the summary of `skipped`, writing the full list to --skipped FILE (else `default`, if any)."""
    from pipeline.cli.skips import report_skips

    report_skips(skipped, Path(args.skipped) if args.skipped else default)


def _trust_options(args: argparse.Namespace) -> dict:
    """The head keys the trust flags of `pipeline fit` give (none for a flag left out)."""
    options = {key: value for key, value in (("calibration", args.calibration), ("class_weight", args.class_weight),
                                             ("tune_threshold", args.tune_threshold or None)) if value is not None}
    reject = {key: value for key, value in (("threshold", args.reject_threshold),
                                            ("coverage", args.reject_coverage)) if value is not None}
    return {**options, **({"reject": reject} if reject else {})}


def cmd_fit(args: argparse.Namespace) -> int:
    from pipeline.app.fit import fit

    result = fit(args.data, args.type, args.out, args.name, args.backbone, args.source, args.cache,
                 progress=not args.quiet, options=_trust_options(args))
    _skip_list(args, result.skipped)
    fitted = result.fitted
    score = ("no cross-validation (one setting)" if fitted.cv_accuracy is None
             else f"cross-validated accuracy {fitted.cv_accuracy:.1%}"
             + (" (optimistic: see the warning above)" if result.trained_on else ""))
    rule = fitted.decision
    decides = "".join([f"; calibration {fitted.calibration}" if fitted.calibration != "none" else "",
                       f"; unknown below {rule.reject_threshold:.3f}" if rule.reject_threshold is not None else "",
                       f"; threshold {rule.binary_threshold:.3f}" if rule.binary_threshold is not None else ""])
    print(f"{fitted.spec.name}: {score}{decides} ({fitted.fit_seconds:.1f} s); "
          f"saved {result.path} and {result.path.name}.sha256")
    return 0


def _trust_flags(parser: argparse.ArgumentParser) -> None:
    """`pipeline fit`'s flags for the trust options of a head (docs/guide/trust.md)."""
    from pipeline.heads.spec import HEAD_TYPES
    from pipeline.heads.trust_options import CALIBRATIONS, UNKNOWN

    defaults = ", ".join(f"{name} {model.model_fields['calibration'].default}" for name, model in HEAD_TYPES.items())
    parser.add_argument("--calibration", choices=CALIBRATIONS,
                        help="recalibrate the probabilities on cross-validated predictions of the folder: Platt "
                             f"(sigmoid), isotonic, one temperature, or none (default per type: {defaults})")
    reject = parser.add_mutually_exclusive_group()
    reject.add_argument("--reject-threshold", type=float, metavar="P",
                        help=f"answer {UNKNOWN!r} (top class and probability beside it) when the top probability "
                             "is below P, between 0 and 1")
    reject.add_argument("--reject-coverage", type=float, metavar="C",
                        help=f"answer {UNKNOWN!r} below the threshold that keeps the share C (between 0 and 1) of "
                             "the folder's images, on cross-validated probabilities")
    parser.add_argument("--class-weight", choices=["balanced"],
                        help="weigh each class inversely to its images (logistic_regression, svm, pca_fusion)")
    parser.add_argument("--tune-threshold", action="store_true",
                        help="two classes: the threshold on the second class's probability that maximises "
                             "cross-validated balanced accuracy, instead of 0.5 (a degenerate one is refused)")


def cmd_predict(args: argparse.Namespace) -> int:
    from pipeline.cli.skips import skip_list_beside
    from pipeline.heads.predict import predict, write_predictions

    result = predict(args.model, args.data, args.cache, args.device, args.scheduler, progress=not args.quiet,
                     trust_pickle=args.trust_pickle)
    out = write_predictions(result, args.out)
    _skip_list(args, result.report.skipped, skip_list_beside(out))
    print(f"{len(result.proba)} predictions written to {out} ({result.report.summary()})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pipeline.heads.predict import evaluate, predict

    result = predict(args.model, args.data, args.cache, args.device, args.scheduler, progress=not args.quiet,
                     trust_pickle=args.trust_pickle)
    _skip_list(args, result.report.skipped)
    scores = evaluate(result)
    print(f"{args.model} on {args.data}: accuracy {scores['accuracy']:.1%}, macro-F1 {scores['macro_f1']:.3f} "
          f"({scores['images']} images)")
    return 0


def cmd_convert_head(args: argparse.Namespace) -> int:
    from pipeline.heads.bundle import convert_bundle

    bundle = convert_bundle(args.old, args.new, trust_pickle=args.trust_pickle)
    print(f"{bundle.head.name}: wrote {args.new} and {Path(args.new).name}.sha256 from {args.old}")
    return 0


def cmd_rank(args: argparse.Namespace) -> int:
    from pipeline.app.config import extract_settings
    from pipeline.cli.features import overrides
    from pipeline.core.io import write_json_atomic
    from pipeline.heads.rank import as_json, rank, spearman, table
    from pipeline.reporting.pages import write_rank_report

    sources, settings = extract_settings(args.config, args.data, overrides(args))
    data = sources.get("train") or next(iter(sources.values()))
    backbones, layers = settings.pop("backbones", None), settings.pop("layers", None)
    result = rank(data, backbones or [DEFAULT_BACKBONE], layers, args.fusion, progress=not args.quiet,
                  probe=not args.no_probe, **settings)
    _skip_list(args, result.skipped)
    rows = result.rows
    print(table(rows))
    for score, label in (("logme", "LogME"), ("hscore", "H-score")):
        rho = spearman(rows, score)
        if rho is not None:
            print(f"Spearman correlation of {label} with probe accuracy: {rho:+.2f}")
    if args.out:
        write_json_atomic(args.out, as_json(rows))
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


def build_parser() -> argparse.ArgumentParser:
    from pipeline.cli.batch import add_batch_parser
    from pipeline.cli.deploy import add_deploy_parsers
    from pipeline.cli.features import SKIPPED_HELP, add_extract_options, add_feature_parsers, add_offline_option
    from pipeline.cli.options import add_setting
    from pipeline.cli.training import add_compare_parser, add_finetune_parser
    from pipeline.features.settings import DEVICES, ExtractSettings

    parser = argparse.ArgumentParser(
        prog="pipeline", description="Transfer learning for image classification: pretrained CNN features, "
                                     "cached on disk, reused by classical heads.", epilog=EPILOG)
    add_offline_option(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    add_feature_parsers(sub)

    run = sub.add_parser("run", help="run every stage a YAML config names (extract, heads, finetune, compare)",
                         description="Extract (or reuse) features, fit and compare the config's heads, save them, "
                                     "then fine-tune (a finetune: section) and compare transfer with training from "
                                     "scratch (a compare: section); write metrics.json, predictions.csv and "
                                     "report.html to output_dir. The whole config is checked before any work.")
    run.add_argument("config", help="YAML run config (see configs/demo.yaml)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the results in output_dir even when another config wrote them (output_dir/"
                          "run-config.json names it); rerunning the same config needs no flag")
    run.set_defaults(func=cmd_run)

    from pipeline.heads.spec import HEAD_SUFFIX, HEAD_TYPES, OLD_HEAD_SUFFIX

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
    _trust_flags(fit)
    fit.add_argument("--out", required=True, metavar="FILE", help=f"where to save the head ({HEAD_SUFFIX})")
    fit.add_argument("--skipped", metavar="FILE", help=SKIPPED_HELP)
    fit.add_argument("--quiet", action="store_true", help="no progress bar")
    fit.set_defaults(func=cmd_fit)

    for name, func, text in (("predict", cmd_predict, "predict classes of new images with a saved head"),
                             ("evaluate", cmd_evaluate, "score a saved head on a labelled folder")):
        sub_parser = sub.add_parser(name, help=text, description=text + "; images already in the cache are reused.")
        sub_parser.add_argument("--model", required=True, metavar="FILE", help=f"a saved head ({HEAD_SUFFIX})")
        sub_parser.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE_HELP)
        sub_parser.add_argument("--data", required=True, metavar="PATH",
                                help="image folder or a text file listing image paths")
        if name == "predict":
            sub_parser.add_argument("--out", default="predictions.csv", metavar="FILE",
                                    help="CSV to write (default: predictions.csv)")
        sub_parser.add_argument("--skipped", metavar="FILE", help="write the CSV of skipped files here (default: " + (
            "beside --out, NAME.skipped.csv)" if name == "predict" else "none; the first ten are printed)"))
        add_setting(sub_parser, ExtractSettings, "cache_dir", "--cache", metavar="DIR")
        add_setting(sub_parser, ExtractSettings, "device", choices=DEVICES)
        sub_parser.add_argument("--scheduler", metavar="ADDRESS", help="dask.distributed scheduler address")
        sub_parser.add_argument("--quiet", action="store_true", help="no progress bar")
        sub_parser.set_defaults(func=func)

    convert = sub.add_parser(
        "convert-head", help=f"rewrite a head saved by an earlier version ({OLD_HEAD_SUFFIX}) as {HEAD_SUFFIX}",
        description=f"Load a head saved by an earlier version ({OLD_HEAD_SUFFIX}, a pickle: loading it runs any code "
                    f"the file holds, so only convert a file you trust) and save it in the safe format ({HEAD_SUFFIX}, "
                    "with its .sha256). Its predictions are unchanged; `pipeline batch` predicts every image again "
                    "with it, as with any changed head file.")
    convert.add_argument("old", help=f"the old head ({OLD_HEAD_SUFFIX}, with its .sha256 beside it)")
    convert.add_argument("new", help=f"the file to write ({HEAD_SUFFIX})")
    convert.add_argument("--trust-pickle", action="store_true", help="required: you trust OLD (see above)")
    convert.set_defaults(func=cmd_convert_head)

    rank = sub.add_parser("rank", help="rank backbones, layers and fusions on your labelled data",
                          description="Score every candidate (each backbone at each --layer, and each --fusion) "
                                      "on a labelled folder from cached features: LogME and H-score (no training) "
                                      "and the 5-fold CV accuracy of a linear probe (C=0.1 for all), with the "
                                      "extraction cost. Only missing features are extracted.")
    add_extract_options(rank, SKIPPED_HELP)
    rank.add_argument("--fusion", action="append", metavar="A+B",
                      help="a fusion candidate, sources joined by '+' (BACKBONE or BACKBONE:LAYER), repeatable")
    rank.add_argument("--no-probe", action="store_true", help="skip the linear probes (scores only, fastest)")
    rank.add_argument("--out", metavar="FILE", help="write the scores as a JSON list")
    rank.add_argument("--report", default="runs/rank", metavar="DIR",
                      help="where rank.html and rank_scores.png go (default: runs/rank)")
    rank.set_defaults(func=cmd_rank)

    add_finetune_parser(sub)
    add_compare_parser(sub)
    add_deploy_parsers(sub)

    demo = sub.add_parser("demo", help="end-to-end demo on scikit-learn's bundled digits (no download)")
    add_setting(demo, ExtractSettings, "cache_dir", "--cache", metavar="DIR")
    demo.add_argument("--out", default="runs/demo", help="where the demo writes its images (default: runs/demo)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=cmd_demo)
    add_batch_parser(sub)

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


@contextmanager
def _escaped_output() -> Iterator[None]:
    """stdout and stderr write a file name that is not valid UTF-8 as `path_text` does (`bad\\xe9.jpg`),
    so no printed line, error messages included, fails on a name."""
    from pipeline.core.paths import escape_stream

    streams = [(stream, escape_stream(stream)) for stream in (sys.stdout, sys.stderr)]
    try:
        yield
    finally:
        for stream, errors in streams:
            if errors is not None:
                with suppress(ValueError, OSError):  # closed, or a pipe whose reader has gone
                    stream.reconfigure(errors=errors)


def main(argv: list[str] | None = None) -> int:
    with _escaped_output():
        return _main(build_parser().parse_args(argv))


def _main(args: argparse.Namespace) -> int:
    from pipeline.cli.progress import download_bars
    from pipeline.models.download import OFFLINE_ENV

    if args.offline:  # through the environment, so Dask workers and subprocesses inherit it
        os.environ[OFFLINE_ENV] = "1"
    try:
        with _console_log(), download_bars(quiet=getattr(args, "quiet", False)):
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
