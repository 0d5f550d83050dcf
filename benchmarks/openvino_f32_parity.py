"""What keeping a backbone's `openvino_f32` modules in f32 does for an exported head: the probabilities a
logistic-regression head fitted on OpenVINO bf16 features gives through `pipeline predict` (those
features) against through its ONNX export (fp32 features, computed here by torch fp32, which the
export's graph matches to 1e-6), with block 0 in f32 (the default since 2026-11-29) and with every
layer in bf16 (before).

    nice -n 10 python benchmarks/openvino_f32_parity.py [--sets flowers12 dtd10 intel6] [--cache CACHE]

Each set's head is fitted with `pipeline fit`'s defaults on its train folder, scored on its test folder.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from pipeline.app.fit import fit
from pipeline.features.extract import extract
from pipeline.heads.bundle import load_bundle
from pipeline.models import registry
from pipeline.models.registry import get_spec

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = "efficientnet_lite0"


def test_features(data: Path, cache: str, **options) -> np.ndarray:
    report = extract(data / "test", BACKBONE, cache_dir=cache, progress=False, **options)
    return report.feature_sets[(BACKBONE, "head")].features.compute()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=["flowers12", "dtd10", "intel6"])
    parser.add_argument("--cache", default=str(ROOT / "cache"))
    parser.add_argument("--out", default=str(ROOT / "runs/bench/openvino_f32_parity.json"))
    args = parser.parse_args()
    spec = get_spec(BACKBONE)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as out:
        for name in args.sets:
            data = ROOT.parent / "shared/data" / name

            fp32 = test_features(data, args.cache, runtime="torch", precision="fp32")
            results[name] = {}
            for label, kept in (("block 0 in f32", True), ("every layer in bf16", False)):
                registry._SPECS[BACKBONE] = spec if kept else replace(spec, openvino_f32=())
                head = fit(data / "train", "logistic_regression", Path(out) / f"{name}-{kept}.skops",
                           backbones=[BACKBONE], cache_dir=args.cache, progress=False).path
                registry._SPECS[BACKBONE] = spec
                pipeline = load_bundle(head).pipeline
                served = pipeline.predict_proba(test_features(data, args.cache, runtime="openvino", precision="bf16",
                                                              openvino_f32=kept))
                exported = pipeline.predict_proba(fp32)
                gap = np.abs(served - exported).max(1)
                results[name][label] = {
                    "images": len(gap), "largest_difference": float(gap.max()), "mean_difference": float(gap.mean()),
                    "images_over_1e-3": int((gap > 1e-3).sum()),
                    "class_differs": int((served.argmax(1) != exported.argmax(1)).sum())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
