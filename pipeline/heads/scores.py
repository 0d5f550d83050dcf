"""Scores of probabilities, not only of answers: calibration (expected calibration error, log-loss, the
reliability curve), balanced accuracy, the accuracy-coverage curve of a reject threshold, and AUROC
of a score that should separate seen from unseen classes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import balanced_accuracy_score, log_loss, roc_auc_score

ECE_BINS = 15


@dataclass
class Reliability:
    """Per confidence bin (equal widths over [0, 1]): mean top probability, accuracy and rows; empty
    bins are left out."""

    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray


def reliability(y: np.ndarray, proba: np.ndarray, bins: int = ECE_BINS) -> Reliability:
    top = proba.max(axis=1)
    right = (proba.argmax(axis=1) == y).astype(float)
    index = np.clip(np.ceil(top * bins).astype(int) - 1, 0, bins - 1)  # (0, 1/15] is bin 0
    count = np.bincount(index, minlength=bins)
    seen = count > 0
    confidence = np.bincount(index, weights=top, minlength=bins)[seen] / count[seen]
    accuracy = np.bincount(index, weights=right, minlength=bins)[seen] / count[seen]
    return Reliability(confidence, accuracy, count[seen])


def expected_calibration_error(y: np.ndarray, proba: np.ndarray, bins: int = ECE_BINS) -> float:
    """Top-label ECE: sum over confidence bins of |accuracy - confidence| weighted by the bin's rows."""
    curve = reliability(y, proba, bins)
    return float(np.sum(curve.count * np.abs(curve.accuracy - curve.confidence)) / len(y))


def calibration_scores(y: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """{"ece", "log_loss"} of probabilities whose columns are the classes 0..n-1 and labels `y`."""
    return {"ece": round(expected_calibration_error(y, proba), 6),
            "log_loss": round(float(log_loss(y, proba, labels=range(proba.shape[1]))), 6)}


def balanced_accuracy(y: np.ndarray, predicted: np.ndarray) -> float:
    """Mean recall over the classes present in `y` (answers outside them, such as unknown, count wrong)."""
    return float(balanced_accuracy_score(y, predicted))


def accuracy_coverage(y: np.ndarray, proba: np.ndarray, points: int = 101) -> tuple[np.ndarray, np.ndarray]:
    """(coverage, accuracy on the answered images) as the threshold on the top probability rises: the
    most confident images first. `points` coverages from 1/n to 1."""
    order = np.argsort(-proba.max(axis=1), kind="stable")
    right = (proba.argmax(axis=1) == y)[order]
    kept = np.arange(1, len(y) + 1)
    accuracy = np.cumsum(right) / kept
    at = np.unique(np.linspace(1, len(y), min(points, len(y))).round().astype(int)) - 1
    return kept[at] / len(y), accuracy[at]


def auroc(seen_scores: np.ndarray, unseen_scores: np.ndarray) -> float:
    """How well a score ranks seen above unseen images (1: always, 0.5: chance)."""
    truth = np.concatenate([np.ones(len(seen_scores)), np.zeros(len(unseen_scores))])
    return float(roc_auc_score(truth, np.concatenate([seen_scores, unseen_scores])))
