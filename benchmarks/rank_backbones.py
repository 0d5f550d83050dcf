"""Issue 6 benchmark: does LogME rank candidates like a linear probe does, and how much cheaper is it?

    python benchmarks/rank_backbones.py [--data ../shared/data/flowers12] [--cache cache]

Candidates: EfficientNet-Lite0/1/2 (the backbones available offline) at every layer (stage1 ... stage7,
head), plus the fusion of the three heads. On flowers12's training split (720 images):
1. features are extracted into a fresh cache (each shard records its cost: the img/s column);
2. `rank` with probes: LogME, H-score and the 5-fold CV linear probe of every candidate;
3. `rank --no-probe` again from the warm cache: the wall time a user waits for the training-free answer.
Reports the Spearman correlation of each score with the probe accuracy across candidates and the
time of the scores against the time of the probes. Writes runs/bench/rank.json and the rank report.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from pipeline.heads.rank import as_json, rank, spearman, table
from pipeline.models.registry import get_spec
from pipeline.reporting.pages import write_rank_report

ROOT = Path(__file__).resolve().parents[1]
BACKBONES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "flowers12")
    parser.add_argument("--cache", help="feature cache (default: a fresh temporary one, so that every candidate's "
                                        "extraction speed is measured in this run)")
    args = parser.parse_args()
    train = args.data / "train"
    layers = list(get_spec(BACKBONES[0]).layers)  # the Lite family shares its layer names
    fusion = ["+".join(BACKBONES)]
    with tempfile.TemporaryDirectory() as fresh:
        measure(train, layers, fusion, args.cache or fresh)


def measure(train: Path, layers: list[str], fusion: list[str], cache: str) -> None:

    rows = rank(train, BACKBONES, layers, fusion, cache_dir=cache, progress=True).rows
    print(table(rows))
    started = time.perf_counter()
    fast = rank(train, BACKBONES, layers, fusion, cache_dir=cache, probe=False, progress=False).rows
    no_probe_wall = time.perf_counter() - started

    score_s = sum(r.score_seconds for r in rows)
    probe_s = sum(r.probe_seconds for r in rows)
    result = {
        "candidates": len(rows),
        "spearman_logme_probe": spearman(rows, "logme"),
        "spearman_hscore_probe": spearman(rows, "hscore"),
        "scores_seconds": round(score_s, 2), "probes_seconds": round(probe_s, 2),
        "probe_over_scores": round(probe_s / score_s, 1),
        "rank_no_probe_wall_seconds": round(no_probe_wall, 2),
        "best_by_logme": rows[0].candidate, "best_by_probe": max(rows, key=lambda r: r.probe_accuracy).candidate,
        "same_order_without_probes": [r.candidate for r in fast] == [r.candidate for r in rows],
        "rows": as_json(rows),
    }
    out = ROOT / "runs" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "rank.json").write_text(json.dumps(result, indent=1))
    report = write_rank_report(out / "rank", rows)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
    print(f"report: {report}")


if __name__ == "__main__":
    main()
