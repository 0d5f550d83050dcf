"""Where OpenVINO's bf16 error comes from: EfficientNet-Lite with some of its layers kept in f32.

    nice -n 10 python benchmarks/openvino_bf16_layers.py [--data ../shared/data/flowers12/test] [--rounds 3]
        [--backbone efficientnet_lite0|efficientnet_lite1|efficientnet_lite2]

The reference is torch fp32 (`extract.forward`) on the decoded photos. Each variant is the network
`extract` compiles (`openvino_runtime.FromUint8`, bf16 hint, one stream per core) with a set of nodes
kept in f32: OpenVINO's CPU plugin runs a node in its original precision when the node carries the
`precise` runtime attribute, which only the IR reader makes, so the model is saved as IR, the attribute
is written into the chosen layers' XML and the model is read back. Reported per variant: how many
convolutions run in f32 (the compiled model's own account), the cosine similarity of each photo's
features to the reference (min, mean, the five lowest) and the network's speed on preloaded batches
(images/s and CPU ms per image, medians of `--rounds` rounds, variants interleaved). The variants name
the Lite networks' blocks (`_blocks.N` in the converted node names; Lite0 has 16, Lite1 and Lite2 more).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import openvino as ov
import torch

from pipeline.features.extract import forward
from pipeline.features.openvino_precise import kept_in_f32, module_paths
from pipeline.features.openvino_runtime import FromUint8
from pipeline.images.data import scan
from pipeline.images.decode import decode
from pipeline.models.registry import get_spec
from pipeline.models.taps import tapped
from pipeline.models.weights import load_backbone

ROOT = Path(__file__).resolve().parents[1]
HEAD = 1000  # the block number `blocks` gives the head convolution and the pooling
Keep = Callable[[ov.Node, int], bool]  # (node, block: -1 stem, 0.. blocks, HEAD) -> keep in f32
VARIANTS: dict[str, Keep | None] = {
    "bf16": lambda node, block: False,
    "bf16, block 0's depthwise conv in f32": lambda node, block: block == 0
    and node.get_type_name() == "GroupConvolution",
    "bf16, block 0 in f32": lambda node, block: block == 0,
    "bf16, stem and blocks 0-3 in f32": lambda node, block: block < 4,
    "bf16, every depthwise conv in f32": lambda node, block: node.get_type_name() == "GroupConvolution",
    "bf16, head conv and pooling in f32": lambda node, block: block == HEAD,
    "f32": None,
}


def blocks(model: ov.Model) -> list[tuple[ov.Node, int]]:
    """Each node with its block (`openvino_precise.module_paths`: the module of the nearest named node at
    or after it)."""
    found = []
    for node, path in module_paths(model, FromUint8.ROOT):
        if match := re.match(r"_blocks\.(\d+)", path):
            found.append((node, int(match.group(1))))
        else:
            found.append((node, -1 if path.startswith(("_conv_stem", "_bn0")) else HEAD))
    return found


def with_f32_nodes(model: ov.Model, keep: Keep) -> set[str]:
    """The names of the operations `keep` keeps in f32."""
    return {node.get_friendly_name() for node, block in blocks(model)
            if node.get_type_name() not in ("Parameter", "Constant", "Result") and keep(node, block)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/flowers12/test"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backbone", default="efficientnet_lite0", choices=[f"efficientnet_lite{i}" for i in range(3)])
    parser.add_argument("--out", default=str(ROOT / "runs/bench/openvino_bf16_layers.json"))
    args = parser.parse_args()
    spec = get_spec(args.backbone)
    pre, layer = spec.preprocess, spec.default_layer
    images = np.stack([decode(path, pre) for path in scan(args.data).paths])
    batches = [images[start:start + 32] for start in range(0, len(images), 32)]
    network = tapped(load_backbone(args.backbone), [layer]).eval()
    reference = np.concatenate([forward(network, pre, batch, "cpu", "fp32")[layer] for batch in batches])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings
        model = ov.convert_model(FromUint8(network, pre, (layer,)).eval(), input=[([-1, pre.crop, pre.crop, 3],
                                 ov.Type.u8)], example_input=torch.zeros(1, pre.crop, pre.crop, 3, dtype=torch.uint8))
    threads = torch.get_num_threads()
    queues, result = {}, {"backbone": args.backbone, "data": args.data, "images": len(images), "variants": {}}
    for name, keep in VARIANTS.items():
        config = {"INFERENCE_PRECISION_HINT": "f32" if keep is None else "bf16", "PERFORMANCE_HINT": "THROUGHPUT",
                  "NUM_STREAMS": threads, "INFERENCE_NUM_THREADS": threads}
        names = set() if keep is None else with_f32_nodes(model, keep)
        if names:
            with kept_in_f32(model, names) as marked:
                compiled = ov.Core().compile_model(marked, "CPU", config)
        else:
            compiled = ov.Core().compile_model(model, "CPU", config)
        convolutions = [node.get_rt_info()["runtimePrecision"].astype(str)
                        for node in compiled.get_runtime_model().get_ordered_ops()
                        if node.get_rt_info()["layerType"].astype(str) == "Convolution"]
        queues[name] = queue = ov.AsyncInferQueue(compiled, threads)
        outputs: dict[int, np.ndarray] = {}
        queue.set_callback(lambda request, i, out=outputs: out.__setitem__(
            i, request.get_output_tensor(0).data.copy()))
        for i, batch in enumerate(batches):
            queue.start_async({0: batch}, i)
        queue.wait_all()
        features = np.concatenate([outputs[i] for i in range(len(batches))])
        norms = np.linalg.norm(features, axis=1) * np.linalg.norm(reference, axis=1)
        cosine = (features * reference).sum(1) / norms
        result["variants"][name] = {
            "f32_convolutions": convolutions.count("f32"), "convolutions": len(convolutions),
            "cosine_min": round(float(cosine.min()), 5), "cosine_mean": round(float(cosine.mean()), 5),
            "cosine_lowest_five": [round(float(c), 5) for c in np.sort(cosine)[:5]],
            "images_per_s": [], "cpu_ms_per_image": []}
    load_before = os.getloadavg()[0]
    for _ in range(args.rounds):
        for name, queue in queues.items():
            started, cpu = time.perf_counter(), time.process_time()
            for i, batch in enumerate(batches):
                queue.start_async({0: batch}, i)
            queue.wait_all()
            figures = result["variants"][name]
            figures["images_per_s"].append(round(len(images) / (time.perf_counter() - started), 1))
            figures["cpu_ms_per_image"].append(round((time.process_time() - cpu) / len(images) * 1000, 2))
    result["load_average_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    for figures in result["variants"].values():
        figures["images_per_s_median"] = float(np.median(figures["images_per_s"]))
        figures["cpu_ms_per_image_median"] = float(np.median(figures["cpu_ms_per_image"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
