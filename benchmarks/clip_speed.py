"""CPU cost of a zero_shot head's prompts: the curated CLIP text towers embedding 12 classes x CLIP's 7
default templates (84 prompts, each padded to 77 tokens), as `pipeline.heads.zero_shot.prior_for` does.

    nice -n 10 python benchmarks/clip_speed.py [--rounds 2] [--threads 1] [--json FILE]

Random weights (no download here: the speed does not depend on the weight values). Entries interleaved
within each round. Two figures per entry: seconds of wall time, which other jobs on the machine drag out,
and CPU-seconds of this process (`time.process_time`), which such a load hardly moves (with one thread,
the time on one idle core). The image towers' speed: `benchmarks/zoo_speed.py --names ...`.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from pipeline.heads.spec import DEFAULT_TEMPLATES
from pipeline.heads.zero_shot import prompts
from pipeline.models.openclip import CURATED
from pipeline.models.openclip_network import build_clip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    import open_clip

    torch.set_num_threads(args.threads)
    texts = [t for row in prompts([f"class {i}" for i in range(12)], list(DEFAULT_TEMPLATES), {}) for t in row]
    models = {}
    for name, entry in CURATED.items():
        config = entry.config()
        tokens = open_clip.SimpleTokenizer(context_length=config["text_cfg"]["context_length"])(texts)
        models[name] = (build_clip(config, entry.quick_gelu).eval(), tokens)
    runs: dict[str, dict[str, list[float]]] = {name: {"wall_s": [], "cpu_s": []} for name in models}
    for _ in range(args.rounds):
        for name, (model, tokens) in models.items():
            with torch.inference_mode():
                wall, cpu = time.perf_counter(), time.process_time()
                model.encode_text(tokens, normalize=True)
                runs[name]["wall_s"].append(round(time.perf_counter() - wall, 2))
                runs[name]["cpu_s"].append(round(time.process_time() - cpu, 2))
    for name, figures in runs.items():
        print(f"{name:24s} {len(texts)} prompts: wall s {figures['wall_s']}, CPU s {figures['cpu_s']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": platform.processor() or platform.machine(), "threads": args.threads,
                       "prompts": len(texts), "runs": runs}, fh, indent=1)


if __name__ == "__main__":
    main()
