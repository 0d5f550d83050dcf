"""Imbalanced classes: balanced accuracy with and without `class_weight: balanced` (and, for two
classes, `tune_threshold`).

    python benchmarks/imbalance.py --cache /work/shared-cache [--sets flowers12 dtd10 intel6] [--keep 5] \
        [--seeds 0 1 2]

Per set (`../shared/data/<set>`, EfficientNet-Lite0 features from `--cache`): half of the classes (seeded
draw) keep only `--keep` training images each, the others all of theirs; the test split is untouched
(balanced). Logistic regression (C=0.1, calibration none: the point is the weights) is fitted with and
without class_weight: balanced. Then a two-class case per set: the first class with all its training images
against the second with `--keep`, logistic regression plain, with class weights, and with
tune_threshold (the decision threshold that maximises cross-validated balanced accuracy; a degenerate one
is refused and 0.5 kept, and the row says why). Each seed draws other thinned classes and images.
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
            "threshold": fitted.decision.binary_threshold, "threshold_refused": fitted.threshold_refused}


def thinned_rows(data: dict, keep: int, seed: int) -> list[dict]:
    """The five fits of one set and seed: half the classes thinned to `keep`, then two classes."""
    (X, y), (X_test, y_test) = data["train"], data["test"]
    classes = np.unique(y)
    few = np.random.default_rng(seed).choice(classes, size=len(classes) // 2, replace=False)
    mask = thinned(y, few, keep, seed)
    rows = [{"case": f"{len(few)} of {len(classes)} classes at {keep} images",
             **fit_score(head, "logistic_regression", options, X[mask], y[mask], X_test, y_test)}
            for head, options in (("logreg", {}), ("logreg balanced", {"class_weight": "balanced"}))]
    pair = np.isin(y, classes[:2]) & thinned(y, classes[1:2], keep, seed)
    pair_test = np.isin(y_test, classes[:2])
    for head, options in (("logreg", {}), ("logreg balanced", {"class_weight": "balanced"}),
                          ("logreg tuned threshold", {"tune_threshold": True})):
        rows.append({"case": f"two classes, {(y[pair] == classes[0]).sum()} against {keep}",
                     **fit_score(head, "logistic_regression", options, X[pair], y[pair], X_test[pair_test],
                                 y_test[pair_test])})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data"), help="folder holding the sets")
    parser.add_argument("--sets", nargs="+", default=["flowers12", "dtd10", "intel6"])
    parser.add_argument("--keep", type=int, default=5, help="training images left in each thinned class")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one draw of the thinning each")
    parser.add_argument("--cache", default=str(ROOT / "cache"))
    parser.add_argument("--out", default=str(ROOT / "runs/bench/imbalance.json"))
    args = parser.parse_args()
    rows = []
    for name in args.sets:
        data = set_features(args.data, name, BACKBONE, args.cache)
        for seed in args.seeds:
            rows += [{"set": name, "seed": seed, **row} for row in thinned_rows(data, args.keep, seed)]
            for row in rows[-5:]:
                print(f"{name:<10} seed {seed} {row['case']:<32} {row['head']:<24} balanced accuracy "
                      f"{row['balanced_accuracy']:.2%}  accuracy {row['accuracy']:.2%}"
                      + ("" if row["threshold"] is None else f"  threshold {row['threshold']:.3f}")
                      + ("" if row["threshold_refused"] is None else f" ({row['threshold_refused']})"), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
