"""Which calibration by default? Every method on every head type, judged by cross-validation inside the
training folders of three data sets (their test splits are never read).

    python benchmarks/calibration.py --cache /work/shared-cache [--sets flowers12 dtd10 intel6] [--seeds 0 1]

For each set (`../shared/data/<set>`), only its train folder: stratified K-fold (`--folds`, 3) re-drawn
with each of `--seeds`. On each fold, each head is fitted on the fold's training part with each
calibration method (none, sigmoid, isotonic, temperature), the method itself cross-validated inside that
part as `pipeline fit` does it (five folds), and scored on the fold's held-out part: accuracy, ECE (15
bins), log-loss. The heads, on EfficientNet-Lite0/1/2 features read from `--cache` (`--runtime torch`:
the shared cache holds all three so; nothing is extracted when the cache has them):

- logistic regression, C=0.1, on each of Lite0, Lite1, Lite2;
- kNN, k=10, on Lite0;
- PCA fusion of Lite0+1+2 (128 components per source), C=0.1;
- SVM (rbf), C=10, gamma=1e-4, on Lite0.

The settings are fixed (logistic regression and kNN: the values the default grids choose most often on
flowers12; the SVM: what its default grid chooses by 5-fold CV on each of the three train folders) so
that the methods differ only in their calibration and the script runs on a loaded 2-core machine.
The summary: per head type and method, the mean over sets, seeds, folds and backbones, and in how many
(set, seed, fold, head) cases the method had the lowest log-loss.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from set_features import set_features
from sklearn.model_selection import StratifiedKFold

from pipeline.heads.fit import fit_head
from pipeline.heads.scores import calibration_scores
from pipeline.heads.spec import HEAD_OPTIONS, HeadSpec
from pipeline.heads.trust_options import CALIBRATIONS

ROOT = Path(__file__).resolve().parents[1]
LITES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
# (name, head type, sources, fixed settings)
HEADS = [*[(f"logreg {b[-5:]}", "logistic_regression", [b], {"C": 0.1}) for b in LITES],
         ("knn lite0", "knn", LITES[:1], {"n_neighbors": 10}),
         ("fusion lite0+1+2", "pca_fusion", LITES, {"C": 0.1}),
         ("svm lite0", "svm", LITES[:1], {"C": 10.0, "gamma": 1e-4})]


def fold_rows(features: dict[str, np.ndarray], y: np.ndarray, train: np.ndarray, held: np.ndarray) -> list[dict]:
    """Every head with every method, fitted on rows `train`, scored on rows `held`."""
    rows = []
    for name, head_type, sources, settings in HEADS:
        X = np.hstack([features[s] for s in sources])
        dims = [features[s].shape[1] for s in sources]
        for method in CALIBRATIONS:
            started = time.perf_counter()
            options = {**HEAD_OPTIONS[head_type], **settings, "calibration": method}
            fitted = fit_head(HeadSpec(name, head_type, sources, options), X[train], y[train], dims)
            proba = fitted.pipeline.predict_proba(X[held])
            rows.append({"head": name, "type": head_type, "calibration": method,
                         "accuracy": round(float((proba.argmax(1) == y[held]).mean()), 4),
                         **calibration_scores(y[held], proba), "seconds": round(time.perf_counter() - started, 2)})
    return rows


def summarise(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """head type -> method -> mean accuracy, ECE, log-loss and seconds, and `lowest_log_loss`: in how many of
    the type's (set, seed, fold, head) cases the method's log-loss was the lowest (of `cases`)."""
    summary: dict[str, dict[str, dict]] = {}
    for head_type in dict.fromkeys(r["type"] for r in rows):
        mine = [r for r in rows if r["type"] == head_type]
        cases: dict[tuple, list[dict]] = {}
        for r in mine:
            cases.setdefault((r["set"], r["seed"], r["fold"], r["head"]), []).append(r)
        winners = [min(case, key=lambda r: r["log_loss"])["calibration"] for case in cases.values()]
        summary[head_type] = {
            method: {key: round(float(np.mean([r[key] for r in mine if r["calibration"] == method])), 4)
                     for key in ("accuracy", "ece", "log_loss", "seconds")}
            | {"lowest_log_loss": winners.count(method), "cases": len(cases)}
            for method in CALIBRATIONS}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data"), help="folder holding the sets")
    parser.add_argument("--sets", nargs="+", default=["flowers12", "dtd10", "intel6"])
    parser.add_argument("--folds", type=int, default=3, help="folds of each set's train folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one draw of the folds per seed")
    parser.add_argument("--cache", default=str(ROOT / "cache"))
    parser.add_argument("--runtime", default="torch", help="the runtime whose cached features are read")
    parser.add_argument("--out", default=str(ROOT / "runs/bench/calibration.json"))
    args = parser.parse_args()
    sets = {}
    for name in args.sets:
        train = {b: set_features(args.data, name, b, args.cache, runtime=args.runtime, splits=("train",))["train"]
                 for b in LITES}
        sets[name] = ({b: X for b, (X, _) in train.items()}, train[LITES[0]][1])
    rows: list[dict] = []
    for seed in args.seeds:  # every set with the first seed before the second
        for name, (features, y) in sets.items():
            folds = StratifiedKFold(args.folds, shuffle=True, random_state=seed).split(y, y)
            for fold, (fit_rows, held_rows) in enumerate(folds):
                for row in fold_rows(features, y, fit_rows, held_rows):
                    rows.append({"set": name, "seed": seed, "fold": fold, **row})
                    print(f"{name:<10} seed {seed} fold {fold}  {row['head']:<17} {row['calibration']:<12} "
                          f"acc {row['accuracy']:.2%}  ECE {row['ece']:.4f}  log-loss {row['log_loss']:.4f}  "
                          f"{row['seconds']:6.1f} s", flush=True)
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps({"rows": rows}, indent=1))  # so far
    summary = summarise(rows)
    for head_type, methods in summary.items():
        print(f"\n{head_type}: mean over {next(iter(methods.values()))['cases']} (set, seed, fold, head) cases")
        for method, s in methods.items():
            print(f"  {method:<12} acc {s['accuracy']:.2%}  ECE {s['ece']:.4f}  log-loss {s['log_loss']:.4f}  "
                  f"fit {s['seconds']:.1f} s  lowest log-loss in {s['lowest_log_loss']}/{s['cases']}")
    Path(args.out).write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
