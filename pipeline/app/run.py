"""`pipeline run CONFIG`: extract (or reuse) features, fit and compare every head, save, report.

Writes into `output_dir`: `metrics.json` (the contract other tools read, typed by `RunMetrics` and
validated before it is written), `heads/<name>.skops`
bundles with their checksums, `predictions.csv` for the test split, and the HTML report; with a
`finetune:` section the fine-tuned backbone, with a `compare:` section the transfer-vs-scratch
comparison in `compare/`, both summarised in metrics.json and the report.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.app import tracking
from pipeline.app.config import (
    RunConfig,
    auto_candidates,
    compare_options,
    finetune_options,
    head_specs,
)
from pipeline.app.scoring import HeadResult, HeadScores, Record, head_scores, score_head
from pipeline.app.skiplist import write_skip_list
from pipeline.app.stage3 import run_compare, run_finetune
from pipeline.core.errors import ConfigError
from pipeline.core.io import atomic_write, write_json_atomic
from pipeline.core.names import DEFAULT_BACKBONE
from pipeline.core.paths import path_text
from pipeline.features.extract import ExtractReport, FeatureSet, extract
from pipeline.features.sources import feature_set, matrix, source_meta
from pipeline.features.trained_on import TEST_ELSEWHERE, TESTED, warn_trained_on
from pipeline.heads.bundle import HeadBundle, save_bundle
from pipeline.heads.calibration import uncalibrated
from pipeline.heads.decision import DecisionRule, answer_cells, answer_columns
from pipeline.heads.fit import FittedHead, fit_head
from pipeline.heads.outofcore import fit_incremental, matrix_bytes, predict_proba_blocks
from pipeline.heads.rank import RankRow, rank, table
from pipeline.heads.spec import HEAD_SUFFIX
from pipeline.heads.zero_shot import check_source, prior_for
from pipeline.images.data import Dataset, require_labelled, scan, test_labels
from pipeline.tuning.compare import CompareOptions, compare_rows
from pipeline.tuning.finetune import FinetuneOptions

logger = logging.getLogger(__name__)


class ExtractTotals(Record):
    """Images of both splits: those whose features were computed, reused from the cache, skipped."""

    images: int
    computed: int
    reused: int
    skipped: int
    seconds: float


class FinetuneScores(Record):
    accuracy: float
    macro_f1: float
    seconds: float
    backbone: str  # the saved backbone's id
    probe_accuracy: float | None
    best_epoch: int
    kept: str  # fine-tuned | probe (nothing trained beat it on the held-out part) | initial | ensemble


class CompareRow(Record):
    """One method at one k: means over the seeds."""

    method: str
    shots: str  # k, or "all"
    accuracy: float
    std: float
    seconds: float
    images: float
    seeds: int


class CompareTotals(Record):
    summary: list[CompareRow]
    extract_seconds: float
    results: str  # compare/compare.json, relative to output_dir


class RunMetrics(Record):
    """metrics.json, the contract other tools read; `rank`, `finetune` and `compare` are there only when
    the run did them (backbones: auto, a finetune: section, a compare: section)."""

    heads: dict[str, HeadScores]
    best_head: str
    extract: ExtractTotals
    classes: list[str]
    rank: list[RankRow] | None = None
    finetune: FinetuneScores | None = None
    compare: CompareTotals | None = None

    def to_json(self) -> dict:
        return self.model_dump(mode="json", exclude={k for k in ("rank", "finetune", "compare")
                                                    if getattr(self, k) is None})


def _labelled_splits(config: RunConfig) -> dict[str, Dataset]:
    """Scan both splits before any work: each must be a labelled folder, test classes known to train."""
    splits = {}
    for split in ("train", "test"):
        if split not in config.data:
            raise config.error(("data",), "'data' needs both train: and test: folders for a run")
        where = config.where(("data", split))
        splits[split] = require_labelled(scan(config.data[split]), f"{where}: 'data.{split}'")
        empty = splits[split].empty_classes
        if empty:  # a head would never predict such a class, and the scores would not say so
            folders = ", ".join(path_text(config.data[split] / name) for name in empty)
            raise config.error(("data", split), f"'data.{split}': class folder{'s' if len(empty) > 1 else ''} "
                                                f"with no images: {folders} (a run needs images in every class "
                                                "folder: add them, or remove the folder)")
    test_labels(splits["train"].class_names, splits["test"], f"{config.where(('data', 'test'))}: 'data.test'")
    return splits


def _check_rows(train: FeatureSet, test: FeatureSet) -> None:
    """Every class needs a training row (or the probability columns would not match the classes)."""
    counts = np.bincount(train.labels, minlength=len(train.class_names))
    empty = [train.class_names[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise ConfigError(f"no usable training image in class {', '.join(empty)} (see the skipped files)")
    if not len(test.labels):
        raise ConfigError("no usable test image (see the skipped files)")


def _sum_reports(reports: list[ExtractReport]) -> ExtractTotals:
    return ExtractTotals(images=sum(r.images for r in reports), computed=sum(r.computed for r in reports),
                         reused=sum(r.reused for r in reports), skipped=sum(len(r.skipped) for r in reports),
                         seconds=round(sum(r.seconds for r in reports), 3))


def _rank_candidates(train: Dataset, config: RunConfig, progress: bool) -> list[RankRow]:
    """`backbones: auto`: LogME of every candidate's default layer on the training split (no probes:
    the point is to skip training a model per candidate); best first."""
    options = config.features.model_dump(exclude={"backbones", "candidates", "layers", "weights"})
    rows = rank(train, auto_candidates(config.features.candidates), probe=False, progress=progress, **options).rows
    logger.info(table(rows))
    logger.info(f"backbones: auto chose {rows[0].candidate.split(':')[0]} (highest LogME on the training split)")
    return rows


SKIP_LIST = "skipped.csv"  # in output_dir: every file either split skipped, with its reason
OWNER = "run-config.json"  # in output_dir: {"config": the absolute path of the config that writes there}


@dataclass
class RunOutcome:
    metrics: dict  # as written to metrics.json (`RunMetrics`)
    skipped: list[tuple[str, str]]  # (path, reason) of every file either split skipped
    skip_list: Path  # output_dir/skipped.csv, which lists them


def run(config_path: str | Path, progress: bool = True, config: RunConfig | None = None,
        overwrite: bool = False) -> dict:
    """Run every stage the config names; return the metrics written to metrics.json (`RunMetrics`).

    `config`, when given, is an already-parsed config (the demo builds its own); `config_path` is then
    unused, the config names its own source in messages. An output_dir that another config wrote is
    refused unless `overwrite` (`_claim`)."""
    return run_config(config_path, progress, config, overwrite).metrics


def _check_owner(config: RunConfig, out: Path, overwrite: bool) -> bool:
    """Refuse an output_dir whose OWNER file names another config (its results would be replaced
    silently), unless `overwrite`; rerunning the same config is fine, and so is a folder without the
    file (new, or written before there was one). Whether this config is to be named there."""
    marker = out / OWNER
    try:
        owner = json.loads(marker.read_text())["config"]
    except FileNotFoundError:
        return True
    except (OSError, ValueError, KeyError, TypeError):
        owner = f"unknown: {path_text(marker)} cannot be read"
    if owner == _identity(config):
        return False
    if not overwrite:
        raise config.error(("output_dir",), f"'output_dir': {path_text(out)} holds the results of another "
                                            f"config ({owner}); choose another output_dir, or pass --overwrite to "
                                            "replace them")
    return True


def _identity(config: RunConfig) -> str:
    return path_text(os.path.abspath(config.path))


def run_config(config_path: str | Path | None, progress: bool = True, config: RunConfig | None = None,
               overwrite: bool = False) -> RunOutcome:
    """`run`, with the files skipped on the way (also written to `output_dir/skipped.csv`, on every run,
    so the list never describes an earlier one)."""
    config = config or RunConfig.load(config_path)
    specs = head_specs(config)  # validated before any work starts
    if config.tracking is not None and not tracking.installed():
        raise config.error(("tracking",), tracking.MISSING)
    if not config.output_dir:
        raise config.error((), "'output_dir' is required")
    splits = _labelled_splits(config)
    out = Path(config.output_dir)
    claim = _check_owner(config, out, overwrite)  # before anything is written there
    try:
        (out / "heads").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise config.error(("output_dir",), f"'output_dir': cannot create {out}: {exc.strerror or exc}") from None
    if claim:
        write_json_atomic(out / OWNER, {"config": _identity(config)})
    features = config.features.model_dump(exclude={"candidates"})
    ranking = None
    if features["backbones"] == "auto":  # the stage sections are checked before ranking extracts
        stand_in = {**features, "backbones": auto_candidates(config.features.candidates)[:1]}
        finetune_options(config, out, stand_in)
        compare_options(config, out, stand_in)
        ranking = _rank_candidates(splits["train"], config, progress)
        chosen = config.features.model_copy(update={"backbones": [ranking[0].candidate.split(":")[0]]})
        config = config.model_copy(update={"features": chosen})
        specs = head_specs(config)
        features["backbones"] = chosen.backbones
    for spec in specs:  # a zero-shot head's backbone is checked before any extraction
        check_source(spec)
    features["backbones"] = features["backbones"] or [DEFAULT_BACKBONE]
    features["layers"] = sorted({s for spec in specs for s in spec.sources})
    cache_dir = Path(features["cache_dir"])
    stage3 = finetune_options(config, out, features)  # both checked before any extraction
    comparison = compare_options(config, out, features)

    reports = {split: extract(splits[split], progress=progress, **features) for split in ("train", "test")}
    skipped = [item for split in ("train", "test") for item in reports[split].skipped]
    write_skip_list(out / SKIP_LIST, skipped)  # before the heads: a run that stops later still names them
    train_sets, test_sets = reports["train"].feature_sets, reports["test"].feature_sets
    warn_trained_on(train_sets.values(), "'data.train'")
    warn_trained_on(test_sets.values(), "'data.test'", TESTED, TEST_ELSEWHERE)
    first, test_first = feature_set(train_sets, specs[0].sources[0]), feature_set(test_sets, specs[0].sources[0])
    _check_rows(first, test_first)
    y_train = first.labels
    y_test = test_labels(first.class_names, test_first, "'data.test'")
    classes = first.class_names

    results: dict[str, HeadResult] = {}
    budget = config.memory_budget_mb * 2**20
    for spec in specs:
        train_sources = [feature_set(train_sets, s).features for s in spec.sources]
        test_sources = [feature_set(test_sets, s).features for s in spec.sources]
        before = None
        prior = prior_for(spec, classes, features["weights"])
        if matrix_bytes(train_sources) > budget and prior is None:  # zero-shot classifiers are fitted in memory
            logger.info(f"{spec.name}: training features exceed memory_budget_mb={config.memory_budget_mb}; "
                        "fitting out of core, block by block")
            fitted = _out_of_core_rule(fit_incremental(spec, train_sources, y_train))
            proba = predict_proba_blocks(fitted.pipeline, test_sources)
        else:
            X_train, dims = matrix(train_sets, spec.sources)
            fitted = fit_head(spec, X_train, y_train, dims, scheduler=features["scheduler"], class_names=classes,
                              prior=prior)
            X_test = matrix(test_sets, spec.sources)[0]
            proba = fitted.pipeline.predict_proba(X_test)
            plain = uncalibrated(fitted.pipeline, fitted.calibration)
            before = None if plain is None else plain.predict_proba(X_test)
        result = score_head(fitted, proba, before, y_test)
        results[spec.name] = result
        sources = source_meta(train_sets, spec.sources, cache_dir, features["weights"])
        save_bundle(out / "heads" / f"{spec.name}{HEAD_SUFFIX}",
                    HeadBundle.of(fitted, classes, sources, accuracy=result.accuracy, macro_f1=result.macro_f1,
                                  balanced_accuracy=result.balanced_accuracy))
        logger.info(f"{spec.name} ({spec.type} on {' + '.join(spec.sources)}): test accuracy {result.accuracy:.1%}, "
                    f"macro-F1 {result.macro_f1:.3f}, balanced accuracy {result.balanced_accuracy:.1%}, "
                    f"fit {fitted.fit_seconds:.1f} s")

    best = max(results, key=lambda name: (results[name].accuracy, results[name].macro_f1))
    metrics = RunMetrics(
        heads={name: head_scores(r, y_test) for name, r in results.items()},
        best_head=best, extract=_sum_reports(list(reports.values())), classes=classes, rank=ranking or None,
        finetune=_finetune(stage3, progress) if stage3 is not None else None,
        compare=_compare(comparison, progress) if comparison is not None else None).to_json()
    write_json_atomic(out / "metrics.json", metrics, allow_nan=False)
    _write_predictions(out / "predictions.csv", test_first, y_test, classes, best, results[best])

    from pipeline.reporting.pages import write_report

    report = write_report(out, metrics, results, best, test_first, y_test, classes)
    logger.info(f"best head: {best} ({results[best].accuracy:.1%}); metrics: {path_text(out / 'metrics.json')}")
    logger.info(f"report: {path_text(report)}")
    if config.tracking is not None:
        tracking.track_run(config.tracking, out, config.model_dump(mode="json"), metrics)
    return RunOutcome(metrics, skipped, out / SKIP_LIST)


def _out_of_core_rule(fitted: FittedHead) -> FittedHead:
    """An out-of-core head keeps a given reject threshold; what needs folds of the training rows in memory
    (calibration, a reject coverage, a tuned threshold, class weights) is not done, and the log says so."""
    opts = fitted.spec.options
    reject = opts.get("reject") or {}
    skipped = [name for name, wanted in (("calibration", opts.get("calibration", "none") != "none"),
                                         ("reject coverage", reject.get("coverage") is not None),
                                         ("tune_threshold", bool(opts.get("tune_threshold"))),
                                         ("class_weight", opts.get("class_weight") is not None)) if wanted]
    if skipped:
        logger.warning(f"{fitted.spec.name}: fitted out of core without {', '.join(skipped)} (each needs the "
                       "training features in memory; raise memory_budget_mb to have them)")
    fitted.decision = DecisionRule(reject_threshold=reject.get("threshold"))
    return fitted


def _finetune(options: FinetuneOptions, progress: bool) -> FinetuneScores:
    """Stage 3 from the config's finetune: section; the new backbone's id goes into metrics.json."""
    result = run_finetune(options, progress=progress).metrics
    probe = result["probe_accuracy"]
    logger.info(f"finetune: backbone {result['backbone']} saved; test accuracy {result['accuracy']:.1%}"
                + ("" if probe is None else f" (linear probe alone {probe:.1%})"))
    return FinetuneScores(**{key: result[key] for key in FinetuneScores.model_fields})


def _compare(options: CompareOptions, progress: bool) -> CompareTotals:
    """The config's compare: section; metrics.json keeps the means over seeds, compare/ everything."""
    result = run_compare(options, progress=progress)
    logger.info(f"compare: {Path(options.out) / 'compare.json'}")
    return CompareTotals(summary=[CompareRow(**row) for row in compare_rows(result["runs"])],
                         extract_seconds=result["extract_seconds"],
                         results=str(Path(options.out).name) + "/compare.json")


def _write_predictions(path: Path, test: FeatureSet, y_test: np.ndarray, classes: list[str], head: str,
                       result: HeadResult) -> None:
    rule = result.fitted.decision
    answers = answer_cells(rule, result.decisions, classes)
    with atomic_write(path, newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "image_id", "true_class", *answer_columns(rule), "head",
                         *[f"p_{c}" for c in classes]])
        for i, (p, image_id) in enumerate(zip(test.paths, test.image_ids, strict=True)):
            writer.writerow([path_text(p), image_id, classes[y_test[i]], *answers[i], head,
                             *[f"{v:.6f}" for v in result.proba[i]]])
