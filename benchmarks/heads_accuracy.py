"""Stage-2 targets on flowers12: head accuracy, fusion accuracy, and what a second head costs.

    python benchmarks/heads_accuracy.py [--data ../shared/data/flowers12] [--resamples 20]

1. Lite0 features extracted into a fresh cache: the extraction time every head is compared with.
2. Heads on cached features of the project cache (no forward pass; afterwards the run checks that
   extracting again computes no row):
   logistic regression (C by 5-fold CV), the same with C fixed (the fast path for a known setting),
   SVM (RBF), kNN, and PCA fusion of Lite0 + Lite1 + Lite2 (features from the project cache);
   then the out-of-core versions of logistic regression and fusion (blocks of 128 rows).
3. The fusion again with each backbone's last stage (stage7) as three more sources.
4. With --resamples N: logistic regression and the two fusions on N re-drawn 720/240 splits of the
   same 960 images (cached features, C by CV each time): the mean says how much of the official
   split's figure is the split (one test image is 0.42%).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from resplit import resampled_indices
from sklearn.metrics import accuracy_score

from pipeline.features.extract import extract
from pipeline.heads.fit import fit_head
from pipeline.heads.outofcore import fit_incremental, predict_proba_blocks
from pipeline.heads.spec import HEAD_OPTIONS, HeadSpec

ROOT = Path(__file__).resolve().parents[1]


def features(data: Path, backbones: list[str], cache: str, layers: tuple[str, ...] = ("head",)) -> dict:
    """split -> {source: FeatureSet}, a source being BACKBONE for the head layer, else BACKBONE:LAYER."""
    sets = {}
    for split in ("train", "test"):
        report = extract(data / split, backbones, list(layers), cache_dir=cache, progress=False)
        sets[split] = {b if layer == "head" else f"{b}:{layer}": report.feature_sets[(b, layer)]
                       for b in backbones for layer in layers}
        sets[f"{split}_report"] = report
    return sets


def resampled(name: str, head_type: str, sources: list[str], sets: dict, count: int) -> dict:
    """The head's test accuracy on `count` re-drawn splits of train+test, pooled (C by CV each time)."""
    X = np.vstack([np.hstack([sets[split][s].features.compute() for s in sources]) for split in ("train", "test")])
    y = np.concatenate([sets[split][sources[0]].labels for split in ("train", "test")])
    dims = [sets["train"][s].features.shape[1] for s in sources]
    scores = []
    for train, test in resampled_indices(y, test_size=len(sets["test"][sources[0]].labels), count=count):
        fitted = fit_head(HeadSpec(name, head_type, sources, dict(HEAD_OPTIONS[head_type])), X[train], y[train], dims)
        scores.append(float(accuracy_score(y[test], fitted.pipeline.predict(X[test]))))
    return {"head": name, "splits": count, "mean": round(float(np.mean(scores)), 4),
            "std": round(float(np.std(scores)), 4), "min": round(min(scores), 4), "max": round(max(scores), 4)}


def evaluate(name: str, head_type: str, options: dict, sources: list[str], sets: dict) -> dict:
    """Time from cached features to a fitted head with its test predictions."""
    started = time.perf_counter()
    X_train = np.hstack([sets["train"][s].features.compute() for s in sources])
    X_test = np.hstack([sets["test"][s].features.compute() for s in sources])
    y_train, y_test = sets["train"][sources[0]].labels, sets["test"][sources[0]].labels
    dims = [sets["train"][s].features.shape[1] for s in sources]
    fitted = fit_head(HeadSpec(name, head_type, sources, {**HEAD_OPTIONS[head_type], **options}), X_train, y_train,
                      dims)
    accuracy = accuracy_score(y_test, fitted.pipeline.predict(X_test))
    return {"head": name, "accuracy": round(float(accuracy), 4), "seconds": round(time.perf_counter() - started, 2),
            "best_params": {k: str(v) for k, v in fitted.best_params.items()}}


def evaluate_out_of_core(name: str, head_type: str, sources: list[str], sets: dict) -> dict:
    """The block-by-block path a run takes past its memory budget, on blocks of 128 rows."""
    started = time.perf_counter()
    spec = HeadSpec(name, head_type, sources, dict(HEAD_OPTIONS[head_type]))
    fitted = fit_incremental(spec, [sets["train"][s].features for s in sources], sets["train"][sources[0]].labels,
                             block_rows=128)
    proba = predict_proba_blocks(fitted.pipeline, [sets["test"][s].features for s in sources], block_rows=128)
    accuracy = accuracy_score(sets["test"][sources[0]].labels, fitted.pipeline.classes_[proba.argmax(1)])
    return {"head": name, "accuracy": round(float(accuracy), 4), "seconds": round(time.perf_counter() - started, 2),
            "best_params": {k: str(v) for k, v in fitted.best_params.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/flowers12"))
    parser.add_argument("--cache", default=str(ROOT / "cache"), help="cache for Lite1/Lite2 (reused)")
    parser.add_argument("--resamples", type=int, default=0, help="also score on N re-drawn splits")
    parser.add_argument("--out", default=str(ROOT / "runs/bench/heads_accuracy.json"))
    args = parser.parse_args()
    data = Path(args.data)
    with tempfile.TemporaryDirectory() as fresh:
        started = time.perf_counter()
        features(data, ["efficientnet_lite0"], fresh)
        extraction = time.perf_counter() - started
    lites = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    all_three = features(data, lites, args.cache, ("head", "stage7"))
    with_stage7 = [source for b in lites for source in (b, f"{b}:stage7")]
    heads = [
        evaluate("logreg (C by CV)", "logistic_regression", {}, ["efficientnet_lite0"], all_three),
        evaluate("logreg (C=0.1 fixed)", "logistic_regression", {"C": [0.1]}, ["efficientnet_lite0"], all_three),
        evaluate("svm rbf", "svm", {}, ["efficientnet_lite0"], all_three),
        evaluate("knn", "knn", {}, ["efficientnet_lite0"], all_three),
        evaluate("pca fusion lite0+1+2", "pca_fusion", {}, ["efficientnet_lite0", "efficientnet_lite1",
                                                             "efficientnet_lite2"], all_three),
        evaluate_out_of_core("out-of-core logreg (SGD)", "logistic_regression", ["efficientnet_lite0"], all_three),
        evaluate_out_of_core("out-of-core fusion 0+1+2", "pca_fusion",
                             ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"], all_three),
        evaluate("pca fusion + stage7 of each", "pca_fusion", {}, with_stage7, all_three),
    ]
    again = features(data, lites, args.cache, ("head", "stage7"))
    assert again["train_report"].computed + again["test_report"].computed == 0, "the heads needed a forward pass"
    result = {"extraction_seconds_lite0_960_images": round(extraction, 2), "heads": heads}
    if args.resamples:
        result["resampled"] = [
            resampled("logreg (C by CV)", "logistic_regression", lites[:1], all_three, args.resamples),
            resampled("pca fusion lite0+1+2", "pca_fusion", lites, all_three, args.resamples),
            resampled("pca fusion + stage7 of each", "pca_fusion", with_stage7, all_three, args.resamples)]
    for head in heads:
        head["fraction_of_extraction"] = round(head["seconds"] / extraction, 3)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"Lite0 extraction of train+test (960 images, fresh cache): {extraction:.1f} s")
    for head in heads:
        print(f"{head['head']:<28} test accuracy {head['accuracy']:.2%}  {head['seconds']:6.2f} s "
              f"({head['fraction_of_extraction']:.1%} of extraction)  {head['best_params']}")
    for row in result.get("resampled", []):
        print(f"{row['head']:<28} over {row['splits']} re-drawn splits: mean {row['mean']:.2%} "
              f"(sd {row['std']:.2%}, {row['min']:.2%} to {row['max']:.2%})")


if __name__ == "__main__":
    main()
