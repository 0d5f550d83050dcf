"""How far bf16 autocast features are from fp32 ones, and what that does to a linear probe.

    python benchmarks/bf16_fidelity.py [--data ../shared/data/flowers12] [--cache cache]

Extracts train and test with both precisions (each into its own cache key, so reruns are free),
reports per-image cosine similarity and the test accuracy of the same logistic-regression probe
(the heads' own, C=0.1).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.features.extract import extract
from pipeline.heads.fit import logistic_regression

ROOT = Path(__file__).resolve().parents[1]


def features(folder: Path, backbone: str, precision: str, cache: str):
    report = extract(folder, [backbone], cache_dir=cache, precision=precision, progress=True)
    (fs,) = report.feature_sets.values()
    return fs.features.compute(), fs.labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/flowers12"))
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--cache", default=str(ROOT / "cache"))
    parser.add_argument("--out", default=str(ROOT / "runs/bench/bf16_fidelity.json"))
    args = parser.parse_args()
    data = Path(args.data)
    result: dict = {"backbone": args.backbone}
    feats = {p: {s: features(data / s, args.backbone, p, args.cache) for s in ("train", "test")}
             for p in ("fp32", "bf16")}
    a, b = feats["fp32"]["test"][0], feats["bf16"]["test"][0]
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    result["cosine_min"], result["cosine_mean"] = round(float(cosine.min()), 5), round(float(cosine.mean()), 5)
    for precision, splits in feats.items():
        probe = make_pipeline(StandardScaler(), logistic_regression(C=0.1))
        probe.fit(*splits["train"])
        result[f"probe_accuracy_{precision}"] = round(float(probe.score(*splits["test"])), 4)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
