"""Heads for features that do not fit in memory: fitted block by block over the cache's shards.

Selected automatically when the training matrix would exceed the run's memory budget. Logistic
regression becomes SGD with log-loss (`partial_fit`), and PCA fusion uses `IncrementalPCA`; the
result is still an ordinary scikit-learn Pipeline that predicts like the in-memory heads.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import dask.array as da
import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.decomposition import IncrementalPCA
from sklearn.linear_model import SGDClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.core.errors import ConfigError
from pipeline.heads.fit import FittedHead
from pipeline.heads.spec import HeadSpec

EPOCHS = 20  # SGD passes over the blocks; fewer left the log-loss visibly unconverged


class FusedIncrementalPCA(TransformerMixin, BaseEstimator):
    """Per source: standardise, reduce with IncrementalPCA; then concatenate. Learns with partial_fit."""

    def __init__(self, dims: tuple[int, ...] = (), components: int = 128) -> None:
        self.dims = dims
        self.components = components

    def _slices(self) -> list[slice]:
        edges = np.cumsum([0, *self.dims])
        return [slice(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True)]

    def partial_fit_scalers(self, X: np.ndarray) -> FusedIncrementalPCA:
        if not hasattr(self, "scalers_"):
            self.scalers_ = [StandardScaler() for _ in self.dims]
        for scaler, part in zip(self.scalers_, self._slices(), strict=True):
            scaler.partial_fit(X[:, part])
        return self

    def partial_fit(self, X: np.ndarray, y: object = None) -> FusedIncrementalPCA:
        """Second pass (after the scalers have seen every block): the PCA of each source."""
        if not hasattr(self, "pcas_"):
            self.pcas_ = [IncrementalPCA(min(self.components, d, len(X))) for d in self.dims]
        if len(X) < self.pcas_[0].n_components:  # a short last block cannot update the PCA; skip it
            return self
        for scaler, pca, part in zip(self.scalers_, self.pcas_, self._slices(), strict=True):
            pca.partial_fit(scaler.transform(X[:, part]))
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        return np.hstack([pca.transform(scaler.transform(X[:, part]))
                          for scaler, pca, part in zip(self.scalers_, self.pcas_, self._slices(), strict=True)])


def matrix_bytes(sources: list[da.Array]) -> int:
    return int(sources[0].shape[0] * sum(s.shape[1] for s in sources) * 4)


def _blocks(sources: list[da.Array], y: np.ndarray, rows: int, order: np.ndarray) -> Iterator:
    for start in order:
        stop = min(start + rows, len(y))
        yield np.hstack([s[start:stop].compute() for s in sources]), y[start:stop]


def fit_incremental(spec: HeadSpec, sources: list[da.Array], y: np.ndarray, block_rows: int = 2048) -> FittedHead:
    """Fit without holding the training matrix: a few passes over blocks of `block_rows` rows."""
    if spec.type not in ("logistic_regression", "pca_fusion"):
        raise ConfigError(f"head {spec.name!r}: a {spec.type} head needs all features in memory, and they exceed "
                          "the memory budget; use logistic_regression or pca_fusion, or raise memory_budget_mb")
    unsupported = [k for k, v in (("order", spec.options.get("order") == "concat_then_pca"),
                                  ("variance_threshold", spec.options.get("variance_threshold") is not None),
                                  ("select_k", spec.options.get("select_k") is not None)) if v]
    if unsupported:
        raise ConfigError(f"head {spec.name!r}: {', '.join(unsupported)} is not available out of core (per-source "
                          "incremental PCA only); drop it or raise memory_budget_mb")
    started = time.perf_counter()
    classes = np.unique(y)
    starts = np.arange(0, len(y), block_rows)
    rng = np.random.default_rng(0)
    C = float(np.atleast_1d(spec.options["C"])[len(np.atleast_1d(spec.options["C"])) // 2])
    # SGD's alpha is the L2 strength per sample; LogisticRegression's C is the inverse of the total.
    clf = SGDClassifier(loss="log_loss", alpha=1.0 / (C * len(y)), learning_rate="optimal", random_state=0)
    if spec.type == "pca_fusion":
        first: TransformerMixin = FusedIncrementalPCA(tuple(s.shape[1] for s in sources), spec.options["components"])
        for X, _ in _blocks(sources, y, block_rows, starts):
            first.partial_fit_scalers(X)
        for X, _ in _blocks(sources, y, block_rows, starts):
            first.partial_fit(X)
    else:
        first = StandardScaler()
        for X, _ in _blocks(sources, y, block_rows, starts):
            first.partial_fit(X)
    rescale = StandardScaler()
    for X, _ in _blocks(sources, y, block_rows, starts):
        rescale.partial_fit(first.transform(X))
    for _epoch in range(EPOCHS):
        for X, labels in _blocks(sources, y, block_rows, rng.permutation(starts)):
            clf.partial_fit(rescale.transform(first.transform(X)), labels, classes=classes)
    pipeline = Pipeline([("features", first), ("rescale", rescale), ("clf", clf)])
    return FittedHead(spec, pipeline, {"C": C, "epochs": EPOCHS, "out_of_core": True}, None,
                      time.perf_counter() - started)


def predict_proba_blocks(pipeline: Pipeline, sources: list[da.Array], block_rows: int = 2048) -> np.ndarray:
    n = sources[0].shape[0]
    return np.vstack([pipeline.predict_proba(np.hstack([s[i:i + block_rows].compute() for s in sources]))
                      for i in range(0, n, block_rows)]) if n else np.zeros((0, 0))
