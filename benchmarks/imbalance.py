"""Imbalanced classes: balanced accuracy with and without `class_weight: balanced` (and, for two
classes, `tune_threshold`).

    python benchmarks/imbalance.py --cache /work/shared-cache [--sets flowers12 dtd10 intel6] [--keep 5]

Per set (`../shared/data/<set>`, EfficientNet-Lite0 features from `--cache`): half of the classes (seeded
draw) keep only `--keep` training images each, the others all of theirs; the test split is untouched
(balanced). Logistic regression (C=0.1, calibration none: the point is the weights) is fitted with and
without class_weight: balanced. Then a two-class case per set: the first class with all its training images
against the second with `--keep`, logistic regression plain, with class weights, and with
tune_threshold (the decision threshold that maximises cross-validated balanced accuracy).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from set_features import set_features
from sklearn.metrics import accuracy_score

from pipeline.heads.decision import decide
from pipeline.heads.fit import fit_head
from pipeline.heads.scores import balanced_accuracy
from pipeline.heads.spec import HEAD_OPTIONS, HeadSpec

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = "efficientnet_lite0"


def thinned(y: np.ndarray, classes: np.ndarray, keep: int, seed: int) -> np.ndarray:
    """Row mask: every row, but only the first `keep` (seeded order) of each class in `classes`."""
    rng = np.random.default_rng(seed)
    mask = np.ones(len(y), bool)
    for c in classes:
        rows = rng.permutation(np.flatnonzero(y == c))
        mask[rows[keep:]] = False
    return mask


def fit_score(name: str, head_type: str, options: dict, X: np.ndarray, y: np.ndarray, X_test: np.ndarray,
              y_test: np.ndarray) -> dict:
    spec = HeadSpec(name, head_type, [BACKBONE], {**HEAD_OPTIONS[head_type], "C": 0.1, "calibration": "none",
                                                  **options})
    fitted = fit_head(spec, X, y, [X.shape[1]])
    predicted = decide(fitted.decision, fitted.pipeline.predict_proba(X_test)).label
    return {"head": name, "balanced_accuracy": round(balanced_accuracy(y_test, predicted), 4),
            "accuracy": round(float(accuracy_score(y_test, predicted)), 4),
            "threshold": fitted.decision.binary_threshold}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data"), help="folder holding the sets")
    parser.add_argument("--sets", nargs="+", default=["flowers12", "dtd10", "intel6"])
    parser.add_argument("--keep", type=int, default=5, help="training images left in each thinned class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=str(ROOT / "cache"))
    parser.add_argument("--out", default=str(ROOT / "runs/bench/imbalance.json"))
    args = parser.parse_args()
    rows = []
    for name in args.sets:
        data = set_features(args.data, name, BACKBONE, args.cache)
        (X, y), (X_test, y_test) = data["train"], data["test"]
        classes = np.unique(y)
        few = np.random.default_rng(args.seed).choice(classes, size=len(classes) // 2, replace=False)
        mask = thinned(y, few, args.keep, args.seed)
        cases = [("logreg", "logistic_regression", {}),
                 ("logreg balanced", "logistic_regression", {"class_weight": "balanced"})]
        for head, head_type, options in cases:
            rows.append({"set": name, "case": f"{len(few)} of {len(classes)} classes at {args.keep} images",
                         **fit_score(head, head_type, options, X[mask], y[mask], X_test, y_test)})
        pair = np.isin(y, classes[:2]) & thinned(y, classes[1:2], args.keep, args.seed)
        pair_test = np.isin(y_test, classes[:2])
        for head, options in (("logreg", {}), ("logreg balanced", {"class_weight": "balanced"}),
                              ("logreg tuned threshold", {"tune_threshold": True})):
            rows.append({"set": name, "case": f"two classes, {(y[pair] == classes[0]).sum()} against {args.keep}",
                         **fit_score(head, "logistic_regression", options, X[pair], y[pair], X_test[pair_test],
                                     y_test[pair_test])})
        for row in rows[-5:]:
            print(f"{row['set']:<10} {row['case']:<32} {row['head']:<24} balanced accuracy "
                  f"{row['balanced_accuracy']:.2%}  accuracy {row['accuracy']:.2%}"
                  + ("" if row["threshold"] is None else f"  threshold {row['threshold']:.3f}"), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
