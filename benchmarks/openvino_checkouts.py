"""OpenVINO extraction of two checkouts of this project, interleaved: end to end and the network alone.

    nice -n 10 python benchmarks/openvino_checkouts.py OLD_CHECKOUT NEW_CHECKOUT [--data DIR] [--rounds 3]

Each round runs, for each checkout in turn, a fresh process (this script with `--one`, the checkout's
root as working directory and PYTHONPATH) that converts and compiles EfficientNet-Lite0 (bf16), warms up,
then twice: (a) `extract` with runtime openvino from the JPEG files into a fresh cache, (b) the compiled
network alone on the images decoded beforehand, as that checkout's `extract` runs it (`map` where the
checkout has it, else one call per batch). Prints each process's figures and, per checkout, the medians
and the end-to-end / model-alone ratio of each pair.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def one(data: Path, repeats: int) -> dict[str, list[float]]:
    """The figures of the checkout this process imports `pipeline` from."""
    from pipeline.features.extract import extract
    from pipeline.features.openvino_runtime import NetworkId, compiled_network
    from pipeline.images.data import scan
    from pipeline.images.decode import decode
    from pipeline.models.registry import get_spec
    from pipeline.models.weights import file_sha256, resolve_weights

    spec = get_spec("efficientnet_lite0")
    images = np.stack([decode(path, spec.preprocess) for path in scan(data).paths])
    batches = [images[start:start + 32] for start in range(0, len(images), 32)]
    try:  # checkouts since 2026-11-29 keep some modules in f32 (`f32_modules`), as their `extract` does
        from pipeline.features.extract import f32_modules
        f32 = (f32_modules("efficientnet_lite0", "bf16", "openvino"),)
    except ImportError:
        f32 = ()
    network = compiled_network(NetworkId("efficientnet_lite0", None, file_sha256(resolve_weights(spec)),
                                         (spec.default_layer,), "bf16", *f32))

    def end_to_end() -> float:
        with tempfile.TemporaryDirectory() as cache:
            return extract(data, ["efficientnet_lite0"], cache_dir=cache, precision="bf16", runtime="openvino",
                           progress=False).images_per_second

    def alone() -> float:
        started = time.perf_counter()
        list(network.map(batches)) if hasattr(network, "map") else [network(batch) for batch in batches]
        return len(images) / (time.perf_counter() - started)

    end_to_end(), alone()
    figures: dict[str, list[float]] = {"end_to_end": [], "alone": []}
    for _ in range(repeats):
        figures["end_to_end"].append(end_to_end())
        figures["alone"].append(alone())
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkouts", nargs="*", help="two or more checkouts of this project (their roots)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/flowers12/test"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(Path(args.data).absolute(), 2)))
        return
    figures = {c: {"end_to_end": [], "alone": []} for c in args.checkouts}
    for round_ in range(args.rounds):
        for checkout in args.checkouts:
            done = subprocess.run([sys.executable, str(Path(__file__).absolute()), "--one", "--data",
                                   str(Path(args.data).absolute())], cwd=checkout, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(Path(checkout).absolute())}, check=True)
            for name, values in json.loads(done.stdout.strip().splitlines()[-1]).items():
                figures[checkout][name] += values
            print(round_, checkout, os.getloadavg()[0], {k: [round(v) for v in vs] for k, vs in
                                                          figures[checkout].items()}, flush=True)
    for checkout, values in figures.items():
        e2e, alone = np.median(values["end_to_end"]), np.median(values["alone"])
        pairs = [round(e / a, 2) for e, a in zip(values["end_to_end"], values["alone"], strict=True)]
        print(f"{checkout}: end to end {e2e:.1f} images/s, alone {alone:.1f}, ratio {e2e / alone:.2f}; pairs {pairs}")


if __name__ == "__main__":
    main()
