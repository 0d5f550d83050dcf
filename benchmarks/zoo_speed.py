"""CPU speed of the curated zoo beside the bundled EfficientNet-Lite0, interleaved in one run.

    nice -n 10 python benchmarks/zoo_speed.py [--rounds 2] [--batch 4] [--threads 1] [--precision auto]

Each network is built by its registry entry with random weights (no download here: a network's speed
does not depend on its weight values), tapped at its default layer, and fed a uint8 batch at its own
input size through the pipeline's `forward` (normalisation, channels-last, the chosen precision). The
rounds interleave the networks. Two figures per network, after one warm-up batch: images per second of
wall time, which a machine shared with other jobs drags down, and images per CPU-second of this process
(`time.process_time`), which such a load hardly moves: with one thread, that is the speed of one idle
core.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from pipeline.features.extract import forward, resolve_precision
from pipeline.models.registry import get_spec
from pipeline.models.taps import TappedNetwork
from pipeline.models.timm_zoo import CURATED

NAMES = ["efficientnet_lite0", *CURATED]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--names", nargs="*", default=NAMES)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    precision = resolve_precision(args.precision, "cpu")
    rng = np.random.default_rng(0)
    runs = {}
    for name in args.names:
        spec = get_spec(name)
        layer = spec.layers[spec.default_layer]
        network = TappedNetwork(spec.build().eval().requires_grad_(False), {spec.default_layer: layer})
        network.to(memory_format=torch.channels_last)
        crop = spec.preprocess.crop
        images = rng.integers(0, 256, (args.batch, crop, crop, 3), dtype=np.uint8)
        forward(network, spec.preprocess, images, "cpu", precision)  # warm-up
        runs[name] = (network, spec, images)
    wall, cpu = dict.fromkeys(runs, 0.0), dict.fromkeys(runs, 0.0)
    for _round in range(args.rounds):
        for name, (network, spec, images) in runs.items():
            started, started_cpu = time.perf_counter(), time.process_time()
            forward(network, spec.preprocess, images, "cpu", precision)
            wall[name] += time.perf_counter() - started
            cpu[name] += time.process_time() - started_cpu
    print(json.dumps({"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                      "precision": precision, "batch": args.batch, "rounds": args.rounds}))
    print("| backbone | input | images/s (wall) | images per CPU-second |\n|---|---|---|---|")
    images = args.rounds * args.batch
    for name, (_network, spec, _images) in runs.items():
        print(f"| {name} | {spec.preprocess.crop} px | {images / wall[name]:.1f} | {images / cpu[name]:.1f} |")


if __name__ == "__main__":
    main()
