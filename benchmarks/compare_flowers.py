"""Transfer vs. scratch on flowers12: linear probe, LP-FT fine-tuning and a small CNN from scratch at
1, 5, 10 and all labelled images per class (the same draws for each), bundled EfficientNet-Lite0.

    flock /tmp/bench.lock python benchmarks/compare_flowers.py [--seeds 0,1]

Writes runs/bench/compare/compare.{json,png,html}. Target (issue 4): transfer well ahead of scratch
at 5 labels per class. Schedules are short on purpose (40 fine-tuning steps, 150 scratch steps) so the
whole comparison runs in about 20 minutes on 2 shared CPU cores.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.app.stage3 import run_compare
from pipeline.tuning.compare import CompareOptions, compare_summary, parse_shots

ROOT = Path(__file__).resolve().parents[1]
FLOWERS = ROOT.parent / "shared" / "data" / "flowers12"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", default="1,5,10,all")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--finetune-steps", type=int, default=40)
    parser.add_argument("--scratch-steps", type=int, default=150)
    parser.add_argument("--cache", default=str(ROOT / "cache"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench" / "compare"))
    args = parser.parse_args()
    result = run_compare(CompareOptions(FLOWERS / "train", FLOWERS / "test", parse_shots(args.shots),
                                    [int(s) for s in args.seeds.split(",")], finetune_steps=args.finetune_steps,
                                    scratch_steps=args.scratch_steps, cache_dir=args.cache, out=args.out))
    for (method, shots), s in compare_summary(result["runs"]).items():
        print(f"{method:>13} k={shots:>3}: {s['accuracy']:.1%} ± {s['std']:.1%}, {s['seconds']:.1f} s")


if __name__ == "__main__":
    main()
