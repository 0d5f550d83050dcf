"""What a twin backbone (`finetune --ensemble`) costs against one network, on both CPU runtimes.

    nice -n 10 python benchmarks/twin_cost.py [--backbone efficientnet_lite0] [--unfreeze 6] [--rounds 5]

A twin of the backbone with its last `--unfreeze` blocks doubled (the default recipe's last:6) is saved
as a backbone in a temporary folder, as `finetune --ensemble` saves one (its fine-tuned half is a copy
of the parent here: weights do not change the speed). Then, per round, in this order: torch's network
alone on preloaded images (batch 32, the precision `auto` chooses), the twin the same way, OpenVINO's
compiled network alone, OpenVINO's twin. Medians over the rounds, and the twin's share of the time.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from openvino_speed import batches_per_second

from pipeline.features.device import resolve_precision
from pipeline.features.extract import f32_modules, forward
from pipeline.features.openvino_runtime import NetworkId, compiled_network
from pipeline.images.data import scan
from pipeline.images.decode import decode
from pipeline.models.registry import BACKBONES_ENV, get_spec
from pipeline.models.taps import tapped
from pipeline.models.weights import file_sha256, load_backbone, resolve_weights, save_backbone
from pipeline.tuning.ensemble import twin_state
from pipeline.tuning.network import blocks

ROOT = Path(__file__).resolve().parents[1]


def save_twin(backbone: str, unfreeze: int, folder: Path) -> str:
    """A twin of `backbone` with its last `unfreeze` blocks doubled, saved in `folder`; returns its name."""
    spec = get_spec(backbone)
    tuned = copy.deepcopy(load_backbone(backbone).network)
    trained = blocks(tuned, spec.layers[spec.default_layer].module)[-unfreeze:]
    dim, classes = spec.layers[spec.default_layer].dim, 2
    twin = twin_state(spec, tuned, trained, torch.zeros(classes, dim), torch.zeros(classes),
                      torch.nn.Linear(dim, classes))
    name = f"{backbone}_twin"
    save_backbone(folder, name, spec, twin.state, {}, twin.layers, twin.paths)
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/flowers12/train"))
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--unfreeze", type=int, default=6)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "runs/bench/twin_cost.json"))
    args = parser.parse_args()
    precision = resolve_precision("auto", "cpu")
    with tempfile.TemporaryDirectory() as folder:
        os.environ[BACKBONES_ENV] = folder
        twin = save_twin(args.backbone, args.unfreeze, Path(folder))
        pre = get_spec(args.backbone).preprocess
        images = np.stack([decode(p, pre) for p in scan(Path(args.data)).paths[:args.images]])
        variants = {}
        for label, name in (("one network", args.backbone), ("twin", twin)):
            spec = get_spec(name)
            network = tapped(load_backbone(name), [spec.default_layer]).to(memory_format=torch.channels_last).eval()
            variants[f"torch, {label}"] = functools.partial(
                batches_per_second, functools.partial(map, functools.partial(
                    forward, network, pre, device="cpu", precision=precision)), images, 32)
        for label, name in (("one network", args.backbone), ("twin", twin)):
            spec = get_spec(name)
            ov = compiled_network(NetworkId(name, None, file_sha256(resolve_weights(spec)), (spec.default_layer,),
                                            precision, f32_modules(name, precision, "openvino")))
            variants[f"openvino, {label}"] = functools.partial(batches_per_second, ov.map, images, 32)
        for run in variants.values():  # warm-up
            run()
        runs: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, run in variants.items():
                runs[name].append(run())
    medians = {name: float(np.median(v)) for name, v in runs.items()}
    result = {"backbone": args.backbone, "unfreeze": args.unfreeze, "images": len(images), "precision": precision,
              "cores": os.cpu_count(), "rounds": args.rounds,
              "images_per_s_median": {k: round(v, 1) for k, v in medians.items()},
              "images_per_s_runs": {k: [round(x, 1) for x in v] for k, v in runs.items()},
              "twin_time_vs_one_network": {runtime: round(medians[f"{runtime}, one network"]
                                                          / medians[f"{runtime}, twin"], 3)
                                           for runtime in ("torch", "openvino")}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
