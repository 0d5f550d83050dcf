"""LP-FT fine-tuning of the bundled EfficientNet-Lite0 on flowers12, against the linear probe alone.

    flock /tmp/bench.lock python benchmarks/finetune_flowers.py [--unfreeze last:6] [--epochs 6] [--val-fraction 0]

Writes runs/bench/finetune_flowers.json. Targets (issue 4): test accuracy >= 98% and above the
linear probe's; wall time (decoding, probe, training, test) under 15 minutes on 2 CPU cores. The
probe is fitted on the same training images (the validation split held out) from the feature cache.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from pipeline.finetune import FinetuneOptions, finetune
from pipeline.training import TrainSettings

ROOT = Path(__file__).resolve().parents[1]
FLOWERS = ROOT.parent / "shared" / "data" / "flowers12"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unfreeze", default="last:6")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--lr-decay", type=float, default=0.8)
    parser.add_argument("--val-fraction", type=float, default=0.0)
    parser.add_argument("--init", default="probe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=str(ROOT / "cache"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench" / "finetune_flowers.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="finetune-bench-"))
    try:
        result = finetune(FinetuneOptions(
            FLOWERS / "train", FLOWERS / "test", unfreeze=args.unfreeze, lr_decay=args.lr_decay, init=args.init,
            val_fraction=args.val_fraction, out=work / "run", name="flowers_bench", backbones_dir=work / "backbones",
            cache_dir=args.cache, train=TrainSettings(epochs=args.epochs, lr=args.lr, seed=args.seed)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    m = result.metrics
    summary = {k: m[k] for k in ("accuracy", "macro_f1", "probe_accuracy", "seconds", "train_seconds", "best_epoch",
                                 "start_val_accuracy",
                                 "stopped_early", "trainable_parameters", "images")}
    summary["settings"] = vars(args)
    summary["history"] = m["history"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=1))


if __name__ == "__main__":
    main()
