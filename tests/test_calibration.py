"""Calibration: the temperature estimator against scikit-learn's, the scores (ECE, reliability), what
each method does to an over-confident head, and class weights and the two-class threshold."""

import warnings

import numpy as np
import pytest
from sklearn.calibration import CalibratedClassifierCV
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.model_selection import StratifiedKFold

from pipeline.app.scoring import head_scores, score_head
from pipeline.core.errors import ConfigError
from pipeline.heads.calibration import StratifiedFolds, TemperatureScaling, fit_temperature, uncalibrated
from pipeline.heads.decision import DecisionRule, decide
from pipeline.heads.fit import checked_threshold, fit_head
from pipeline.heads.scores import (
    accuracy_coverage,
    auroc,
    balanced_accuracy,
    calibration_scores,
    expected_calibration_error,
    reliability,
)
from pipeline.heads.spec import HEAD_OPTIONS, HeadSpec


def _spec(head_type, **options):
    return HeadSpec("h", head_type, ["x"], {**HEAD_OPTIONS[head_type], **options})


def _data(n=600, classes=3, seed=0, **kw):
    X, y = make_classification(n, 20, n_informative=6, n_classes=classes, n_clusters_per_class=1, flip_y=0.1,
                               class_sep=1.0, random_state=seed, **kw)
    return X[: n // 2], y[: n // 2], X[n // 2:], y[n // 2:]


def test_fit_temperature_recovers_the_temperature_that_made_the_labels():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(20000, 4))
    true_t = 2.5
    p = np.exp(logits / true_t)
    p /= p.sum(1, keepdims=True)
    y = np.array([rng.choice(4, p=row) for row in p])
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)  # over-confident by a factor 2.5
    assert fit_temperature(proba, y) == pytest.approx(true_t, rel=0.05)


def test_temperature_scaling_agrees_with_scikit_learns_on_a_softmax_model():
    """For logistic regression log p is the logits up to a constant per row, so our T on log-probabilities
    and scikit-learn's temperature on the decision function give the same probabilities."""
    X, y, X_test, _ = _data()
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    ours = TemperatureScaling(LogisticRegression(C=10.0), cv=folds).fit(X, y)
    theirs = CalibratedClassifierCV(LogisticRegression(C=10.0), method="temperature", cv=folds, ensemble=False)
    theirs.fit(X, y)
    np.testing.assert_allclose(ours.predict_proba(X_test), theirs.predict_proba(X_test), atol=2e-3)
    assert (ours.predict(X_test) == ours.estimator_.predict(X_test)).all()  # the top class never changes


@pytest.mark.parametrize("method", ["sigmoid", "isotonic", "temperature"])
def test_each_method_makes_an_over_confident_knn_honest(method):
    """kNN with k=1 says 100% to every image; calibrated on folds of the training rows, its held-out
    log-loss and ECE drop, and `uncalibrated` gives back the head as it was."""
    X, y, X_test, y_test = _data()
    plain = fit_head(_spec("knn", n_neighbors=1, calibration="none"), X, y, [20])
    fitted = fit_head(_spec("knn", n_neighbors=1, calibration=method), X, y, [20])
    before, after = plain.pipeline.predict_proba(X_test), fitted.pipeline.predict_proba(X_test)
    assert calibration_scores(y_test, after)["log_loss"] < calibration_scores(y_test, before)["log_loss"] / 2
    assert expected_calibration_error(y_test, after) < expected_calibration_error(y_test, before) / 2
    np.testing.assert_array_equal(uncalibrated(fitted.pipeline, method).predict_proba(X_test), before)
    assert fitted.calibration == method and uncalibrated(plain.pipeline, "none") is None


def test_ece_and_reliability_by_hand():
    y = np.array([0, 0, 1, 1])
    proba = np.array([[0.95, 0.05], [0.95, 0.05], [0.3, 0.7], [0.7, 0.3]])  # bins: 0.95 x2 (both right), 0.7 x2
    curve = reliability(y, proba)
    np.testing.assert_allclose(curve.confidence, [0.7, 0.95])
    np.testing.assert_allclose(curve.accuracy, [0.5, 1.0])
    assert expected_calibration_error(y, proba) == pytest.approx((2 * 0.2 + 2 * 0.05) / 4)
    assert calibration_scores(y, proba)["log_loss"] == pytest.approx(log_loss(y, proba))


def test_accuracy_coverage_answers_the_most_confident_first_and_auroc():
    y = np.array([0, 1, 0, 1])
    proba = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.45, 0.55]])  # the third most confident is wrong
    coverage, accuracy = accuracy_coverage(y, proba)
    np.testing.assert_allclose(coverage, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(accuracy, [1.0, 1.0, 2 / 3, 0.75])
    assert auroc(np.array([0.9, 0.8]), np.array([0.1, 0.85])) == pytest.approx(0.75)  # 3 of 4 pairs in order


def test_folds_fit_inside_folds():
    """An SVM (Platt scaling on folds) calibrated on folds and given a reject coverage (folds again) fits
    on four images per class: each nested level takes as many folds as its rows allow."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 4)
    X = rng.normal(size=(12, 5)) + y[:, None]
    fitted = fit_head(_spec("svm", C=1.0, kernel="linear", calibration="temperature",
                            reject={"coverage": 0.9, "threshold": None}), X, y, [5])
    assert 0 < fitted.decision.reject_threshold < 1
    assert StratifiedFolds(5).get_n_splits(y=np.repeat([0, 1], 3)) == 3


def test_class_weight_balanced_lifts_balanced_accuracy_on_an_imbalanced_folder():
    X, y = make_classification(3000, 10, n_informative=4, n_classes=2, weights=[0.95], class_sep=0.6,
                               random_state=1)
    X_test, y_test = X[2000:], y[2000:]
    scores = {}
    for weight in (None, "balanced"):
        fitted = fit_head(_spec("logistic_regression", C=1.0, calibration="none", class_weight=weight),
                          X[:2000], y[:2000], [10])
        assert fitted.pipeline.named_steps["clf"].class_weight == weight
        scores[weight] = balanced_accuracy(y_test, fitted.pipeline.predict(X_test))
    assert scores["balanced"] > scores[None] + 0.05


def test_a_tuned_two_class_threshold_is_saved_and_used_by_decide():
    X, y = make_classification(3000, 10, n_informative=4, n_classes=2, weights=[0.95], class_sep=0.6,
                               random_state=1)
    X_test, y_test = X[2000:], y[2000:]
    plain = fit_head(_spec("logistic_regression", C=1.0, calibration="none"), X[:2000], y[:2000], [10])
    tuned = fit_head(_spec("logistic_regression", C=1.0, calibration="none", tune_threshold=True), X[:2000],
                     y[:2000], [10])
    threshold = tuned.decision.binary_threshold
    assert 0 < threshold < 0.5 and tuned.threshold_refused is None  # the rare class needs less than an even chance
    proba = tuned.pipeline.predict_proba(X_test)
    labels = decide(tuned.decision, proba).label
    np.testing.assert_array_equal(labels, (proba[:, 1] >= threshold).astype(int))
    assert balanced_accuracy(y_test, labels) > balanced_accuracy(y_test, plain.pipeline.predict(X_test)) + 0.05


@pytest.mark.parametrize(("best", "kept", "reason"), [
    (0.999, 0.5, "the tuned threshold 0.999 was refused and 0.5 kept: it is within 0.01 of 1"),
    (0.004, 0.5, "the tuned threshold 0.004 was refused and 0.5 kept: it is within 0.01 of 0"),
    (0.95, 0.5, "the tuned threshold 0.950 was refused and 0.5 kept: it is at the end of the range of the"),
    (0.02, 0.5, "the tuned threshold 0.020 was refused and 0.5 kept: it is at the end of the range of the"),
    (0.3, 0.3, None),
    (0.94, 0.94, None),
])
def test_a_degenerate_tuned_threshold_is_refused(best, kept, reason):
    threshold, refused = checked_threshold(best, np.array([0.02, 0.3, 0.5, 0.95]))
    assert threshold == kept
    assert (refused is None) == (reason is None) and (reason is None or reason in refused)


def test_tune_threshold_refuses_the_highest_probability_of_the_folds_and_says_so(caplog):
    """Five rare images far out, five common ones just short of them, an almost unregularised regression:
    every fold scores perfectly only when the threshold sits at its rare image's probability (0.987), which
    no new rare image would reach. The fit keeps 0.5 and says why: in the log and in metrics.json's record."""
    rng = np.random.default_rng(0)
    shift = np.eye(5)[0] * 12
    X = np.vstack([rng.normal(size=(95, 5)), shift * 0.95 + rng.normal(scale=0.1, size=(5, 5)),
                   shift + rng.normal(scale=0.1, size=(5, 5))])
    y = np.r_[np.zeros(100, int), np.ones(5, int)]
    with caplog.at_level("WARNING", logger="pipeline.heads.fit"):
        tuned = fit_head(_spec("logistic_regression", C=1000.0, calibration="none", tune_threshold=True), X, y, [5])
    assert tuned.decision.binary_threshold == 0.5
    assert tuned.threshold_refused == ("the tuned threshold 0.987 was refused and 0.5 kept: it is at the end of "
                                       "the range of the cross-validated probabilities")
    assert f"head 'h': {tuned.threshold_refused}" in caplog.text
    scores = head_scores(score_head(tuned, tuned.pipeline.predict_proba(X), None, y), y).model_dump()
    assert scores["decision_threshold"] == 0.5 and scores["decision_threshold_refused"] == tuned.threshold_refused


def test_tune_threshold_is_refused_for_more_than_two_classes_and_unknown_is_a_reserved_class():
    X, y, _, _ = _data()
    with pytest.raises(ConfigError, match="tune_threshold is for two-class heads, and the training folder has 3"):
        fit_head(_spec("logistic_regression", C=1.0, tune_threshold=True), X, y, [20])
    with pytest.raises(ConfigError, match="a class folder is named 'unknown'"):
        fit_head(_spec("logistic_regression", C=1.0, reject={"threshold": 0.5, "coverage": None}), X, y, [20],
                 class_names=["a", "unknown", "c"])
    with warnings.catch_warnings():  # without reject, a class may be named so
        warnings.simplefilter("ignore")
        fit_head(_spec("logistic_regression", C=1.0, calibration="none"), X, y, [20], class_names=["a", "unknown", "c"])


def test_decide_answers_unknown_below_the_threshold_with_the_top_class_beside():
    proba = np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.34, 0.33, 0.33]])
    decisions = decide(DecisionRule(reject_threshold=0.65), proba)
    assert decisions.answers(["a", "b", "c"]) == ["unknown", "b", "unknown"]
    np.testing.assert_array_equal(decisions.label, [0, 1, 0])
    np.testing.assert_allclose(decisions.top_probability, [0.6, 0.7, 0.34])
    assert not decide(DecisionRule(), proba).unknown.any()
