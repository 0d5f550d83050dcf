"""Where OpenVINO extraction's time goes on a CPU: end to end against the network alone, with the parts
taken out one at a time, and two levers tried (issue 18's target: end to end >= 0.85x the model alone).

    nice -n 10 python benchmarks/openvino_budget.py [--data ../shared/data/flowers12/train] [--rounds 5]

Variants, interleaved in one process, each round in this order (medians over rounds; images/s and the
process's CPU milliseconds per image, which the cores' sharing does not blur):
- `end_to_end`: `extract` from JPEG files into a fresh cache (runtime openvino), as openvino_speed.py;
- `end_to_end_predecoded`: the same, with `decode` answered from the images decoded beforehand: hashing,
  planning, Dask, batching, the asynchronous requests and the cache writes, without decoding;
- `model_alone`: the compiled network on the preloaded images, as `extract` runs it (`CompiledNetwork.map`);
- `model_beside_decoding`: the same while one more thread decodes the photos over and over (what a
  decoding thread takes from the network's two streams when both want every core);
- `end_to_end_unpinned`: `end_to_end` with the network compiled with ENABLE_CPU_PINNING off (the streams'
  threads free to move between cores when a decoding thread takes one);
- `end_to_end_switch_0.5ms`: `end_to_end` with Python's GIL switch interval at 0.5 ms instead of 5 (the
  requests' callbacks wait less for a decoding thread that holds the GIL);
- `end_to_end_plain_bf16`, `model_alone_plain_bf16`: end to end and the network alone with every layer
  in bf16, as before 2026-11-29 (`extract(openvino_f32=False)`): what keeping the backbone's
  `openvino_f32` modules in f32 costs.
The decoding alone (one thread, per image) is measured once at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

import pipeline.features.extract as extract_module
import pipeline.features.openvino_runtime as openvino_runtime
from pipeline.features.device import resolve_precision
from pipeline.features.extract import f32_modules
from pipeline.images.data import scan
from pipeline.images.decode import decode
from pipeline.models.registry import get_spec
from pipeline.models.weights import file_sha256, resolve_weights

sys.path.insert(0, str(Path(__file__).resolve().parent))
from openvino_speed import batches_per_second, end_to_end, warm_up  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def unpinned(key: openvino_runtime.NetworkId) -> openvino_runtime.CompiledNetwork:
    """`key`'s network converted and compiled as `extract` does it, with CPU pinning off."""
    import openvino as ov

    compile_model = ov.Core.compile_model

    def without_pinning(core, model, device, config):
        return compile_model(core, model, device, {**config, "ENABLE_CPU_PINNING": False})

    ov.Core.compile_model = without_pinning
    try:
        return openvino_runtime._convert(key)
    finally:
        ov.Core.compile_model = compile_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/flowers12/train"))
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "runs/bench/openvino_budget.json"))
    args = parser.parse_args()
    data, spec = Path(args.data), get_spec(args.backbone)
    precision, batch = resolve_precision("auto", "cpu"), 32
    paths = scan(data).paths
    images = np.stack([decode(path, spec.preprocess) for path in paths])
    predecoded = {str(path.absolute()): image for path, image in zip(paths, images, strict=True)}
    key = openvino_runtime.NetworkId(args.backbone, None, file_sha256(resolve_weights(spec)), (spec.default_layer,),
                                     precision, f32_modules(args.backbone, precision, "openvino"))
    pinned = openvino_runtime.compiled_network(key)
    plain = openvino_runtime.compiled_network(replace(key, f32=()))
    free = unpinned(key)
    warm_up(paths, args.backbone, precision, batch)

    def run_end_to_end(network=pinned, decoder=decode, interval: float | None = None) -> float:
        openvino_runtime._COMPILED[key], extract_module.decode = network, decoder
        before = sys.getswitchinterval()
        if interval is not None:
            sys.setswitchinterval(interval)
        try:
            return end_to_end(data, args.backbone, "openvino", precision, batch)
        finally:
            openvino_runtime._COMPILED[key], extract_module.decode = pinned, decode
            sys.setswitchinterval(before)

    def beside_decoding() -> float:
        stop = threading.Event()

        def decode_again() -> None:
            while not stop.is_set():
                for path in paths[:50]:
                    decode(path, spec.preprocess)

        thread = threading.Thread(target=decode_again)
        thread.start()
        try:
            return batches_per_second(pinned.map, images, batch)
        finally:
            stop.set()
            thread.join()

    variants: dict[str, Callable[[], float]] = {
        "end_to_end": run_end_to_end,
        "end_to_end_predecoded": lambda: run_end_to_end(decoder=lambda path, pre, image_id=None:
                                                        predecoded[str(path)]),
        "model_alone": lambda: batches_per_second(pinned.map, images, batch),
        "model_beside_decoding": beside_decoding,
        "end_to_end_unpinned": lambda: run_end_to_end(network=free),
        "end_to_end_switch_0.5ms": lambda: run_end_to_end(interval=0.0005),
        "end_to_end_plain_bf16": lambda: end_to_end(data, args.backbone, "openvino", precision, batch,
                                                    openvino_f32=False),
        "model_alone_plain_bf16": lambda: batches_per_second(plain.map, images, batch),
    }
    rates: dict[str, list[float]] = {name: [] for name in variants}
    cpu_ms: dict[str, list[float]] = {name: [] for name in variants}
    load_before = os.getloadavg()[0]
    for _ in range(args.rounds):
        for name, variant in variants.items():
            started = cpu_seconds()
            rates[name].append(variant())
            cpu_ms[name].append((cpu_seconds() - started) / len(paths) * 1000)
    started = time.perf_counter()
    for path in paths:
        decode(path, spec.preprocess)
    decode_ms = (time.perf_counter() - started) / len(paths) * 1000
    alone = float(np.median(rates["model_alone"]))
    result = {
        "data": str(data), "images": len(paths), "backbone": args.backbone, "precision": precision,
        "cores": os.cpu_count(), "rounds": args.rounds,
        "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "variants": {name: {"images_per_s_median": round(float(np.median(rates[name])), 1),
                            "vs_model_alone": round(float(np.median(rates[name])) / alone, 3),
                            "cpu_ms_per_image_median": round(float(np.median(cpu_ms[name])), 2),
                            "images_per_s_runs": [round(r, 1) for r in rates[name]]}
                     for name in variants},
        "decode_ms_per_image_one_thread": round(decode_ms, 3),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
