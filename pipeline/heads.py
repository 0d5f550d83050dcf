"""Stage 2: classical heads on cached features, each a plain scikit-learn Pipeline.

Hyper-parameters (C, gamma, k) are chosen by stratified cross-validation on the training features
only; joblib runs the folds, on the Dask cluster when one is set. Fitting a head never runs the
network: it reads the feature cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.compose import ColumnTransformer
from sklearn.decomposition import PCA
from sklearn.feature_selection import SelectKBest, VarianceThreshold, f_classif
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from pipeline.errors import ConfigError

# type -> {option: default}; `source`/`sources` name the features (BACKBONE or BACKBONE:LAYER).
HEAD_OPTIONS: dict[str, dict] = {
    "logistic_regression": {"source": None, "C": [0.01, 0.1, 1.0, 10.0]},
    "svm": {"source": None, "kernel": "rbf", "C": [0.1, 1.0, 10.0], "gamma": ["scale", 1e-4]},
    "knn": {"source": None, "n_neighbors": [1, 3, 5, 10]},
    "pca_fusion": {"sources": None, "components": 128, "order": "pca_then_concat", "variance_threshold": None,
                   "select_k": None, "C": [0.01, 0.1, 1.0]},
}


@dataclass
class HeadSpec:
    """One head of a run config: a name, a type, its feature sources and its options."""

    name: str
    type: str
    sources: list[str]
    options: dict = field(default_factory=dict)


def _cv(labels: np.ndarray) -> StratifiedKFold:
    """Five folds, fewer when a class has fewer than five training images."""
    smallest = int(np.bincount(labels).min()) if len(labels) else 0
    if smallest < 2:
        raise ConfigError("cross-validation needs at least 2 training images in every class")
    return StratifiedKFold(n_splits=min(5, smallest), shuffle=True, random_state=0)


def _search(pipeline: Pipeline, grid: dict, labels: np.ndarray, n_jobs: int | None) -> GridSearchCV:
    return GridSearchCV(pipeline, {k: list(v) for k, v in grid.items()}, cv=_cv(labels), n_jobs=n_jobs,
                        scoring="accuracy", refit=True)


def _as_list(value: object) -> list:
    return list(value) if isinstance(value, list | tuple) else [value]


def _fusion_pipeline(spec: HeadSpec, dims: list[int], n_samples: int) -> Pipeline:
    """Each source standardised and reduced by PCA, then concatenated (or the reverse order)."""
    opts = spec.options
    # PCA inside cross-validation sees 4/5 of the training rows, so stay below that.
    limit = max(1, int(n_samples * 0.8) - 1)
    if opts["order"] == "pca_then_concat":
        offsets = np.cumsum([0, *dims])
        blocks = [(f"source{i}", Pipeline([("scale", StandardScaler()),
                                           ("pca", PCA(min(opts["components"], dims[i], limit), random_state=0))]),
                   list(range(offsets[i], offsets[i + 1]))) for i in range(len(dims))]
        steps: list = [("fuse", ColumnTransformer(blocks))]
    elif opts["order"] == "concat_then_pca":
        steps = [("scale", StandardScaler()), ("pca", PCA(min(opts["components"], sum(dims), limit), random_state=0))]
    else:
        raise ConfigError(f"head {spec.name!r}: order must be pca_then_concat or concat_then_pca")
    if opts["variance_threshold"] is not None:
        steps.append(("variance", VarianceThreshold(float(opts["variance_threshold"]))))
    if opts["select_k"] is not None:
        steps.append(("select", SelectKBest(f_classif, k=int(opts["select_k"]))))
    steps += [("rescale", StandardScaler()), ("clf", LogisticRegression(max_iter=3000))]
    return Pipeline(steps)


def build_head(spec: HeadSpec, dims: list[int], labels: np.ndarray, n_jobs: int | None = None) -> GridSearchCV:
    """An unfitted search over the head's grid; its `best_estimator_` is the Pipeline that is kept."""
    opts = spec.options
    if spec.type == "logistic_regression":
        pipe = Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression(max_iter=3000))])
        return _search(pipe, {"clf__C": _as_list(opts["C"])}, labels, n_jobs)
    if spec.type == "svm":
        if opts["kernel"] not in ("linear", "rbf"):
            raise ConfigError(f"head {spec.name!r}: kernel must be linear or rbf, not {opts['kernel']!r}")
        pipe = Pipeline([("scale", StandardScaler()), ("clf", SVC(kernel=opts["kernel"]))])
        grid = {"clf__C": _as_list(opts["C"])}
        if opts["kernel"] == "rbf":
            grid["clf__gamma"] = _as_list(opts["gamma"])
        return _search(pipe, grid, labels, n_jobs)
    if spec.type == "knn":
        pipe = Pipeline([("clf", KNeighborsClassifier(metric="cosine", weights="distance"))])
        smallest_fold = int(len(labels) * 0.8) - 1
        ks = [k for k in _as_list(opts["n_neighbors"]) if k <= smallest_fold] or [1]
        return _search(pipe, {"clf__n_neighbors": ks}, labels, n_jobs)
    if spec.type == "pca_fusion":
        return _search(_fusion_pipeline(spec, dims, len(labels)), {"clf__C": _as_list(opts["C"])}, labels, n_jobs)
    raise ConfigError(f"unknown head type {spec.type!r}; expected one of: {', '.join(HEAD_OPTIONS)}")


@dataclass
class FittedHead:
    spec: HeadSpec
    pipeline: Pipeline
    best_params: dict
    cv_accuracy: float | None  # None when there was nothing to choose, hence no cross-validation
    fit_seconds: float


def fit_head(spec: HeadSpec, X: np.ndarray, y: np.ndarray, dims: list[int], scheduler: str | None = None,
             n_jobs: int | None = None) -> FittedHead:
    """Cross-validate, refit the best setting on all training rows; folds go to Dask when `scheduler`.

    A grid with a single setting leaves nothing to choose, so it is fitted once without CV (its
    `cv_accuracy` is then None): that is the fast path for a head whose settings are already known."""
    search = build_head(spec, dims, y, n_jobs if scheduler is None else -1)
    started = time.perf_counter()
    if all(len(values) == 1 for values in search.param_grid.values()):
        best_params = {key: values[0] for key, values in search.param_grid.items()}
        pipeline, cv_accuracy = search.estimator.set_params(**best_params), None
        if spec.type != "svm":  # the SVM is fitted by its calibration below
            pipeline.fit(X, y)
    else:
        if scheduler is None:
            search.fit(X, y)
        else:
            import joblib
            from distributed import Client

            with Client(scheduler), joblib.parallel_backend("dask"):  # the dask backend uses the default client
                search.fit(X, y)
        pipeline, best_params, cv_accuracy = search.best_estimator_, search.best_params_, float(search.best_score_)
    if spec.type == "svm":
        # Probabilities for an SVM: Platt scaling on out-of-fold decisions of the chosen setting, then
        # one SVM on all rows (sklearn's replacement for the deprecated SVC(probability=True)).
        pipeline = Pipeline([("scale", pipeline.named_steps["scale"]),
                             ("clf", CalibratedClassifierCV(pipeline.named_steps["clf"], cv=_cv(y), ensemble=False))])
        pipeline.fit(X, y)
    return FittedHead(spec, pipeline, best_params, cv_accuracy, time.perf_counter() - started)
