"""OpenVINO extraction against the torch path and against OpenVINO's model alone, interleaved in one run.

    nice -n 10 python benchmarks/openvino_speed.py [--data ../shared/data/flowers12/train] [--rounds 5]

Per round, in this order (medians over rounds are reported):
(a) `extract` from JPEG files into a fresh cache with runtime torch (hashing, decoding, zarr writes included);
(b) the same with runtime openvino;
(c) OpenVINO's compiled network alone on the same images decoded into memory beforehand, run as `extract` runs
    it (`CompiledNetwork.map`: one batch per stream at a time, asynchronously);
(d) torch's network alone, likewise.
Both runtimes run at the precision `auto` chooses (bf16 on a CPU with AVX512-BF16 or AMX). The networks are
loaded and converted on one batch before the first round (in `extract`'s own per-process caches), so every
timed figure is steady-state. Then the share of the end-to-end time: hashing the files (as `extract` does, in
threads), decoding them (one thread), and the OpenVINO network, each alone, per image.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.features.device import resolve_precision
from pipeline.features.extract import extract, f32_modules, forward
from pipeline.features.openvino_runtime import NetworkId, compiled_network
from pipeline.images.data import hash_files, scan
from pipeline.images.decode import decode
from pipeline.models.registry import get_spec
from pipeline.models.taps import tapped
from pipeline.models.weights import file_sha256, load_backbone, resolve_weights

ROOT = Path(__file__).resolve().parents[1]


def end_to_end(data: Path, backbone: str, runtime: str, precision: str, batch_size: int,
               openvino_f32: bool = True) -> float:
    """Into a fresh cache, so every distinct image is computed."""
    with tempfile.TemporaryDirectory() as cache:
        report = extract(data, [backbone], cache_dir=cache, precision=precision, runtime=runtime,
                         batch_size=batch_size, progress=False, openvino_f32=openvino_f32)
    assert report.reused == 0 and not report.skipped, report.summary()
    return report.images_per_second


def warm_up(paths: list[Path], backbone: str, precision: str, batch_size: int) -> None:
    """Load and convert the networks `extract` keeps per process, on one batch of the images."""
    with tempfile.TemporaryDirectory() as folder:
        for i, path in enumerate(paths[:batch_size]):
            os.symlink(path.absolute(), Path(folder) / f"{i}{path.suffix}")
        for runtime in ("torch", "openvino"):
            end_to_end(Path(folder), backbone, runtime, precision, batch_size)


def batches_per_second(embed_batches, images: np.ndarray, batch_size: int) -> float:
    """`embed_batches` maps an iterable of batches to their features, as `extract` runs a runtime."""
    started = time.perf_counter()
    for _ in embed_batches(images[start:start + batch_size] for start in range(0, len(images), batch_size)):
        pass
    return len(images) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/flowers12/train"))
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "runs/bench/openvino_speed.json"))
    args = parser.parse_args()
    data, spec = Path(args.data), get_spec(args.backbone)
    precision = resolve_precision("auto", "cpu")
    paths = scan(data).paths
    pre = spec.preprocess
    images = np.stack([decode(p, pre) for p in paths])
    loaded = load_backbone(args.backbone)
    torch_net = tapped(loaded, [spec.default_layer])
    sha = file_sha256(resolve_weights(spec))
    ov_net = compiled_network(NetworkId(args.backbone, None, sha, (spec.default_layer,), precision,
                                        f32_modules(args.backbone, precision, "openvino")))
    variants = {
        "torch_end_to_end": lambda: end_to_end(data, args.backbone, "torch", precision, args.batch_size),
        "openvino_end_to_end": lambda: end_to_end(data, args.backbone, "openvino", precision, args.batch_size),
        "openvino_model_alone": lambda: batches_per_second(ov_net.map, images, args.batch_size),
        "torch_model_alone": lambda: batches_per_second(
            functools.partial(map, lambda batch: forward(torch_net, pre, batch, "cpu", precision)), images,
            args.batch_size),
    }
    warm_up(paths, args.backbone, precision, args.batch_size)
    load_before = os.getloadavg()[0]
    runs: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, run in variants.items():
            runs[name].append(run())
    load_after = os.getloadavg()[0]
    medians = {name: float(np.median(values)) for name, values in runs.items()}

    hash_times, decode_times, network_times = [], [], []
    for _ in range(3):
        started = time.perf_counter()
        hash_files(paths)
        hash_times.append((time.perf_counter() - started) / len(paths))
        started = time.perf_counter()
        for path in paths:
            decode(path, pre)
        decode_times.append((time.perf_counter() - started) / len(paths))
        network_times.append(1 / batches_per_second(ov_net.map, images, args.batch_size))
    per_image = {"hash": float(np.median(hash_times)), "decode_one_thread": float(np.median(decode_times)),
                 "openvino_network": float(np.median(network_times))}
    end_to_end_s = 1 / medians["openvino_end_to_end"]
    result = {
        "backbone": args.backbone, "images": len(paths), "precision": precision, "batch_size": args.batch_size,
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "rounds": args.rounds,
        "load_average_before_after": [round(load_before, 2), round(load_after, 2)],
        "images_per_s_median": {name: round(v, 1) for name, v in medians.items()},
        "images_per_s_runs": {name: [round(v, 1) for v in values] for name, values in runs.items()},
        "openvino_vs_torch_end_to_end": round(medians["openvino_end_to_end"] / medians["torch_end_to_end"], 2),
        "openvino_end_to_end_vs_model_alone": round(medians["openvino_end_to_end"]
                                                    / medians["openvino_model_alone"], 2),
        "openvino_end_to_end_vs_model_alone_per_round": [round(e / a, 2) for e, a in zip(
            runs["openvino_end_to_end"], runs["openvino_model_alone"], strict=True)],
        "ms_per_image_alone": {name: round(v * 1000, 3) for name, v in per_image.items()},
        "share_of_openvino_end_to_end": {name: round(v / end_to_end_s, 3) for name, v in per_image.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
