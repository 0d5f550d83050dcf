"""Which pretrained model? Rank backbones, layers and fusions on the user's own data, from cached features.

Fine-tuning every candidate to find the best costs the time transfer learning was meant to save. Two
training-free scores read only the cached embeddings and answer in seconds:

- LogME (You et al., ICML 2021): the log marginal evidence, per sample, of a Bayesian linear model from
  the features to each one-hot label column, with the prior and noise precisions (alpha, beta) set by the
  paper's fixed-point evidence maximisation; computed for all classes at once from one SVD.
- H-score (Bao et al., ICIP 2019): how much of the feature covariance the class means explain,
  tr(cov(f)^-1 cov(E[f|y])), with a Ledoit-Wolf shrunk cov(f) because the raw one is singular when a
  layer has more dimensions than there are images (Ibrahim et al., ICLR 2023).

No single score wins on every dataset in published comparisons, so both are shown, next to the
cross-validated accuracy of a linear probe (same protocol for every candidate) and the extraction cost.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.core.errors import ConfigError, DataError
from pipeline.features.cache import FeatureStore
from pipeline.features.extract import extract, layers_for
from pipeline.features.settings import DEFAULTS
from pipeline.features.trained_on import warn_trained_on
from pipeline.heads.fit import logistic_regression
from pipeline.images.data import Dataset

logger = logging.getLogger(__name__)

# As in the authors' implementation: keeps alpha finite for a class no linear map predicts, and beta
# finite when there are fewer images than dimensions and the labels are fitted exactly.
EPSILON = 1e-5
PROBE_C = 0.1  # one setting for every candidate: the probe compares features, it does not tune itself
PROBE_FOLDS = 5


def _one_hot(labels: np.ndarray) -> np.ndarray:
    classes = np.unique(labels)
    return (np.asarray(labels)[:, None] == classes[None, :]).astype(np.float64)


def _check(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) != len(labels) or len(f) < 2:
        raise DataError(f"scores need a 2-D feature matrix with one row per label, got {f.shape} for "
                        f"{len(labels)} labels")
    if len(np.unique(labels)) < 2:
        raise DataError("scores need at least two classes")
    return f


def _spectrum(f: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(eigenvalues of F^T F, squared projections of y on F's left singular vectors), from the eigen-
    decomposition of the smaller Gram matrix: n x n or d x d, never an SVD of the full n x d matrix."""
    n, dim = f.shape
    if n <= dim:
        sigma, u = np.linalg.eigh(f @ f.T)
        return np.clip(sigma, 0, None), (u.T @ y) ** 2
    sigma, v = np.linalg.eigh(f.T @ f)
    sigma = np.clip(sigma, 0, None)
    scale = np.sqrt(sigma)
    z = (v.T @ (f.T @ y)) / np.where(scale > 0, scale, np.inf)[:, None]  # U^T y; 0 where sigma is 0
    return sigma, z**2


def logme(features: np.ndarray, labels: np.ndarray, tol: float = 1e-10, max_iter: int = 300) -> float:
    """LogME: mean over classes of the maximised log evidence per sample (higher transfers better).

    With F = U S V^T and z = U^T y, every quantity of the fixed point is a sum over the eigenvalues,
    so each iteration costs O(min(n, d) x classes) for all classes together."""
    f = _check(features, labels)
    n, dim = f.shape
    y = _one_hot(labels)
    sigma, z2 = _spectrum(f, y)
    if not sigma.max() > 0:
        raise DataError("LogME: the features are all zero")
    sigma = sigma[:, None]
    outside = np.maximum((y**2).sum(0) - z2.sum(0), 0.0)  # part of y no linear map of F can reach
    alpha, beta = np.ones(y.shape[1]), np.ones(y.shape[1])

    def moments(ratio: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """gamma, |m|^2 and |y - F m|^2 at alpha/beta = ratio (m: the posterior mean weights)."""
        gamma = (sigma / (sigma + ratio)).sum(0)
        m2 = (sigma * z2 / (sigma + ratio) ** 2).sum(0)
        residual = (z2 * (ratio / (sigma + ratio)) ** 2).sum(0) + outside
        return gamma, m2, residual

    for _ in range(max_iter):
        ratio = alpha / beta
        gamma, m2, residual = moments(ratio)
        alpha = gamma / (m2 + EPSILON)
        beta = (n - gamma) / (residual + EPSILON)
        if np.all(np.abs(alpha / beta - ratio) <= tol * ratio):
            break
    _, m2, residual = moments(alpha / beta)
    log_det = np.log(alpha + beta * sigma).sum(0) + (dim - len(sigma)) * np.log(alpha)
    evidence = (dim / 2 * np.log(alpha) + n / 2 * np.log(beta) - log_det / 2 - beta / 2 * residual
                - alpha / 2 * m2 - n / 2 * np.log(2 * np.pi))
    return float(np.mean(evidence / n))


def _ledoit_wolf(x: np.ndarray) -> tuple[float, float]:
    """(shrinkage, mu) of the Ledoit-Wolf estimate (1 - s) X^T X / n + s mu I of centred X, from sums
    that need no d x d matrix: sklearn's formula, rewritten in the n x n Gram matrix."""
    n, dim = x.shape
    gram = x @ x.T
    row_norms2 = np.diag(gram)
    trace = row_norms2.sum() / n
    mu = trace / dim
    cov_norm2 = np.sum(gram**2) / n**2  # |X^T X / n|_F^2
    beta = min((np.sum(row_norms2**2) / n - cov_norm2) / (dim * n), (cov_norm2 - 2 * mu * trace + dim * mu**2) / dim)
    delta = (cov_norm2 - 2 * mu * trace + dim * mu**2) / dim
    return (0.0 if beta == 0 else beta / delta), mu


def hscore(features: np.ndarray, labels: np.ndarray) -> float:
    """H-score with a shrunk feature covariance: tr(cov(f)^-1 cov(E[f|y])) (higher transfers better).

    With more dimensions than images the inverse is taken through the Woodbury identity in n x n."""
    f = _check(features, labels)
    x = f - f.mean(0)
    n, dim = x.shape
    y = _one_hot(labels)
    weights = y.sum(0) / n
    means = (y.T @ x) / y.sum(0)[:, None]  # (classes, dim): E[f | y]
    shrinkage, mu = _ledoit_wolf(x)
    a, b = (1 - shrinkage) / n, shrinkage * mu  # cov = a X^T X + b I
    if a == 0:  # fully shrunk: cov = b I
        quad = np.sum(means**2, 1) / b
    elif dim <= n or b == 0:
        cov = a * (x.T @ x) + b * np.eye(dim)
        quad = np.einsum("kd,dk->k", means, np.linalg.solve(cov, means.T))
    else:
        projected = x @ means.T  # (n, classes)
        inner = np.linalg.solve(b / a * np.eye(n) + x @ x.T, projected)
        quad = (np.sum(means**2, 1) - np.einsum("nk,nk->k", projected, inner)) / b
    return float(np.sum(weights * quad))


def probe_accuracy(features: np.ndarray, labels: np.ndarray, C: float = PROBE_C) -> float:
    """Stratified-CV accuracy of a standardised multinomial logistic regression with one fixed C."""
    folds = min(PROBE_FOLDS, int(np.bincount(np.unique(labels, return_inverse=True)[1]).min()))
    if folds < 2:
        raise DataError("the linear probe needs at least 2 images in every class")
    probe = make_pipeline(StandardScaler(), logistic_regression(C))
    cv = StratifiedKFold(folds, shuffle=True, random_state=0)
    return float(cross_val_score(probe, features, labels, cv=cv, scoring="accuracy").mean())


@dataclass
class Candidate:
    """What is ranked: one source (BACKBONE:LAYER) or a fusion of several, concatenated."""

    name: str
    sources: list[str]


@dataclass
class RankRow:
    candidate: str
    logme: float
    hscore: float
    probe_accuracy: float | None
    dim: int
    images_per_second: float | None  # of extraction, from the cache's shard records
    cache_bytes: int
    score_seconds: float  # LogME and H-score together
    probe_seconds: float | None


@dataclass
class RankResult:
    """The ranked candidates, best LogME first, and the files the extraction skipped."""

    rows: list[RankRow]
    skipped: list[tuple[str, str]]  # (path, reason)


def candidates(backbones: list[str], layers: list[str] | None = None, fusions: list[str] | None = None
               ) -> list[Candidate]:
    """Every backbone at each of its chosen layers, then every fusion written A[:LAYER]+B[:LAYER]."""
    out = [Candidate(f"{b}:{layer}", [f"{b}:{layer}"]) for b in backbones for layer in layers_for(b, layers)]
    for fusion in fusions or []:
        parts = [p.strip() for p in fusion.split("+")]
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"fusion {fusion!r}: write two or more sources joined by '+', "
                              "e.g. efficientnet_lite0+efficientnet_lite1:stage6")
        sources = []
        for part in parts:
            backbone, _, layer = part.partition(":")
            sources.append(f"{backbone}:{layers_for(backbone, [layer] if layer else None)[0]}")
        out.append(Candidate("+".join(sources), sources))
    return out


def _cost(stores: dict[str, FeatureStore], sources: list[str]) -> tuple[float | None, int]:
    """(images/s, cache bytes) of a candidate: one pass per distinct backbone, their times add up."""
    summaries = {s: stores[s].summary() for s in sources}
    per_backbone: dict[str, float | None] = {}
    for source in sources:
        per_backbone.setdefault(source.split(":")[0], summaries[source]["images_per_second"])
    rates = list(per_backbone.values())
    speed = None if None in rates else 1 / sum(1 / r for r in rates)
    return speed, sum(s["bytes"] for s in summaries.values())


def rank(data: str | os.PathLike | Dataset, backbones: list[str], layers: list[str] | None = None,
         fusions: list[str] | None = None, cache_dir: str | os.PathLike = DEFAULTS.cache_dir, probe: bool = True,
         progress: bool = True, **extract_options) -> RankResult:
    """Score every candidate on a labelled folder, best LogME first, with the files skipped; features
    come from the cache (extracting only what it lacks), so a second ranking runs no forward pass."""
    chosen = candidates(backbones, layers, fusions)
    sources = list(dict.fromkeys(s for c in chosen for s in c.sources))
    report = extract(data, list(dict.fromkeys(s.split(":")[0] for s in sources)), sources, cache_dir,
                     progress=progress, **extract_options)
    logger.info(f"features: {report.summary()}")
    sets = {f"{b}:{layer}": fs for (b, layer), fs in report.feature_sets.items()}
    warn_trained_on(sets.values(), str(data) if not isinstance(data, Dataset) else "the data",
                    advice="rank it on images the network never saw")
    first = sets[sources[0]]
    if not first.class_names:
        raise ConfigError(f"ranking needs a labelled folder (DIR/<class>/<image>), got {data}")
    labels = first.labels
    stores = {s: FeatureStore(Path(cache_dir) / sets[s].cache_key) for s in sources}
    rows = []
    for candidate in chosen:
        X = np.hstack([sets[s].features.compute() for s in candidate.sources])
        started = time.perf_counter()
        scores = logme(X, labels), hscore(X, labels)
        scored = time.perf_counter()
        accuracy = probe_accuracy(X, labels) if probe else None
        speed, size = _cost(stores, candidate.sources)
        rows.append(RankRow(candidate.name, *scores, accuracy, X.shape[1], speed, size, scored - started,
                            time.perf_counter() - scored if probe else None))
    return RankResult(sorted(rows, key=lambda r: -r.logme), list(report.skipped))


def spearman(rows: list[RankRow], score: str = "logme") -> float | None:
    """Rank correlation between a score and the probe accuracy across candidates (None if undefined)."""
    pairs = [(getattr(r, score), r.probe_accuracy) for r in rows if r.probe_accuracy is not None]
    scores, accuracies = zip(*pairs, strict=True) if pairs else ((), ())
    if len(pairs) < 3 or len(set(scores)) < 2 or len(set(accuracies)) < 2:
        return None
    from scipy.stats import spearmanr

    return float(spearmanr(scores, accuracies).statistic)


def table(rows: list[RankRow]) -> str:
    """The terminal table, best LogME first."""
    width = max([len(r.candidate) for r in rows] + [9])
    lines = [f"{'candidate':<{width}}  {'LogME':>7} {'H-score':>8} {'probe acc':>9} {'dim':>5} {'img/s':>6} "
             f"{'cache':>8}"]
    for r in rows:
        accuracy = "-" if r.probe_accuracy is None else f"{r.probe_accuracy:.1%}"
        speed = "-" if r.images_per_second is None else f"{r.images_per_second:.0f}"
        lines.append(f"{r.candidate:<{width}}  {r.logme:>7.3f} {r.hscore:>8.2f} {accuracy:>9} {r.dim:>5} "
                     f"{speed:>6} {r.cache_bytes / 2**20:>6.1f}MB")
    return "\n".join(lines)


def as_json(rows: list[RankRow]) -> list[dict]:
    return [asdict(r) for r in rows]
