"""The HTML pages: report.html (a run), rank.html (a backbone ranking) and compare.html (transfer vs.
scratch). Each is a Jinja2 template in templates/ rendered from the results alone, with autoescape on,
so every name that comes from a user (class folders, head names, paths, backbones) is escaped by the
template engine. A page is self-contained: its figures, written beside it as PNG files, are inlined as
data URIs and linked."""

from __future__ import annotations

import base64
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from sklearn.metrics import precision_recall_fscore_support

from pipeline.core.io import write_text_atomic
from pipeline.core.paths import path_text
from pipeline.features.extract import FeatureSet
from pipeline.reporting.figures import (
    compare_figure,
    confusion_figure,
    per_class_figure,
    projection_figure,
    rank_figure,
    worst_figure,
)
from pipeline.reporting.trust_figures import coverage_figure, reliability_figure
from pipeline.tuning.compare import compare_rows


def _fmt(value: Any, spec: str) -> str:
    """A number with a format spec ("-" for a missing one): `{{ x|fmt(".1%") }}`."""
    return "-" if value is None else format(value, spec)


@cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("pipeline.reporting", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = _fmt
    return env


def _render(template: str, path: Path, **context: Any) -> Path:
    # path_text: a folder name that is not valid UTF-8 (the output folder's, say) is written as \xNN
    write_text_atomic(path, path_text(_environment().get_template(template).render(**context)))
    return path


def _figure(path: Path, caption: str, href: str | None = None) -> dict:
    """A figure for the `figure` macro: the PNG's bytes (inlined) and its link, `href` when the file is
    not beside the page."""
    return {"href": href or path.name, "caption": caption, "data": base64.b64encode(path.read_bytes()).decode()}


def _optional_figure(path: Path, caption: str, href: str) -> dict | None:
    return _figure(path, caption, href) if path.is_file() else None


def write_report(out: Path, metrics: dict, results: dict, best: str, test: FeatureSet, y_test: np.ndarray,
                 classes: list[str]) -> Path:
    """Write the PNG figures and report.html into `out`; return the HTML path."""
    result = results[best]
    precision, recall, f1, support = precision_recall_fscore_support(
        y_test, result.predicted, labels=range(len(classes)), zero_division=0)
    figures = [
        _figure(confusion_figure(y_test, result.predicted, classes, f"confusion matrix: {best}",
                                 out / "confusion.png"),
                f"Confusion matrix of the best head ({best}) on the test split."),
        _figure(projection_figure(test.features.compute(), y_test, classes,
                                  f"test embeddings, {test.backbone} [{test.layer}], PCA", out / "projection.png"),
                "The test images' embeddings projected to two dimensions (PCA), coloured by true class."),
        _figure(worst_figure(test.paths, y_test, result.proba, classes, out / "worst.png"),
                "Worst-classified test images: the lowest probability given to the true class (red: misclassified)."),
        _figure(per_class_figure(precision, recall, classes, out / "per_class.png"),
                "Per-class precision and recall of the best head."),
    ]
    trust = [
        _figure(reliability_figure({name: (r.proba, r.before, r.fitted.calibration) for name, r in results.items()},
                                   y_test, out / "reliability.png"),
                "Reliability on the test split: accuracy against the top probability, per head, before (grey) and "
                "after its calibration; on the diagonal a probability means what it says. Marker area: images in the "
                "bin (a bin of one or two images swings between 0 and 1)."),
        _figure(coverage_figure({name: (r.proba, r.fitted.decision.reject_threshold) for name, r in results.items()},
                                y_test, out / "coverage.png"),
                "Accuracy-coverage on the test split: each head answering only its most confident images; a diamond "
                "marks where a head's reject threshold puts it."),
    ]
    heads = [{"name": name, **scores}
             for name, scores in sorted(metrics["heads"].items(), key=lambda kv: -kv[1]["accuracy"])]
    per_class = [{"name": c, "precision": p, "recall": r, "f1": f, "support": int(s)}
                 for c, p, r, f, s in zip(classes, precision, recall, f1, support, strict=True)]
    return _render(
        "report.html.j2", out / "report.html", name=out.name, test_images=len(test.paths), classes=classes,
        extract=metrics["extract"], best=best, best_accuracy=result.accuracy, heads=heads, per_class=per_class,
        figures=figures, trust=trust, rank=metrics.get("rank"), finetune=metrics.get("finetune"),
        compare=metrics.get("compare"),
        finetune_figure=_optional_figure(out / "finetune" / "finetune.png",
                                         "Fine-tuning: loss per epoch and test accuracy against the probe.",
                                         "finetune/finetune.png"),
        compare_figure=_optional_figure(out / "compare" / "compare.png",
                                        "Accuracy and time against labelled images per class.",
                                        "compare/compare.png"))


def write_rank_report(out: Path, rows: list) -> Path:
    """rank.html (table, and the score plot when probes ran) plus rank_scores.png in `out`."""
    from pipeline.heads.rank import as_json, spearman

    out.mkdir(parents=True, exist_ok=True)
    agreement = [(label, rho) for score, label in (("logme", "LogME"), ("hscore", "H-score"))
                 if (rho := spearman(rows, score)) is not None]
    figure = None
    if any(r.probe_accuracy is not None for r in rows):
        figure = _figure(rank_figure(rows, out / "rank_scores.png"),
                         "Training-free scores against the cross-validated linear-probe accuracy.")
    return _render("rank.html.j2", out / "rank.html", rows=as_json(rows), agreement=agreement, figure=figure)


def compare_report(out: Path, result: dict) -> Path:
    """compare.png and compare.html (table of means over seeds) in `out`; returns the HTML path."""
    figure = _figure(compare_figure(result, out / "compare.png"),
                     "Transfer against training from scratch on the same k-shot draws.")
    return _render("compare.html.j2", out / "compare.html", train_images=result["train_images"],
                   test_images=result["test_images"], classes=result["classes"],
                   backbone=result["options"]["backbone"], extract_seconds=result["extract_seconds"],
                   rows=compare_rows(result["runs"]), figure=figure)
