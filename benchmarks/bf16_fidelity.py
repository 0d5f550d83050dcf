"""How far bf16 and OpenVINO features are from torch fp32 ones, and what that does to a linear probe.

    python benchmarks/bf16_fidelity.py [--data ../shared/data/flowers12] [--cache cache]
        [--variants torch_fp32,openvino_bf16]

Extracts train and test with each runtime and precision (torch fp32, the reference; torch bf16 autocast;
OpenVINO with the bf16 and the f32 precision hint), each into its own cache key, so reruns are free;
reports per-image cosine similarity to the reference on the test split and the test accuracy of the same
logistic-regression probe (the heads' own, C=0.1) fitted on each, with the number of test images whose
predicted class differs from the reference probe's. `--variants` picks some of them (the reference is always
computed).
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
VARIANTS = [("torch", "fp32"), ("torch", "bf16"), ("openvino", "bf16"), ("openvino", "fp32")]  # reference first


def features(folder: Path, backbone: str, runtime: str, precision: str, cache: str):
    report = extract(folder, [backbone], cache_dir=cache, precision=precision, runtime=runtime, progress=True)
    (fs,) = report.feature_sets.values()
    return fs.features.compute(), fs.labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/flowers12"))
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--cache", default=str(ROOT / "cache"))
    parser.add_argument("--out", default=str(ROOT / "runs/bench/bf16_fidelity.json"))
    parser.add_argument("--variants", default=",".join(f"{r}_{p}" for r, p in VARIANTS),
                        help="comma-separated RUNTIME_PRECISION names (default: all four)")
    args = parser.parse_args()
    chosen = {"torch_fp32", *args.variants.split(",")}
    unknown = chosen - {f"{r}_{p}" for r, p in VARIANTS}
    if unknown:
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
    data = Path(args.data)
    result: dict = {"backbone": args.backbone}
    predictions, reference = {}, None
    for runtime, precision in VARIANTS:
        name = f"{runtime}_{precision}"
        if name not in chosen:
            continue
        (x_train, y_train), (x_test, y_test) = (features(data / s, args.backbone, runtime, precision, args.cache)
                                                for s in ("train", "test"))
        probe = make_pipeline(StandardScaler(), logistic_regression(C=0.1)).fit(x_train, y_train)
        predictions[name] = probe.predict(x_test)
        reference = x_test if reference is None else reference
        cosine = (x_test * reference).sum(1) / np.linalg.norm(x_test, axis=1) / np.linalg.norm(reference, axis=1)
        result[name] = {"cosine_min": round(float(cosine.min()), 5), "cosine_mean": round(float(cosine.mean()), 5),
                        "probe_accuracy": round(float((predictions[name] == y_test).mean()), 4),
                        "probe_correct": int((predictions[name] == y_test).sum()), "test_images": len(y_test),
                        "predictions_differing_from_reference": int((predictions[name]
                                                                     != predictions["torch_fp32"]).sum())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
