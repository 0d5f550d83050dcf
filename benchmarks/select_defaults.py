"""Choosing the fine-tuning and fusion defaults by cross-validation inside the TRAINING folders of
flowers12, dtd10 and intel6 (no test folder is read).

    nice -n 10 python benchmarks/select_defaults.py fusion   [--folds 3] [--cache /work/shared-cache]
    nice -n 10 python benchmarks/select_defaults.py finetune [--folds 3] [--run-folds 1] [--epochs 4]
                                                             [--candidates LABEL] [--guard-alpha 1]
    nice -n 10 python benchmarks/select_defaults.py refit    [--folds 3]

fusion: stratified K-fold CV of each training folder on cached head-layer features (no forward pass):
    PCA fusion (pca_then_concat, C by the head's own inner CV) for a few (sources, components)
    candidates, beside the Lite0 logistic-regression probe; a candidate's score is its mean fold accuracy.
finetune: the same folds, but each candidate is a whole `finetune` run with the probe guard on (a
    stratified part of the fold's training images held out to choose between the linear probe and the
    trained epochs), scored on the fold's held-out images. `--run-folds R` runs only the first R folds
    of the K (compute: one fold of one set is a few minutes of 2 shared CPU cores per candidate). The
    run also scores the probe refitted on the fold's whole training part: the cheap half of the
    "refit on everything after choosing" question.

    With `--guard-alpha 1` it also prints the fold accuracy each level of the guard's test would give
    (training does not depend on the level: one run per fold answers for every level).

retrain: for the runs of a finetune part's output (`--runs JSON`) that kept a trained epoch k, the same
    recipe again on the fold's whole training part for k epochs (no held-out part): is the network
    better for the 20% the guard held out? Runs that kept the probe score as they did.
    nice -n 10 python benchmarks/select_defaults.py retrain --runs runs/bench/select_defaults_lr.json
                                                            [--candidates LABEL] [--folds 3]

margin: does the guard keep better epochs when the held-out lead must pass what the probe would gain
    from the 20% it never sees? For each fold run of a finetune part's output (`--runs JSON`, same folds),
    the probe's learning curve on the guard's held-out part (cached features): the probe on the 80% the
    run trains on against probes on 75% of that (5 draws); the lead an epoch needs is that gain times
    `m` (log(100/80) / log(80/60) = 0.78 for a curve linear in log images, or 1). Scored offline as
    `guard_levels` scores levels.
    nice -n 10 python benchmarks/select_defaults.py margin --runs runs/bench/select_defaults_lr.json
                                                           [--candidates LABEL]

refit: when the guard keeps the probe, is it better refitted on the whole training part? The same
    folds, Lite0's cached features: the probe (logistic regression, C by CV) fitted on the 80% that
    `finetune` trains on (its stratified split, seed 0) against the probe fitted on all of it.

Prints a table per part and writes runs/bench/select_defaults_<part>.json after every run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from resplit import pooled, write_split
from sklearn.metrics import accuracy_score
from sklearn.model_selection import StratifiedKFold

from pipeline.features.extract import extract
from pipeline.heads.fit import fit_head
from pipeline.heads.spec import HEAD_OPTIONS, HeadSpec
from pipeline.images.data import require_labelled, scan
from pipeline.tuning.options import GUARD_ALPHA, VAL_FRACTION, FinetuneOptions, TrainSettings

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SETS = ("flowers12", "dtd10", "intel6")
LITES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
# (label, head type, sources, options): the reference probe, then the fusion candidates.
FUSION = [("logreg lite0", "logistic_regression", LITES[:1], {})] + [
    (f"fusion {'+'.join(s[-1] for s in sources)} k={k}", "pca_fusion", sources, {"components": k})
    for sources, k in ((LITES, 64), (LITES, 128), (LITES, 256), (LITES[1:], 128))]
# (label, unfreeze, lr, share held out for the guard): every candidate runs the same epochs with LP-FT and
# the probe guard.
FINETUNE = [("last:6 lr1e-3", "last:6", 1e-3, VAL_FRACTION), ("last:3 lr1e-3", "last:3", 1e-3, VAL_FRACTION),
            ("last:6 lr3e-4", "last:6", 3e-4, VAL_FRACTION), ("last:6 lr3e-4 val0.1", "last:6", 3e-4, 0.1)]


def folds(labels: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return list(StratifiedKFold(k, shuffle=True, random_state=0).split(labels, labels))


def _save(args: argparse.Namespace, rows: list[dict]) -> None:
    out = Path(args.out or ROOT / "runs" / "bench" / f"select_defaults_{args.part}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": vars(args), "runs": rows}, indent=1, default=str))


def fusion(args: argparse.Namespace) -> list[dict]:
    rows = []
    for name in args.sets:
        report = extract(DATA / name / "train", LITES, ["head"], cache_dir=args.cache, progress=False)
        assert report.computed == 0, f"{name}: features were not all in {args.cache}"
        sets = {b: report.feature_sets[(b, "head")] for b in LITES}
        y = sets[LITES[0]].labels
        X = {b: sets[b].features.compute() for b in LITES}
        for label, head_type, sources, options in FUSION:
            started, scores = time.perf_counter(), []
            for train, held in folds(y, args.folds):
                features = np.hstack([X[s] for s in sources])
                spec = HeadSpec(label, head_type, sources, {**HEAD_OPTIONS[head_type], **options})
                fitted = fit_head(spec, features[train], y[train], [X[s].shape[1] for s in sources])
                scores.append(float(accuracy_score(y[held], fitted.pipeline.predict(features[held]))))
            rows.append({"set": name, "candidate": label, "folds": scores, "mean": float(np.mean(scores)),
                         "seconds": round(time.perf_counter() - started, 1)})
            print(f"{name:<10} {label:<22} CV {np.mean(scores):.2%}  ({time.perf_counter() - started:.0f} s)",
                  flush=True)
            _save(args, rows)
    return rows


@contextmanager
def fold_folder(args: argparse.Namespace, name: str, fold: int) -> Iterator[Path]:
    """A temporary folder: data/train and data/test (a fold of the set's training folder, as symlinks),
    beside which a run may write; yields data."""
    paths, labels, classes = pooled(DATA / name, parts=("train",))
    with tempfile.TemporaryDirectory(prefix="select-") as work:
        yield write_split(paths, labels, classes, folds(labels, args.folds)[fold], Path(work) / "data")


def fold_options(data: Path, args: argparse.Namespace, **changes) -> FinetuneOptions:
    """`finetune`'s options for a fold folder: the fold's parts, outputs beside it, `changes` on top."""
    return FinetuneOptions(data / "train", data / "test", out=data.parent / "run", name="cv",
                           backbones_dir=data.parent / "backbones", cache_dir=args.cache, **changes)


def fold_probe_accuracy(data: Path, options: FinetuneOptions) -> float:
    """The probe refitted on the fold's whole training part, scored on its held-out images (cached features)."""
    from pipeline.tuning.finetune import fit_probe, probe_accuracy

    whole = fit_probe(require_labelled(scan(data / "train"), "fold"), options.backbone, options, False)
    return probe_accuracy(whole, require_labelled(scan(data / "test"), "fold"), options, False)


def _fold_finetune(args: argparse.Namespace, name: str, fold: int, unfreeze: str, lr: float, epochs: int,
                   val_fraction: float = VAL_FRACTION, refit_probe: bool = True) -> tuple[dict, float | None]:
    """One `finetune` run on a fold of a set's training folder, scored on the fold's held-out images; with
    `refit_probe`, also `fold_probe_accuracy`, else None."""
    from pipeline.tuning.finetune import finetune

    with fold_folder(args, name, fold) as data:
        options = fold_options(data, args, unfreeze=unfreeze, val_fraction=val_fraction,
                               train=TrainSettings(epochs=epochs, lr=lr, patience=epochs, guard_alpha=args.guard_alpha))
        m = finetune(options, progress=False).metrics
        return m, fold_probe_accuracy(data, options) if refit_probe else None


def finetune_cv(args: argparse.Namespace) -> list[dict]:
    rows = []
    candidates = [c for c in FINETUNE if not args.candidates or c[0] in args.candidates]
    # candidate before set: when compute runs out, the candidates done have every set
    for fold in range(args.run_folds):
        for label, unfreeze, lr, val_fraction in candidates:
            for name in args.sets:
                m, refit = _fold_finetune(args, name, fold, unfreeze, lr, args.epochs, val_fraction)
                rows.append({"set": name, "fold": fold, "candidate": label, "accuracy": m["accuracy"],
                             "probe_accuracy": m["probe_accuracy"], "probe_refit_accuracy": refit,
                             "kept": m["kept"], "best_epoch": m["best_epoch"], "guard_p": m["guard_p"],
                             "val": [m["start_val_accuracy"], *[h["val_accuracy"] for h in m["history"]]],
                             "seconds": m["seconds"]})
                print(f"{name:<10} fold {fold} {label:<14} final {m['accuracy']:.2%} (kept {m['kept']}, epoch "
                      f"{m['best_epoch']})  probe {m['probe_accuracy']:.2%}  probe refit {refit:.2%}  "
                      f"({m['seconds']:.0f} s)", flush=True)
                _save(args, rows)
    return rows


def retrain_cv(args: argparse.Namespace) -> list[dict]:
    """For each run of a `finetune` part's output (`--runs`) that kept a trained epoch k: `finetune` again on
    the fold's whole training part (no held-out part, the probe on all of it as the start) for k epochs,
    scored on the same held-out images. A run that kept the probe scores as it did."""
    rows = []
    recipes = {label: (unfreeze, lr) for label, unfreeze, lr, _ in FINETUNE}
    for run in json.loads(Path(args.runs).read_text())["runs"]:
        if args.candidates and run["candidate"] not in args.candidates or run["set"] not in args.sets:
            continue
        row = {key: run[key] for key in ("set", "fold", "candidate", "best_epoch")}
        rows.append({**row, "candidate": f"{run['candidate']} guard", "accuracy": run["accuracy"]})
        accuracy = run["accuracy"]
        if run["kept"] == "fine-tuned":
            m, _ = _fold_finetune(args, run["set"], run["fold"], *recipes[run["candidate"]], run["best_epoch"], 0.0,
                                 refit_probe=False)
            accuracy = m["accuracy"]
            print(f"{run['set']:<10} fold {run['fold']} {run['candidate']:<14} epoch {run['best_epoch']}: "
                  f"{run['accuracy']:.2%} on 80%, retrained on 100% {accuracy:.2%} ({m['seconds']:.0f} s)", flush=True)
        rows.append({**row, "candidate": f"{run['candidate']} retrain", "accuracy": accuracy})
        _save(args, rows)
    return rows


def guard_levels(rows: list[dict]) -> None:
    """From runs made with --guard-alpha 1 (an epoch kept for any held-out lead): what each level of the
    guard's McNemar test would have scored on the folds. Training does not depend on the level, so a level
    that rejects a kept epoch ends with the probe refitted on the fold's training part (its fold accuracy
    on cached features, `probe_refit_accuracy`); the probe's outcome is scored that way for every level."""
    sets = list(dict.fromkeys(r["set"] for r in rows))
    print(f"\n{'guard level':<14}" + "".join(f"{s:>11}" for s in sets) + f"{'mean':>9}")
    for level in (0.01, 0.05, 0.1, 0.2, 0.5, 1.0):
        means = []
        for name in sets:
            scores = [r["accuracy"] if r["kept"] == "fine-tuned" and r["guard_p"] <= level
                      else r["probe_refit_accuracy"] for r in rows if r["set"] == name]
            means.append(float(np.mean(scores)))
        print(f"{level:<14g}" + "".join(f"{m:>11.2%}" for m in means) + f"{np.mean(means):>9.2%}")


def _curve(args: argparse.Namespace, name: str, fold: int, draws: int = 5) -> tuple[int, float]:
    """(held-out images, how many more of them the probe on the run's 80% gets right than probes on 75%
    of that 80%, the mean of `draws`), on cached features; the held-out part is `finetune`'s own split."""
    from sklearn.model_selection import train_test_split

    from pipeline.images.data import Dataset
    from pipeline.tuning.finetune import _split, fit_probe, probe_predictions

    with fold_folder(args, name, fold) as data:
        options = fold_options(data, args)
        dataset = require_labelled(scan(data / "train"), "fold")
        y = dataset.labels
        fit, val = _split(y, VAL_FRACTION, options.train.seed)

        def part(rows: np.ndarray) -> Dataset:
            return Dataset([dataset.paths[i] for i in rows], y[rows], dataset.class_names, [])

        def right(rows: np.ndarray) -> int:
            labels, predicted = probe_predictions(fit_probe(part(rows), options.backbone, options, False), part(val),
                                                  options, False)
            return int(np.sum(labels == predicted))

        fewer = [right(np.sort(train_test_split(fit, test_size=0.25, stratify=y[fit], random_state=seed)[0]))
                 for seed in range(draws)]
        return len(val), right(fit) - float(np.mean(fewer))


def margin(args: argparse.Namespace) -> list[dict]:
    rows = []
    for run in json.loads(Path(args.runs).read_text())["runs"]:
        if args.candidates and run["candidate"] not in args.candidates or run["set"] not in args.sets:
            continue
        held, gain = _curve(args, run["set"], run["fold"])
        best = int(np.argmax(run["val"][1:])) + 1  # the earliest best trained epoch
        lead = round((run["val"][best] - run["val"][0]) * held)
        row = {key: run[key] for key in ("set", "fold", "candidate")}
        print(f"{run['set']:<10} fold {run['fold']}: best epoch {best} leads by {lead} of {held} held-out images; "
              f"the probe gains {gain:.1f} from 75% to 100% of the 80%", flush=True)
        # a probe kept by the run scores as it did (`finetune`'s own refit); one a margin keeps, as in guard_levels
        probe = run["accuracy"] if run["kept"] == "probe" else run["probe_refit_accuracy"]
        for label, m in (("guard today (any lead)", 0.0), ("lead > 0.78 x the gain", 0.78), ("lead > the gain", 1.0)):
            kept = lead > max(0.0, m * gain)
            rows.append({**row, "candidate": label, "accuracy": run["accuracy"] if kept else probe, "lead": lead,
                         "gain": gain})
        _save(args, rows)
    return rows


def refit(args: argparse.Namespace) -> list[dict]:
    from sklearn.model_selection import train_test_split

    rows = []
    for name in args.sets:
        report = extract(DATA / name / "train", LITES[:1], ["head"], cache_dir=args.cache, progress=False)
        assert report.computed == 0, f"{name}: features were not all in {args.cache}"
        fs = report.feature_sets[(LITES[0], "head")]
        X, y = fs.features.compute(), fs.labels
        spec = HeadSpec("probe", "logistic_regression", LITES[:1], dict(HEAD_OPTIONS["logistic_regression"]))
        scores: dict[str, list[float]] = {"probe on 80%": [], "probe on 100%": []}
        for train, held in folds(y, args.folds):
            part = train_test_split(train, test_size=VAL_FRACTION, stratify=y[train], random_state=0)[0]
            for label, rows_ in (("probe on 80%", part), ("probe on 100%", train)):
                fitted = fit_head(spec, X[rows_], y[rows_], [X.shape[1]])
                scores[label].append(float(accuracy_score(y[held], fitted.pipeline.predict(X[held]))))
        for label, v in scores.items():
            rows.append({"set": name, "candidate": label, "folds": v, "mean": float(np.mean(v))})
            print(f"{name:<10} {label:<14} CV {np.mean(v):.2%}  {[round(x, 4) for x in v]}", flush=True)
        _save(args, rows)
    return rows


def table(rows: list[dict], score: str) -> None:
    candidates = list(dict.fromkeys(r["candidate"] for r in rows))
    sets = list(dict.fromkeys(r["set"] for r in rows))
    print(f"\n{'candidate':<22}" + "".join(f"{s:>11}" for s in sets) + f"{'mean':>9}")
    for c in candidates:
        means = [np.mean([r[score] for r in rows if r["set"] == s and r["candidate"] == c]) for s in sets]
        print(f"{c:<22}" + "".join(f"{m:>11.2%}" for m in means) + f"{np.mean(means):>9.2%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("fusion", "finetune", "refit", "retrain", "margin"))
    parser.add_argument("--sets", nargs="+", default=list(SETS))
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--run-folds", type=int, default=1, help="finetune: run the first R of the K folds")
    parser.add_argument("--epochs", type=int, default=4, help="finetune: epochs of every candidate")
    parser.add_argument("--candidates", nargs="+", help="finetune: only these candidates (their labels)")
    parser.add_argument("--guard-alpha", type=float, default=GUARD_ALPHA,
                        help="finetune: the guard's level; 1 (any lead) also prints what each level would score")
    parser.add_argument("--cache", default="/work/shared-cache")
    parser.add_argument("--runs", help="retrain, margin: the JSON a finetune part wrote")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.part in ("fusion", "refit"):
        table((fusion if args.part == "fusion" else refit)(args), "mean")
    elif args.part in ("retrain", "margin"):
        table((retrain_cv if args.part == "retrain" else margin)(args), "accuracy")
    else:
        rows = finetune_cv(args)
        table(rows, "accuracy")
        if args.guard_alpha == 1 and len({r["candidate"] for r in rows}) == 1:  # levels of one recipe
            guard_levels(rows)


if __name__ == "__main__":
    main()
