"""Open set: how well does a head say `unknown` for classes it never saw?

    python benchmarks/open_set.py --cache /work/shared-cache [--sets flowers12 dtd10 intel6] [--seeds 0 1 2]

Per set (`../shared/data/<set>`, EfficientNet-Lite0 features from `--cache`) and seed: a third of the
classes (seeded draw) is held back. A logistic-regression head (C=0.1, the project's calibration default,
`reject: {coverage: 0.95}`) is fitted on the training images of the other classes; its test images are
"seen", every test image of the held-back classes "unseen". Reported:

- AUROC of three scores for telling seen from unseen: the head's top probability; the Mahalanobis score
  (minus the smallest distance to a seen class mean, shared Ledoit-Wolf covariance, standardised
  features); and the kNN score (minus the cosine distance to the 10th nearest training image);
- with the head's own threshold (set by CV on the training folder for 95% coverage): the share of seen
  test images answered, and the share of unseen images answered unknown;
- per score, the share of unseen images below the threshold that keeps exactly 95% of the seen test
  images (TNR at 95% TPR), for comparing the scores at the same coverage.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from set_features import set_features
from sklearn.covariance import LedoitWolf
from sklearn.preprocessing import StandardScaler

from pipeline.heads.decision import decide
from pipeline.heads.fit import fit_head
from pipeline.heads.scores import auroc
from pipeline.heads.spec import HEAD_OPTIONS, HeadSpec

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = "efficientnet_lite0"
K = 10


def mahalanobis_score(train: np.ndarray, y: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Minus the smallest Mahalanobis distance to a class mean (shared, shrunk covariance): higher is more
    like a seen class (Lee et al., NeurIPS 2018, on the last layer's features)."""
    scaler = StandardScaler().fit(train)
    train, test = scaler.transform(train), scaler.transform(test)
    means = np.stack([train[y == c].mean(axis=0) for c in np.unique(y)])
    precision = LedoitWolf().fit(train - means[np.searchsorted(np.unique(y), y)]).precision_
    distances = [np.einsum("ij,jk,ik->i", test - m, precision, test - m) for m in means]
    return -np.min(distances, axis=0)


def knn_score(train: np.ndarray, test: np.ndarray, k: int = K) -> np.ndarray:
    """Minus the cosine distance to the k-th nearest training image (Sun et al., ICML 2022)."""
    a = train / np.linalg.norm(train, axis=1, keepdims=True)
    b = test / np.linalg.norm(test, axis=1, keepdims=True)
    similarity = np.sort(b @ a.T, axis=1)[:, -k]
    return similarity - 1.0


def tnr_at_95(seen: np.ndarray, unseen: np.ndarray) -> float:
    """The share of unseen scores below the threshold that keeps 95% of the seen ones."""
    return float((unseen < np.quantile(seen, 0.05)).mean())


def one_split(name: str, sets: dict, seed: int) -> dict:
    (X, y), (X_test, y_test) = sets["train"], sets["test"]
    classes = np.unique(y)
    held = np.random.default_rng(seed).choice(classes, size=len(classes) // 3, replace=False)
    seen_train, seen_test = ~np.isin(y, held), ~np.isin(y_test, held)
    known = np.unique(y[seen_train])
    y_seen = np.searchsorted(known, y[seen_train])
    options = {**HEAD_OPTIONS["logistic_regression"], "C": 0.1, "reject": {"coverage": 0.95, "threshold": None}}
    fitted = fit_head(HeadSpec("open", "logistic_regression", [BACKBONE], options), X[seen_train], y_seen,
                      [X.shape[1]])
    proba = fitted.pipeline.predict_proba(X_test)
    decisions = decide(fitted.decision, proba)
    scores = {"max probability": proba.max(axis=1), "mahalanobis": mahalanobis_score(X[seen_train], y_seen, X_test),
              f"knn (k={K})": knn_score(X[seen_train], X_test)}
    return {"set": name, "seed": seed, "held_back": [int(c) for c in held], "seen_test": int(seen_test.sum()),
            "unseen_test": int((~seen_test).sum()), "threshold": round(fitted.decision.reject_threshold, 4),
            "seen_answered": round(float((~decisions.unknown[seen_test]).mean()), 4),
            "unseen_unknown": round(float(decisions.unknown[~seen_test].mean()), 4),
            "auroc": {k: round(auroc(v[seen_test], v[~seen_test]), 4) for k, v in scores.items()},
            "tnr_at_95": {k: round(tnr_at_95(v[seen_test], v[~seen_test]), 4) for k, v in scores.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data"), help="folder holding the sets")
    parser.add_argument("--sets", nargs="+", default=["flowers12", "dtd10", "intel6"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--cache", default=str(ROOT / "cache"))
    parser.add_argument("--out", default=str(ROOT / "runs/bench/open_set.json"))
    args = parser.parse_args()
    rows = []
    for name in args.sets:
        sets = set_features(args.data, name, BACKBONE, args.cache)
        for seed in args.seeds:
            row = one_split(name, sets, seed)
            rows.append(row)
            print(f"{name:<10} seed {seed}: unseen answered unknown {row['unseen_unknown']:.1%}, seen answered "
                  f"{row['seen_answered']:.1%} (threshold {row['threshold']:.3f}); AUROC "
                  + ", ".join(f"{k} {v:.3f}" for k, v in row["auroc"].items()) + "; TNR@95 "
                  + ", ".join(f"{k} {v:.1%}" for k, v in row["tnr_at_95"].items()), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
