"""Calibrated probabilities: a head's classifier wrapped so that a 0.9 means right nine times in ten.

Every method is fitted on out-of-fold predictions of the training folder (never the test split), then
the classifier itself is refitted on every training row (scikit-learn's `ensemble=False`):

- sigmoid (Platt) and isotonic: scikit-learn's `CalibratedClassifierCV`, one map per class (one-vs-rest),
  renormalised;
- temperature: `TemperatureScaling` below, one scalar T for all classes, softmax(log p / T). For a
  softmax model (logistic regression) log p is the logits up to a constant per row, so this is exactly
  temperature scaling of the logits (Guo et al., ICML 2017); it never changes which class is on top.

`TemperatureScaling` is a plain scikit-learn estimator made of trusted parts, so a saved head that holds
one loads with skops (`pipeline.heads.bundle.TRUSTED_TYPES` names it).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.model_selection import BaseCrossValidator, StratifiedKFold, cross_val_predict
from sklearn.pipeline import Pipeline

EPSILON = 1e-12  # probabilities are clipped here before the log (kNN gives exact zeros)
LOG_T_BOUNDS = (-4.0, 4.0)  # T from 1/55 to 55: wider than any head here needs


class StratifiedFolds(BaseCrossValidator):
    """Shuffled stratified folds, at most `folds` of them: fewer when the rows it splits have a class with
    fewer images. The same object serves a head's cross-validation and every calibration nested inside
    one of its folds (an SVM's Platt scaling inside a calibration inside a reject coverage), where a fold
    of a fold holds fewer images per class than the training folder. (No `n_splits` attribute: scikit-learn
    would check the training folder's class sizes against it, not the fold's.)"""

    def __init__(self, folds: int = 5, random_state: int = 0) -> None:
        self.folds = folds
        self.random_state = random_state

    def _kfold(self, y: np.ndarray) -> StratifiedKFold:
        fewest = int(np.unique(y, return_counts=True)[1].min())
        return StratifiedKFold(min(self.folds, fewest), shuffle=True, random_state=self.random_state)

    def split(self, X: np.ndarray, y: np.ndarray, groups: object = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self._kfold(y).split(X, y, groups)

    def get_n_splits(self, X: object = None, y: np.ndarray | None = None, groups: object = None) -> int:
        return self.folds if y is None else self._kfold(y).n_splits


def _softmax_of_log(proba: np.ndarray, temperature: float) -> np.ndarray:
    logits = np.log(np.clip(proba, EPSILON, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def fit_temperature(proba: np.ndarray, y: np.ndarray) -> float:
    """The T that minimises the log-loss of softmax(log p / T) for labels `y` (indices into the columns)."""
    rows = np.arange(len(y))

    def loss(log_t: float) -> float:
        return float(-np.log(np.clip(_softmax_of_log(proba, np.exp(log_t))[rows, y], EPSILON, 1.0)).mean())

    return float(np.exp(minimize_scalar(loss, bounds=LOG_T_BOUNDS, method="bounded").x))


class TemperatureScaling(ClassifierMixin, BaseEstimator):
    """`estimator` with its probabilities rescaled by one temperature, fitted on the out-of-fold
    probabilities of `cv`; then `estimator` is refitted on all rows."""

    def __init__(self, estimator: BaseEstimator | None = None, cv: object = 5) -> None:
        self.estimator = estimator
        self.cv = cv

    def fit(self, X: np.ndarray, y: np.ndarray) -> TemperatureScaling:
        out_of_fold = cross_val_predict(clone(self.estimator), X, y, cv=self.cv, method="predict_proba")
        self.estimator_ = clone(self.estimator).fit(X, y)
        self.classes_ = self.estimator_.classes_
        self.temperature_ = fit_temperature(out_of_fold, np.searchsorted(self.classes_, y))
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return _softmax_of_log(self.estimator_.predict_proba(X), self.temperature_)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(axis=1)]


def calibrated(estimator: BaseEstimator, method: str, cv: object) -> BaseEstimator:
    """`estimator` (unfitted) wrapped by `method`'s calibration on the folds of `cv`; itself for none."""
    if method == "none":
        return estimator
    if method == "temperature":
        return TemperatureScaling(estimator, cv=cv)
    return CalibratedClassifierCV(estimator, method=method, cv=cv, ensemble=False)


def uncalibrated(pipeline: Pipeline, method: str) -> Pipeline | None:
    """The same fitted head without its `method` calibration (the classifier inside, as fitted on every
    training row): what the probabilities were before; None for none."""
    name, clf = pipeline.steps[-1]
    if method == "none":
        return None
    inner = clf.estimator_ if isinstance(clf, TemperatureScaling) else clf.calibrated_classifiers_[0].estimator
    return Pipeline([*pipeline.steps[:-1], (name, inner)])
