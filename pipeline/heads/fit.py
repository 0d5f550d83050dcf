"""Stage 2: classical heads on cached features, each a plain scikit-learn Pipeline.

Hyper-parameters (C, gamma, k) are chosen by stratified cross-validation on the training features
only; joblib runs the folds, on the Dask cluster when one is set. Fitting a head never runs the
network: it reads the feature cache. The options of each head type, and their grids, are typed in
`pipeline.heads.spec`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
from sklearn.base import clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.compose import ColumnTransformer
from sklearn.decomposition import PCA
from sklearn.feature_selection import SelectKBest, VarianceThreshold, f_classif
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, TunedThresholdClassifierCV, cross_val_predict
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from pipeline.core.errors import ConfigError, first_line
from pipeline.heads.calibration import StratifiedFolds, calibrated
from pipeline.heads.decision import DecisionRule
from pipeline.heads.spec import HEAD_TYPES, HeadSpec
from pipeline.heads.trust_options import UNKNOWN
from pipeline.heads.zero_shot import ZeroShotBlend, ZeroShotClassifier, needs_prior

logger = logging.getLogger(__name__)


def _as_list(value: object) -> list:
    return list(value) if isinstance(value, list | tuple) else [value]


def _cv(labels: np.ndarray, class_names: list[str] | None = None) -> StratifiedFolds:
    """Five folds, fewer when a class has fewer than five training images."""
    counts = np.bincount(labels)
    present = counts[counts > 0]
    if not len(present) or present.min() < 2:
        names = class_names or [str(i) for i in range(len(counts))]
        few = [names[i] for i, c in enumerate(counts) if 0 < c < 2]
        raise ConfigError(f"cross-validation needs at least 2 training images in every class ({', '.join(few)} "
                          "has 1): add images, or skip it: give the head a single setting (e.g. C: 1.0) and "
                          "calibration: none (and no reject coverage, no tune_threshold)")
    return StratifiedFolds(folds=min(5, int(present.min())), random_state=0)


def _smallest_fold(cv: StratifiedFolds | None, labels: np.ndarray) -> int:
    """Rows in the smallest training fold: the most a PCA or a kNN can count on while it is tuned."""
    if cv is None:
        return len(labels)
    return min(len(train) for train, _ in cv.split(np.zeros(len(labels)), labels))


def logistic_regression(C: float = 1.0) -> LogisticRegression:
    """The multinomial logistic regression every linear head and probe uses. Newton-CG reaches the same
    optimum as the default L-BFGS in about a third of the iterations on standardised embeddings (7-9
    instead of 11-27 on flowers12's 1280-dim Lite0 features), which is what makes a second head cheap."""
    return LogisticRegression(C=C, solver="newton-cg", max_iter=3000)


def _fusion_pipeline(spec: HeadSpec, dims: list[int], rows: int) -> Pipeline:
    """Each source standardised and reduced by PCA, then concatenated (or the reverse order)."""
    opts = spec.options
    if opts["order"] == "pca_then_concat":
        offsets = np.cumsum([0, *dims])
        blocks = [(f"source{i}", Pipeline([("scale", StandardScaler()),
                                           ("pca", PCA(min(opts["components"], dims[i], rows), random_state=0))]),
                   list(range(offsets[i], offsets[i + 1]))) for i in range(len(dims))]
        steps: list = [("fuse", ColumnTransformer(blocks))]
    else:
        steps = [("scale", StandardScaler()), ("pca", PCA(min(opts["components"], sum(dims), rows), random_state=0))]
    if opts["variance_threshold"] is not None:
        steps.append(("variance", VarianceThreshold(float(opts["variance_threshold"]))))
    if opts["select_k"] is not None:
        steps.append(("select", SelectKBest(f_classif, k=int(opts["select_k"]))))
    steps += [("rescale", StandardScaler()), ("clf", logistic_regression())]
    return Pipeline(steps)


def _check_grid(spec: HeadSpec, grid: dict[str, list], rows: int, folds: bool, warn: bool = True) -> None:
    """A kNN grid loses the k that are more than the rows it is fitted on (`build_head`): say which
    (with `warn`), or refuse the head when that leaves none."""
    if spec.type != "knn":
        return
    given = _as_list(spec.options["n_neighbors"])
    dropped = [k for k in given if k not in grid["clf__n_neighbors"]]
    if not dropped:
        return
    images = f"the {rows} training images" + (" of the smallest cross-validation fold" if folds else "")
    if len(dropped) == len(given):
        raise ConfigError(f"head {spec.name!r}: n_neighbors {', '.join(map(str, given))} "
                          f"{'is' if len(given) == 1 else 'are all'} more than {images}; give a k of at most {rows}")
    if warn:
        logger.warning(f"head {spec.name!r}: n_neighbors {', '.join(map(str, dropped))} dropped from its grid: "
                       f"more than {images}")


def build_head(spec: HeadSpec, dims: list[int], rows: int,
               prior: ZeroShotClassifier | None = None) -> tuple[Pipeline, dict[str, list]]:
    """The unfitted Pipeline and its grid; `rows` is the fewest training rows it will be fitted on, `prior`
    the zero-shot classifier of a head that needs one (`pipeline.heads.zero_shot.prior_for`)."""
    pipe, grid = _build(spec, dims, rows, prior)
    if spec.options.get("class_weight") is not None:
        if prior is not None:
            raise ConfigError(f"head {spec.name!r}: class_weight does not combine with zero_shot_prior; "
                              "remove one of them")
        pipe.set_params(clf__class_weight=spec.options["class_weight"])
    return pipe, grid


def _build(spec: HeadSpec, dims: list[int], rows: int,
           prior: ZeroShotClassifier | None) -> tuple[Pipeline, dict[str, list]]:
    opts = spec.options
    if needs_prior(spec) and prior is None:
        raise ConfigError(f"head {spec.name!r} ({spec.type}) needs the class embeddings of its CLIP backbone's "
                          "text tower (pipeline.heads.zero_shot.prior_for)")
    if spec.type == "zero_shot":  # nothing to choose, nothing learned
        return Pipeline([("clf", prior)]), {}
    if spec.type == "logistic_regression" and prior is not None:
        pipe = Pipeline([("clf", ZeroShotBlend(prior))])
        return pipe, {"clf__C": _as_list(opts["C"]), "clf__weight": _as_list(opts["zero_shot_prior"])}
    if spec.type == "logistic_regression":
        pipe = Pipeline([("scale", StandardScaler()), ("clf", logistic_regression())])
        return pipe, {"clf__C": _as_list(opts["C"])}
    if spec.type == "svm":
        pipe = Pipeline([("scale", StandardScaler()), ("clf", SVC(kernel=opts["kernel"]))])
        grid = {"clf__C": _as_list(opts["C"])}
        if opts["kernel"] == "rbf":
            grid["clf__gamma"] = _as_list(opts["gamma"])
        return pipe, grid
    if spec.type == "knn":
        pipe = Pipeline([("clf", KNeighborsClassifier(metric="cosine", weights="distance"))])
        return pipe, {"clf__n_neighbors": [k for k in _as_list(opts["n_neighbors"]) if k <= rows]}
    if spec.type == "pca_fusion":
        return _fusion_pipeline(spec, dims, rows), {"clf__C": _as_list(opts["C"])}
    raise ConfigError(f"unknown head type {spec.type!r}; expected one of: {', '.join(HEAD_TYPES)}")


@dataclass
class FittedHead:
    spec: HeadSpec
    pipeline: Pipeline
    best_params: dict
    cv_accuracy: float | None  # None when there was nothing to choose, hence no cross-validation
    fit_seconds: float
    decision: DecisionRule = field(default_factory=DecisionRule)
    calibration: str = "none"  # the method applied (out-of-core heads have none)
    threshold_refused: str | None = None  # why a tuned two-class threshold was refused (0.5 kept instead)


def _needs_cv(spec: HeadSpec, single: bool) -> bool:
    """Whether anything is fitted on folds: a grid to search, an SVM's Platt scaling, a calibration,
    a coverage turned into a threshold, a tuned two-class threshold."""
    opts = spec.options
    reject = opts.get("reject") or {}
    return (not single or spec.type == "svm" or opts.get("calibration", "none") != "none"
            or reject.get("coverage") is not None or bool(opts.get("tune_threshold")))


def _check_trust(spec: HeadSpec, y: np.ndarray, class_names: list[str] | None) -> None:
    """Refuse what the head's options cannot do with these classes."""
    names = class_names or []
    if spec.options.get("reject") and UNKNOWN in names:
        raise ConfigError(f"head {spec.name!r}: a class folder is named {UNKNOWN!r}, the answer a head with reject "
                          "gives below its threshold: rename the folder")
    classes = len(np.unique(y))
    if spec.options.get("tune_threshold") and classes != 2:
        raise ConfigError(f"head {spec.name!r}: tune_threshold is for two-class heads, and the training folder has "
                          f"{classes} classes: remove it")


def _final(spec: HeadSpec, pipeline: Pipeline, cv: StratifiedFolds | None) -> Pipeline:
    """The chosen setting's unfitted Pipeline with its probabilities: an SVM's by Platt scaling on
    out-of-fold decisions (sklearn's replacement for the deprecated SVC(probability=True)), then the
    head's calibration on out-of-fold probabilities."""
    final = clone(pipeline)
    name, clf = final.steps[-1]
    if spec.type == "svm":
        clf = CalibratedClassifierCV(clf, cv=cv, ensemble=False)
    final.steps[-1] = (name, calibrated(clf, spec.options.get("calibration", "none"), cv))
    return final


THRESHOLD_MARGIN = 0.01  # a tuned threshold this close to 0 or 1 answers (nearly) every image with one class


def checked_threshold(best: float, thresholds: np.ndarray) -> tuple[float, str | None]:
    """The tuned two-class threshold `best`, or 0.5 and why when it is degenerate: within THRESHOLD_MARGIN
    of 0 or 1, or at an end of `thresholds` (the range of the folds' probabilities), where it gives the
    second class to only the surest image of a fold, or to all of them: a fold whose one rare image sits at
    0.9999 scores perfectly there, and a new image of that class almost never reaches it."""
    if min(best, 1 - best) <= THRESHOLD_MARGIN:
        reason = f"it is within {THRESHOLD_MARGIN} of {round(best)}"
    elif best <= thresholds[0] or best >= thresholds[-1]:
        reason = "it is at the end of the range of the cross-validated probabilities"
    else:
        return best, None
    return 0.5, f"the tuned threshold {best:.3f} was refused and 0.5 kept: {reason}"


def _decision(spec: HeadSpec, final: Pipeline, X: np.ndarray, y: np.ndarray,
              cv: StratifiedFolds | None) -> tuple[Pipeline, DecisionRule, str | None]:
    """Fit `final` on every row, with the two-class threshold tuned on its folds (tune_threshold; a degenerate
    one refused, and why), and turn a reject coverage into a threshold on its out-of-fold top probabilities."""
    opts = spec.options
    rule, refused = DecisionRule(), None
    if opts.get("tune_threshold"):
        tuner = TunedThresholdClassifierCV(final, scoring="balanced_accuracy", response_method="predict_proba",
                                           cv=cv, store_cv_results=True).fit(X, y)
        fitted = tuner.estimator_
        rule.binary_threshold, refused = checked_threshold(float(tuner.best_threshold_),
                                                           tuner.cv_results_["thresholds"])
        if refused:
            logger.warning(f"head {spec.name!r}: {refused}")
    else:
        fitted = final.fit(X, y)
    reject = opts.get("reject") or {}
    if reject.get("threshold") is not None:
        rule.reject_threshold = float(reject["threshold"])
    elif reject.get("coverage") is not None:
        top = cross_val_predict(clone(final), X, y, cv=cv, method="predict_proba").max(axis=1)
        rule.reject_coverage = float(reject["coverage"])
        # answer the `coverage` most confident share of the training rows, as their held-out folds saw them
        rule.reject_threshold = float(np.quantile(top, 1 - rule.reject_coverage, method="higher"))
    return fitted, rule, refused


def fit_head(spec: HeadSpec, X: np.ndarray, y: np.ndarray, dims: list[int], scheduler: str | None = None,
             n_jobs: int | None = None, class_names: list[str] | None = None,
             prior: ZeroShotClassifier | None = None) -> FittedHead:
    """Cross-validate, then fit the best setting on all training rows with its calibration and decision
    rule; folds go to Dask when `scheduler`.

    A grid with a single setting leaves nothing to choose (its `cv_accuracy` is then None); with
    calibration none and no reject coverage or tuned threshold it is fitted once without any folds:
    that is the fast path for a head whose settings are already known. A zero_shot head has no setting
    at all. `prior`: see `build_head`."""
    started = time.perf_counter()
    _check_trust(spec, y, class_names)
    _, grid = build_head(spec, dims, len(y), prior)
    _check_grid(spec, grid, len(y), folds=False, warn=False)  # refused when no setting fits the data at all
    single = all(len(values) == 1 for values in grid.values())
    cv = _cv(y, class_names) if _needs_cv(spec, single) else None
    rows = _smallest_fold(None if single else cv, y)
    pipeline, grid = build_head(spec, dims, rows, prior)
    _check_grid(spec, grid, rows, folds=not single)
    try:
        if single:
            best_params, cv_accuracy = {key: values[0] for key, values in grid.items()}, None
            pipeline.set_params(**best_params)
        else:
            search = GridSearchCV(pipeline, grid, cv=cv, n_jobs=n_jobs if scheduler is None else -1,
                                  scoring="accuracy", error_score="raise", refit=False)
            if scheduler is None:
                search.fit(X, y)
            else:
                import joblib
                from distributed import Client

                with Client(scheduler), joblib.parallel_backend("dask"):  # the dask backend uses the default client
                    search.fit(X, y)
            best_params, cv_accuracy = search.best_params_, float(search.best_score_)
            pipeline.set_params(**best_params)
        fitted, rule, refused = _decision(spec, _final(spec, pipeline, cv), X, y, cv)
    except ValueError as exc:  # scikit-learn's verdict on this data with these settings
        raise ConfigError(f"head {spec.name!r} cannot be fitted: {first_line(exc)}") from None
    return FittedHead(spec, fitted, best_params, cv_accuracy, time.perf_counter() - started, rule,
                      spec.options.get("calibration", "none"), refused)
