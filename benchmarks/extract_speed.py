"""End-to-end extraction speed beside a tutorial-style loop and the model alone, in one run.

    python benchmarks/extract_speed.py [--data ../shared/data/flowers12/train] [--backbone efficientnet_lite0]

(a) tutorial: torchvision ImageFolder + PIL transforms + DataLoader(num_workers=2), fp32, eager, no_grad;
(b) model alone: the same network on images already decoded into memory, at the pipeline's precision;
(c) pipeline: `extract` from JPEG files on disk into a fresh cache (hashing, decoding, zarr writes included).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from pipeline.features.extract import extract, forward, resolve_device, resolve_precision
from pipeline.images.data import scan
from pipeline.images.decode import decode
from pipeline.models.taps import tapped
from pipeline.models.weights import LoadedBackbone, load_backbone

ROOT = Path(__file__).resolve().parents[1]


def tutorial_loop(data: Path, loaded: LoadedBackbone, device: str, batch_size: int) -> float:
    pre = loaded.spec.preprocess
    transform = transforms.Compose([
        transforms.Resize(pre.resize, interpolation=transforms.InterpolationMode(pre.interpolation)),
        transforms.CenterCrop(pre.crop), transforms.ToTensor(), transforms.Normalize(pre.mean, pre.std)])
    loader = DataLoader(datasets.ImageFolder(str(data), transform), batch_size=batch_size, num_workers=2)
    network = tapped(loaded, [loaded.spec.default_layer]).to(device)
    started, count = time.perf_counter(), 0
    with torch.no_grad():
        for images, _labels in loader:
            network(images.to(device))
            count += len(images)
    return count / (time.perf_counter() - started)


def model_alone(paths: list[Path], loaded: LoadedBackbone, device: str, precision: str,
                batch_size: int) -> float:
    pre = loaded.spec.preprocess
    images = np.stack([decode(p, pre) for p in paths])
    network = tapped(loaded, [loaded.spec.default_layer]).to(device, memory_format=torch.channels_last)
    forward(network, pre, images[:batch_size], device, precision)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for start in range(0, len(images), batch_size):
        forward(network, pre, images[start:start + batch_size], device, precision)
    return len(images) / (time.perf_counter() - started)


def pipeline_end_to_end(data: Path, backbone: str, device: str, precision: str, batch_size: int) -> float:
    """Into a fresh cache each time, so every image is computed (the first call also loads the model)."""
    with tempfile.TemporaryDirectory() as cache:  # the torch path, as the model alone (openvino_speed.py: OpenVINO)
        report = extract(data, [backbone], cache_dir=cache, device=device, precision=precision, runtime="torch",
                         batch_size=batch_size, progress=False)
    return report.images / report.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/flowers12/train"))
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "runs/bench/extract_speed.json"))
    args = parser.parse_args()
    data = Path(args.data)
    device = resolve_device(args.device)
    precision = resolve_precision("auto", device)
    loaded = load_backbone(args.backbone)
    paths = scan(data).paths

    # Timings on a shared 2-core machine wander by several percent from run to run, so the two fast
    # paths are measured alternately, `--repeats` times each, and compared on their medians.
    pipeline_end_to_end(data, args.backbone, device, precision, args.batch_size)  # warm-up
    tutorial = tutorial_loop(data, loaded, device, args.batch_size)
    alone_runs, ours_runs = [], []
    for _ in range(args.repeats):
        alone_runs.append(model_alone(paths, loaded, device, precision, args.batch_size))
        ours_runs.append(pipeline_end_to_end(data, args.backbone, device, precision, args.batch_size))
    alone, ours = float(np.median(alone_runs)), float(np.median(ours_runs))
    result = {
        "backbone": args.backbone, "images": len(paths), "device": device, "precision": precision,
        "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "batch_size": args.batch_size,
        "tutorial_fp32_images_per_s": round(tutorial, 1),
        "model_alone_images_per_s": round(alone, 1),
        "pipeline_images_per_s": round(ours, 1),
        "pipeline_vs_tutorial": round(ours / tutorial, 2),
        "pipeline_vs_model_alone": round(ours / alone, 2),
        "model_alone_runs": [round(v, 1) for v in alone_runs],
        "pipeline_runs": [round(v, 1) for v in ours_runs],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"medians of {args.repeats} alternating runs; model alone {result['model_alone_runs']}, "
          f"pipeline {result['pipeline_runs']}")
    print(f"{'tutorial loop (fp32, DataLoader)':<36}{tutorial:8.1f} images/s")
    print(f"{'model alone (' + precision + ', preloaded)':<36}{alone:8.1f} images/s")
    print(f"{'pipeline end-to-end (' + precision + ')':<36}{ours:8.1f} images/s")
    print(f"pipeline / tutorial = {result['pipeline_vs_tutorial']}x, "
          f"pipeline / model alone = {result['pipeline_vs_model_alone']}x  ({args.out})")


if __name__ == "__main__":
    main()
