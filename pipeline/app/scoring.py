"""A run's scores of one head on the test split: what metrics.json says about it (`HeadScores`) and what
the report draws from (`HeadResult`): accuracy, macro-F1 and balanced accuracy of its decisions,
calibration (ECE, log-loss) before and after, and what its reject threshold answered."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict
from sklearn.metrics import accuracy_score, f1_score

from pipeline.heads.decision import Decisions, decide
from pipeline.heads.fit import FittedHead
from pipeline.heads.scores import balanced_accuracy, calibration_scores


class Record(BaseModel):
    """A part of metrics.json: strict, no unknown keys."""

    model_config = ConfigDict(extra="forbid", strict=True)


class ProbabilityScores(Record):
    ece: float  # expected calibration error, 15 equal-width bins of the top probability
    log_loss: float


class CalibrationScores(ProbabilityScores):
    """The head's probabilities on the test split; `before`: the same head without its calibration."""

    method: str
    before: ProbabilityScores | None  # None: calibration none


class RejectScores(Record):
    """The reject threshold and what it did on the test split."""

    threshold: float
    train_coverage: float | None  # the coverage it was set for on the training folder (None: a given threshold)
    coverage: float  # share of test images answered with a class
    accuracy: float | None  # on those answered (None: none was)


class HeadScores(Record):
    accuracy: float  # on the test split (every image: a rejected one counts with its top class)
    macro_f1: float
    balanced_accuracy: float
    fit_seconds: float
    cv_accuracy: float | None  # None: a single setting, fitted without cross-validation
    best_params: dict[str, Any]
    type: str
    sources: list[str]  # BACKBONE:LAYER
    calibration: CalibrationScores
    reject: RejectScores | None = None
    decision_threshold: float | None = None  # two-class heads with tune_threshold
    decision_threshold_refused: str | None = None  # why the tuned threshold was refused (0.5 kept)


@dataclass
class HeadResult:
    fitted: FittedHead
    accuracy: float
    macro_f1: float
    balanced_accuracy: float
    predicted: np.ndarray  # class indices (a rejected image's top class)
    proba: np.ndarray
    decisions: Decisions
    before: np.ndarray | None  # the probabilities without calibration (None: calibration none)


def score_head(fitted: FittedHead, proba: np.ndarray, before: np.ndarray | None, y_test: np.ndarray) -> HeadResult:
    decisions = decide(fitted.decision, proba)
    predicted = fitted.pipeline.classes_[decisions.label]
    return HeadResult(fitted, float(accuracy_score(y_test, predicted)),
                      float(f1_score(y_test, predicted, average="macro")), balanced_accuracy(y_test, predicted),
                      predicted, proba, decisions, before)


def head_scores(result: HeadResult, y_test: np.ndarray) -> HeadScores:
    fitted = result.fitted
    calibration = CalibrationScores(
        method=fitted.calibration, **calibration_scores(y_test, result.proba),
        before=None if result.before is None else ProbabilityScores(**calibration_scores(y_test, result.before)))
    rule, reject = fitted.decision, None
    if rule.reject_threshold is not None:
        answered = ~result.decisions.unknown
        reject = RejectScores(threshold=rule.reject_threshold, train_coverage=rule.reject_coverage,
                              coverage=float(answered.mean()),
                              accuracy=float((result.predicted[answered] == y_test[answered]).mean())
                              if answered.any() else None)
    return HeadScores(accuracy=result.accuracy, macro_f1=result.macro_f1, balanced_accuracy=result.balanced_accuracy,
                      fit_seconds=round(fitted.fit_seconds, 3), cv_accuracy=fitted.cv_accuracy,
                      best_params=fitted.best_params, type=fitted.spec.type, sources=fitted.spec.sources,
                      calibration=calibration, reject=reject, decision_threshold=rule.binary_threshold,
                      decision_threshold_refused=fitted.threshold_refused)
