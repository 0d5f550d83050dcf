"""CPU cost of the curated CLIP backbones: the image tower's images/s, and the text tower's time to embed a
zero_shot head's prompts (12 classes x CLIP's 7 default templates).

    nice -n 10 python benchmarks/clip_speed.py [--rounds 3] [--batch 16] [--json FILE]

The networks have random weights (no download here): a network runs at the same speed whatever its
weights. Image towers on preloaded 224 px tensors, fp32 and bf16 autocast, batch `--batch`; entries and
precisions interleaved within each round; medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from pipeline.heads.spec import DEFAULT_TEMPLATES
from pipeline.heads.zero_shot import prompts
from pipeline.models.openclip import CURATED
from pipeline.models.openclip_network import ClipImageTower, build_clip


def _images_per_s(tower: torch.nn.Module, batch: torch.Tensor, bf16: bool) -> float:
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        tower(batch[:2])  # warm-up
        started = time.perf_counter()
        tower(batch)
    return len(batch) / (time.perf_counter() - started)


def _prompt_seconds(model: torch.nn.Module, texts: list[str], context_length: int) -> float:
    import open_clip

    tokenizer = open_clip.SimpleTokenizer(context_length=context_length)
    with torch.inference_mode():
        started = time.perf_counter()
        model.encode_text(tokenizer(texts), normalize=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    torch.manual_seed(0)
    classes = [f"class {i}" for i in range(12)]
    texts = [t for row in prompts(classes, list(DEFAULT_TEMPLATES), {}) for t in row]
    models = {}
    for name, entry in CURATED.items():
        config = entry.config()
        clip = build_clip(config, entry.quick_gelu).eval()
        models[name] = (ClipImageTower(config, entry.quick_gelu).eval(), clip, config["text_cfg"]["context_length"])
    batch = torch.randn(args.batch, 3, 224, 224)
    runs: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, (tower, clip, context) in models.items():
            for bf16 in (False, True):
                runs.setdefault(f"{name} image fp32" if not bf16 else f"{name} image bf16", []).append(
                    _images_per_s(tower, batch, bf16))
            runs.setdefault(f"{name} prompts s", []).append(_prompt_seconds(clip, texts, context))
    result = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "batch": args.batch, "prompts": len(texts),
              "median": {k: round(statistics.median(v), 2) for k, v in runs.items()},
              "runs": {k: [round(x, 2) for x in v] for k, v in runs.items()}}
    for key, value in result["median"].items():
        print(f"{key:40s} {value:8.2f}   runs: {result['runs'][key]}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
