"""Which calibration by default? Every method on every head type, three data sets, three backbones.

    python benchmarks/calibration.py --cache /work/shared-cache [--sets flowers12 dtd10 intel6]

For each set (`../shared/data/<set>`, its official train/test split) and each of EfficientNet-Lite0/1/2
(features from `--cache`, extracted there beforehand or now): logistic regression (C=0.1) on each; kNN
(k=10) on Lite0; the PCA fusion of the three (C=0.1); each with calibration none, sigmoid, isotonic and
temperature (fitted on folds of the training split only). The settings are fixed (the values the default
grids choose most often on flowers12) so that the methods differ only in their calibration, and so that
the script runs on a loaded 2-core machine; the SVM is left out for the same reason (its Platt scaling
nested in a calibration costs 36 SVM fits per head). Scores on the test
split: accuracy, ECE (15 bins) and log-loss. The summary is the mean over every (set, backbone, head),
and how often each method had the lowest log-loss.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from pipeline.features.extract import extract
from pipeline.heads.fit import fit_head
from pipeline.heads.scores import calibration_scores
from pipeline.heads.spec import HEAD_OPTIONS, HeadSpec
from pipeline.heads.trust_options import CALIBRATIONS

ROOT = Path(__file__).resolve().parents[1]
LITES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]


def load(data: Path, cache: str) -> dict:
    """split -> (backbone -> features, labels)."""
    sets = {}
    for split in ("train", "test"):
        report = extract(data / split, LITES, ["head"], cache_dir=cache, progress=False)
        first = report.feature_sets[(LITES[0], "head")]
        sets[split] = ({b: report.feature_sets[(b, "head")].features.compute() for b in LITES}, first.labels)
    return sets


def score(name: str, head_type: str, sources: list[str], settings: dict, sets: dict) -> list[dict]:
    """The head with each method, its setting fixed."""
    (train, y_train), (test, y_test) = sets["train"], sets["test"]
    X_train, X_test = (np.hstack([block[s] for s in sources]) for block in (train, test))
    dims = [train[s].shape[1] for s in sources]
    rows = []
    for method in CALIBRATIONS:
        started = time.perf_counter()
        options = {**HEAD_OPTIONS[head_type], **settings, "calibration": method}
        fitted = fit_head(HeadSpec(name, head_type, sources, options), X_train, y_train, dims)
        proba = fitted.pipeline.predict_proba(X_test)
        accuracy = round(float((proba.argmax(1) == y_test).mean()), 4)
        rows.append({"head": name, "calibration": method, "accuracy": accuracy,
                     **calibration_scores(y_test, proba), "seconds": round(time.perf_counter() - started, 2)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data"), help="folder holding the sets")
    parser.add_argument("--sets", nargs="+", default=["flowers12", "dtd10", "intel6"])
    parser.add_argument("--cache", default=str(ROOT / "cache"))
    parser.add_argument("--out", default=str(ROOT / "runs/bench/calibration.json"))
    args = parser.parse_args()
    rows = []
    for name in args.sets:
        sets = load(Path(args.data) / name, args.cache)
        heads = [*[(f"logreg {b[-5:]}", "logistic_regression", [b], {"C": 0.1}) for b in LITES],
                 ("knn lite0", "knn", LITES[:1], {"n_neighbors": 10}),
                 ("fusion lite0+1+2", "pca_fusion", LITES, {"C": 0.1})]
        for head, head_type, sources, settings in heads:
            for row in score(head, head_type, sources, settings, sets):
                row = {"set": name, **row}
                rows.append(row)
                print(f"{name:<10} {head:<17} {row['calibration']:<12} acc {row['accuracy']:.2%}  "
                      f"ECE {row['ece']:.4f}  "
                      f"log-loss {row['log_loss']:.4f}  {row['seconds']:6.1f} s", flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"rows": rows}, indent=1))  # so far
    summary = {}
    groups = {(r["set"], r["head"]) for r in rows}
    for method in CALIBRATIONS:
        mine = [r for r in rows if r["calibration"] == method]
        wins = sum(min((r for r in rows if (r["set"], r["head"]) == g), key=lambda r: r["log_loss"])["calibration"]
                   == method for g in groups)
        summary[method] = {key: round(float(np.mean([r[key] for r in mine])), 4)
                           for key in ("accuracy", "ece", "log_loss", "seconds")} | {"lowest_log_loss": wins}
    print(f"\nmean over {len(groups)} (set, head) pairs:")
    for method, s in summary.items():
        print(f"{method:<12} acc {s['accuracy']:.2%}  ECE {s['ece']:.4f}  log-loss {s['log_loss']:.4f}  "
              f"fit {s['seconds']:.1f} s  lowest log-loss in {s['lowest_log_loss']}/{len(groups)}")
    Path(args.out).write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
