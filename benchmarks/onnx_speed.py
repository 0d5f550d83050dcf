"""The exported ONNX model on onnxruntime: single-image latency and batch-32 throughput, beside the torch path.

    python benchmarks/onnx_speed.py --head runs/bench/logreg.skops [--rounds 5]

Exports the head (`pipeline export`) into a temporary folder, then alternates, `--rounds` times: (a) the
ONNX model on onnxruntime (CPU provider, default threads): one image per call, then batches of 32; (b) the
same networks and head in torch at fp32 (`HeadNetwork.module`, then the scikit-learn head), as the exported
model computes them; (c) the torch path at the head's precision (what `pipeline predict` and `pipeline
serve` run: bf16 autocast for a head fitted on bf16 features). Inputs are flowers12 test photos decoded
into memory beforehand; decoding is not timed. Prints medians and writes runs/bench/onnx_speed.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from pipeline.deploy.export import export_onnx
from pipeline.deploy.network import HeadNetwork
from pipeline.heads.bundle import load_bundle
from pipeline.images.data import scan
from pipeline.images.decode import decode

ROOT = Path(__file__).resolve().parents[1]


def latency_ms(run, images: np.ndarray, calls: int) -> list[float]:
    times = []
    for i in range(calls):
        started = time.perf_counter()
        run(images[i % len(images)][None])
        times.append((time.perf_counter() - started) * 1000)
    return times


def throughput(run, images: np.ndarray, batch: int = 32) -> float:
    started = time.perf_counter()
    for start in range(0, len(images) - batch + 1, batch):
        run(images[start:start + batch])
    return (len(images) // batch * batch) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head", required=True, help="a saved head (.skops) on one backbone")
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/flowers12/test"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=50, help="single-image calls per round")
    parser.add_argument("--images", type=int, default=96, help="photos decoded into memory (batches of 32 of them)")
    parser.add_argument("--out", default="runs/bench/onnx_speed.json")
    args = parser.parse_args()

    bundle = load_bundle(args.head)
    network = HeadNetwork(bundle, args.head)
    (name, geometry), = network.inputs.items()
    pre = network.preprocess_for(name)
    images = np.stack([decode(p, pre) for p in scan(args.data).paths[::2][:args.images]])
    with tempfile.TemporaryDirectory() as folder:
        exported = export_onnx(args.head, Path(folder) / "model.onnx")
        session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    fp32 = network.module()

    def onnx_run(batch: np.ndarray) -> np.ndarray:
        return session.run(["probabilities"], {name: batch})[0]

    def torch_fp32(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return bundle.pipeline.predict_proba(fp32(torch.from_numpy(batch)).numpy())

    def torch_head_precision(batch: np.ndarray) -> np.ndarray:
        return bundle.pipeline.predict_proba(network.features({name: batch}))

    paths = {"onnxruntime fp32": onnx_run, "torch fp32": torch_fp32,
             f"torch {network.precision} (predict, serve)": torch_head_precision}
    for run in paths.values():  # warm-up
        run(images[:32])
        run(images[:1])
    results: dict[str, dict[str, list[float]]] = {p: {"p50_ms": [], "p99_ms": [], "batch32_per_s": []} for p in paths}
    for index in range(args.rounds):
        for label, run in paths.items():
            times = latency_ms(run, images, args.calls)
            results[label]["p50_ms"].append(float(np.percentile(times, 50)))
            results[label]["p99_ms"].append(float(np.percentile(times, 99)))
            results[label]["batch32_per_s"].append(throughput(run, images))
            print(f"round {index + 1}: {label}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in results[label].items()),
                  flush=True)
    summary = {label: {key: statistics.median(values) for key, values in figures.items()}
               for label, figures in results.items()}
    for label, figures in summary.items():
        print(f"{label:34s} single image p50 {figures['p50_ms']:6.1f} ms, p99 {figures['p99_ms']:6.1f} ms; "
              f"batch 32 {figures['batch32_per_s']:6.1f} images/s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"head": args.head, "backbones": [s.backbone for s in bundle.sources],
                               "input": geometry.describe(), "model_mib": exported.bytes / 2**20,
                               "machine": platform.processor() or platform.machine(),
                               "threads": torch.get_num_threads(),
                               "summary": summary, "rounds": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
