"""Heads and LP-FT with the default settings on flowers12, dtd10 and intel6, over re-drawn splits.

    nice -n 10 python benchmarks/three_sets.py [--resamples 3] [--finetune-resamples 1] [--cache /work/shared-cache]

Each set's train and test folders are pooled and re-drawn into stratified splits with the test
folder's size (resplit.py, seed 1: split i is the same for every method). On every split:
logistic regression on Lite0 (C by CV) and PCA fusion of Lite0+1+2 (the head's defaults), from the
feature cache; on the first `--finetune-resamples` splits also `finetune` with every default (LP-FT,
the ensemble with the probe, guarded by the held-out part), with beside it the probe on every training
image (`probe_accuracy`) and the probe it started from (`start_probe_accuracy`, fitted on the 80% it
trains on).
Prints mean, sd and the number of splits per method; writes runs/bench/three_sets.json after every run.

    python benchmarks/three_sets.py --summary runs/bench/three_sets_*.json

pools the LP-FT runs of several outputs (a split run twice counts once: the last file named wins) and
prints per set LP-FT and the probe on every training image over the same splits, and their paired
difference with its standard error.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from heads_accuracy import features
from resplit import pooled, resampled_indices, write_split
from sklearn.metrics import accuracy_score

from pipeline.heads.fit import fit_head
from pipeline.heads.spec import HEAD_OPTIONS, HeadSpec
from pipeline.tuning.finetune import finetune
from pipeline.tuning.options import FinetuneOptions

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
LITES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]


def _stats(scores: list[float]) -> dict:
    return {"splits": len(scores), "mean": round(float(np.mean(scores)), 4), "std": round(float(np.std(scores)), 4),
            "min": round(min(scores), 4), "max": round(max(scores), 4)}


HEADS = [("logreg lite0", "logistic_regression", LITES[:1]), ("fusion lite0+1+2", "pca_fusion", LITES)]


def heads(sets: dict, count: int) -> dict[str, list[float]]:
    """Each head's test accuracy on every re-drawn split (settings by CV on its training part)."""
    y = np.concatenate([sets[split][LITES[0]].labels for split in ("train", "test")])
    X = {b: np.vstack([sets[split][b].features.compute() for split in ("train", "test")]) for b in LITES}
    scores: dict[str, list[float]] = {label: [] for label, _, _ in HEADS}
    for train, test in resampled_indices(y, test_size=len(sets["test"][LITES[0]].labels), count=count):
        for label, head_type, sources in HEADS:
            features_ = np.hstack([X[s] for s in sources])
            fitted = fit_head(HeadSpec(label, head_type, sources, dict(HEAD_OPTIONS[head_type])), features_[train],
                              y[train], [X[s].shape[1] for s in sources])
            scores[label].append(float(accuracy_score(y[test], fitted.pipeline.predict(features_[test]))))
    return scores


def lpft(name: str, split_count: int, runs: int, cache: str, first: int = 0) -> list[dict]:
    paths, labels, classes = pooled(DATA / name)
    test_size = len(pooled(DATA / name, parts=("test",))[1])
    rows = []
    for i, split in list(enumerate(resampled_indices(labels, test_size=test_size, count=split_count)))[first:runs]:
        work = Path(tempfile.mkdtemp(prefix="three-sets-"))
        try:
            data = write_split(paths, labels, classes, split, work / "data")
            m = finetune(FinetuneOptions(data / "train", data / "test", out=work / "run", name="bench",
                                         backbones_dir=work / "backbones", cache_dir=cache), progress=False).metrics
        finally:
            shutil.rmtree(work, ignore_errors=True)
        rows.append({"split": i, **{k: m[k] for k in ("accuracy", "probe_accuracy", "kept", "best_epoch",
                                                      "start_val_accuracy", "best_val_accuracy", "best_trained_epoch",
                                                      "guard_p", "guard", "seconds")},
                     "start_probe_accuracy": m.get("start_probe_accuracy"),
                     "val": [h["val_accuracy"] for h in m["history"]]})
        print(f"{name:<10} split {i}: LP-FT {m['accuracy']:.2%} (kept {m['kept']}, epoch {m['best_epoch']}), "
              f"the probe on every training image {m['probe_accuracy']:.2%} ({m['seconds']:.0f} s); {m['guard']}",
              flush=True)
    return rows


def summary(files: list[str]) -> None:
    """LP-FT against the probe on every training image, per set, over every split the files hold."""
    runs: dict[str, dict[int, dict]] = {}
    for file in files:
        for name, result in json.loads(Path(file).read_text())["sets"].items():
            runs.setdefault(name, {}).update({r["split"]: r for r in result.get("lpft", {}).get("runs", [])})
    print(f"{'set':<10}{'splits':>7}{'LP-FT':>9}{'probe':>9}{'LP-FT - probe':>15}{'se':>7}  kept the probe")
    for name, by_split in runs.items():
        rows = [by_split[i] for i in sorted(by_split)]
        lpft, probe = (np.array([r[key] for r in rows]) * 100 for key in ("accuracy", "probe_accuracy"))
        gap = lpft - probe
        se = gap.std(ddof=1) / np.sqrt(len(gap)) if len(gap) > 1 else float("nan")
        print(f"{name:<10}{len(rows):>7}{lpft.mean():>8.2f}%{probe.mean():>8.2f}%{gap.mean():>+14.2f} {se:>7.2f}  "
              f"{sum(r['kept'] == 'probe' for r in rows)} of {len(rows)}; splits {sorted(by_split)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=["flowers12", "dtd10", "intel6"])
    parser.add_argument("--resamples", type=int, default=3, help="re-drawn splits for the heads")
    parser.add_argument("--finetune-resamples", type=int, default=1, help="of those, how many also fine-tune")
    parser.add_argument("--from-split", type=int, default=0,
                        help="LP-FT: start at this split (splits are the same in every run: resume a series)")
    parser.add_argument("--part", choices=("heads", "lpft", "both"), default="both",
                        help="heads only, LP-FT only (separate processes can run the sets side by side), or both")
    parser.add_argument("--cache", default="/work/shared-cache")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench" / "three_sets.json"))
    parser.add_argument("--summary", nargs="+", metavar="JSON", help="pool the LP-FT runs of these outputs (no runs)")
    args = parser.parse_args()
    if args.summary:
        return summary(args.summary)
    result: dict = {"settings": vars(args), "sets": {}}
    for name in args.sets if args.part != "lpft" else []:
        sets = features(DATA / name, LITES, args.cache)
        assert sets["train_report"].computed + sets["test_report"].computed == 0, f"{name}: not all cached"
        assert np.array_equal(np.concatenate([sets[s][LITES[0]].labels for s in ("train", "test")]),
                              pooled(DATA / name)[1]), "feature rows and pooled images differ in order"
        scores = heads(sets, args.resamples)
        result["sets"][name] = {"heads": {label: {"scores": v, **_stats(v)} for label, v in scores.items()}}
        for label, v in scores.items():
            print(f"{name:<10} {label:<18} mean {np.mean(v):.2%} (sd {np.std(v):.2%}, {len(v)} splits)", flush=True)
    for name in args.sets if args.part != "heads" else []:
        runs = lpft(name, args.resamples, args.finetune_resamples, args.cache, args.from_split)
        result["sets"].setdefault(name, {})["lpft"] = {"runs": runs, "accuracy": _stats([r["accuracy"] for r in runs]),
                                        "own_probe": _stats([r["probe_accuracy"] for r in runs])}
        if runs:
            print(f"{name:<10} LP-FT mean {np.mean([r['accuracy'] for r in runs]):.2%} over {len(runs)} splits; the "
                  f"probe on every training image {np.mean([r['probe_accuracy'] for r in runs]):.2%}", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    if args.part == "both":
        table(result)


def table(result: dict) -> None:
    print(f"\n{'set':<10}" + "".join(f"{c:>20}" for c in (*[h[0] for h in HEADS], "LP-FT", "its probe")))
    for name, r in result["sets"].items():
        cells = [*r["heads"].values(), r["lpft"]["accuracy"], r["lpft"]["own_probe"]]
        print(f"{name:<10}" + "".join(f"{c['mean']:>12.2%} (n={c['splits']})" for c in cells))
        same = len(r["lpft"]["runs"])  # the heads on the splits LP-FT ran on, for a like-for-like line
        print(f"{'':<10}" + "".join(f"{np.mean(h['scores'][:same]):>12.2%} (n={same})" for h in r["heads"].values())
              + "   (heads on the LP-FT splits only)")


if __name__ == "__main__":
    main()
