"""CPU images/s of the curated zoo beside the bundled EfficientNet-Lite0, interleaved in one run.

    nice -n 10 python benchmarks/zoo_speed.py [--rounds 3] [--batch 8] [--precision auto]

Each network is built by its registry entry with random weights (no download here: a network's speed
does not depend on its weight values), tapped at its default layer, and fed a uint8 batch at its own
input size through the pipeline's `forward` (normalisation, channels-last, the chosen precision). The
rounds interleave the networks, so a load from other jobs falls on all of them alike; the figure is
images over the summed forward time of every round (after one warm-up batch each).
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
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--names", nargs="*", default=NAMES)
    args = parser.parse_args()
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
    seconds = dict.fromkeys(runs, 0.0)
    for _round in range(args.rounds):
        for name, (network, spec, images) in runs.items():
            started = time.perf_counter()
            forward(network, spec.preprocess, images, "cpu", precision)
            seconds[name] += time.perf_counter() - started
    print(json.dumps({"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                      "precision": precision, "batch": args.batch, "rounds": args.rounds}))
    print("| backbone | input | images/s |\n|---|---|---|")
    for name, (_network, spec, _images) in runs.items():
        rate = args.rounds * args.batch / seconds[name]
        print(f"| {name} | {spec.preprocess.crop} px | {rate:.1f} |")


if __name__ == "__main__":
    main()
