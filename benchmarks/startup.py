"""Start-up cost of the `pipeline` command: whole-process wall time, median of N runs, variants interleaved.

    python benchmarks/startup.py [--data ../shared/data/flowers12/train] [--runs 5] [--json FILE]

(a) `pipeline --help`; (b) `pipeline cache ls` over a cache holding the folder's features;
(c) `pipeline extract` over that folder when every row is already cached (zero forward passes);
(d) `pipeline backbones`, the whole registry listing. The cache is filled once first (not timed).
Without the shared photos, 720 generated JPEGs stand in. Targets on 2 cores (issue 14): --help < 1 s,
cache ls < 1.5 s, cached extract < 3 s; `backbones` about 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOWERS = ROOT.parent / "shared" / "data" / "flowers12" / "train"
TARGETS = {"help": 1.0, "cache ls": 1.5, "cached extract": 3.0, "backbones": 1.0}


def _generated(folder: Path, count: int = 720) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        (folder / f"class{i % 12}").mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"class{i % 12}" / f"{i}.jpg")
    return folder


def _wall(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=FLOWERS if FLOWERS.is_dir() else None)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    cli = [sys.executable, "-m", "pipeline.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or _generated(Path(tmp) / "images")
        cache = str(Path(tmp) / "cache")
        extract = [*cli, "extract", "--data", str(data), "--cache", cache, "--quiet"]
        subprocess.run(extract, check=True, stdout=subprocess.DEVNULL)  # fill the cache (not timed)
        variants = {"help": [*cli, "--help"], "cache ls": [*cli, "cache", "ls", "--cache", cache],
                    "cached extract": extract, "backbones": [*cli, "backbones"]}
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.runs):  # interleaved, so a busy moment hits every variant alike
            for name, argv in variants.items():
                times[name].append(_wall(argv))
    result = {"machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores", "runs": args.runs,
              "data": str(data) if args.data else "720 generated JPEGs",
              "median_seconds": {k: round(statistics.median(v), 3) for k, v in times.items()},
              "all_seconds": {k: [round(x, 3) for x in v] for k, v in times.items()}}
    for name, seconds in result["median_seconds"].items():
        print(f"{name:>15}: {seconds:.2f} s median of {args.runs} (target < {TARGETS[name]} s)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
