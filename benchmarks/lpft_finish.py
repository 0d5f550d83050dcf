"""What an LP-FT run should keep at its end, judged by cross-validation inside the TRAINING folders of
flowers12, dtd10 and intel6 (the folds of select_defaults.py; no test folder is read).

    nice -n 10 python benchmarks/lpft_finish.py averaging [--folds 3] [--run-folds 3] [--epochs 10]
    nice -n 10 python benchmarks/lpft_finish.py headrefit [--folds 3] [--run-folds 3] [--epochs 10]
    nice -n 10 python benchmarks/lpft_finish.py ensemble  [--folds 3] [--run-folds 3] [--epochs 10] [--seed 0]
    nice -n 10 python benchmarks/lpft_finish.py ensemble --test-splits 10 [--from-split 0] [--sets dtd10]
    python benchmarks/lpft_finish.py PART --runs runs/bench/lpft_finish_PART.json  (the rules only, no training)

Each fold run is one `finetune` recipe with the defaults (LP-FT, the probe guard's held-out part), kept
in memory with every epoch's weights; the candidates are then scored on the held-out part (which
chooses) and on the fold's held-out images (which judge).

averaging: the epochs themselves (epoch 0: the probe), blends of an epoch with the probe (WiSE-FT,
    Wortsman et al. 2022: a share `a` of the trained weights, 1 - a of the probe's) and means of the
    last N epochs' weights (as stochastic weight averaging does). A rule names the candidates it
    chooses among on the held-out part; its choice is kept when it beats the probe there, else the
    probe refitted on the fold's whole training part (what `finetune` does).
headrefit: for the guard's best epoch and the last, the network with its trained linear layer against
    a logistic regression (the stage-2 probe, C by its inner CV) refitted on the network's features
    of the fold's whole training part (the held-out part too), or of the part it trained on.
ensemble: output ensembles (the mean of the two members' probabilities) of an epoch's network with the
    probe refitted on the fold's whole training part (on cached features): kept where the guard keeps
    the epoch, always, or with the guard itself judging the ensemble (with the probe the run started
    from) against the probe on the held-out part. Every member's log-probabilities are stored, so the
    same runs also score guards that judge the epoch on held-out images it was not chosen on (nested:
    chosen on k-1 parts of the held-out part, judged on the k-th), free of the upward bias of taking
    the best of ten epochs on the images that judge it. Given two outputs (`--runs A B`, B run with
    `--seed 1`: another held-out part, shuffling and augmentation), it scores guards that weigh both
    runs' held-out parts (twice the training) and keep the first run's network.

--test-splits N: the same runs on the re-drawn train/test splits of three_sets.py (the set's train and
test folders pooled, resplit.py seed 1; split i is the same there) instead of CV folds: the "fold"
images are then a split's test images. This checks a rule chosen by the CV; it chooses nothing.
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
from resplit import pooled, resampled_indices, write_split
from select_defaults import DATA, LITES, SETS, fold_folder, fold_options, fold_probe_accuracy
from sklearn.model_selection import StratifiedKFold

from pipeline.features.extract import extract
from pipeline.heads.fit import fit_head
from pipeline.heads.spec import HEAD_OPTIONS, HeadSpec

ROOT = Path(__file__).resolve().parents[1]
WISE = (0.5, 0.75)  # the trained weights' share in a blend with the probe's
LAST = (3, 5)  # means of the last N epochs' weights


def _snapshot(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _blend(states: list[dict], shares: list[float]) -> dict:
    """The weighted mean of state dicts (floating tensors; other buffers from the last state)."""
    return {k: sum(w * s[k].float() for s, w in zip(states, shares, strict=True)).to(v.dtype)
            if v.is_floating_point() else v for k, v in states[-1].items()}


@contextmanager
def test_split_folder(name: str, split: int, count: int) -> Iterator[Path]:
    """data/train and data/test of three_sets.py's re-drawn split `split` (of `count`), as symlinks."""
    paths, labels, classes = pooled(DATA / name)
    test_size = len(pooled(DATA / name, parts=("test",))[1])
    with tempfile.TemporaryDirectory(prefix="lpft-split-") as work:
        yield write_split(paths, labels, classes, resampled_indices(labels, test_size, count)[split],
                          Path(work) / "data")


@contextmanager
def fold_run(args: argparse.Namespace, name: str, fold: int) -> Iterator[tuple]:
    """(prepared, its settings, every epoch's weights (0: the probe), the TrainResult, the probe refitted on
    the fold's whole training part: its fold accuracy) for one fold of a set (or, with --test-splits, one
    re-drawn split), trained with the defaults."""
    from pipeline.tuning.finetune import prepare
    from pipeline.tuning.options import TrainSettings
    from pipeline.tuning.training import train

    folder = test_split_folder(name, fold, args.test_splits) if args.test_splits else fold_folder(args, name, fold)
    with folder as data:
        options = fold_options(data, args, train=TrainSettings(epochs=args.epochs, patience=args.epochs,
                                                               seed=args.seed))
        p = prepare(options, progress=False)
        states = [_snapshot(p.model)]
        result = train(p.model, p.groups, p.fit_set, p.val_set, p.parent.preprocess, options.train, progress=False,
                       on_epoch=lambda _e, _r: states.append(_snapshot(p.model)))
        yield p, options, states, result, fold_probe_accuracy(data, options)


def averaging_cv(row: dict, p, settings, states: list[dict]) -> None:
    """Which held-out images (`val`) and fold images (`fold_right`) each candidate gets right, as '0'/'1'."""
    from pipeline.tuning.training import predict_logits

    candidates = [(f"e{k}", lambda s=s: s) for k, s in enumerate(states)]
    candidates += [(f"wise{a:g} e{k}", lambda s=s, a=a: _blend([states[0], s], [1 - a, a]))
                   for a in WISE for k, s in enumerate(states) if k]
    candidates += [(f"last{n}", lambda n=n: _blend(states[-n:], [1 / n] * n)) for n in LAST if n < len(states)]
    row |= {"epochs": len(states) - 1, "val": {}, "fold_right": {}}
    for label, state in candidates:  # each blend built when its turn comes: one in memory at a time
        p.model.load_state_dict(state())
        for key, images in (("val", p.val_set), ("fold_right", p.test[0])):
            right = predict_logits(p.model, images, p.parent.preprocess, settings).argmax(1) == images.labels
            row[key][label] = "".join("1" if r else "0" for r in right)


def _log_probabilities(logits: np.ndarray) -> list[list[float]]:
    shifted = logits.astype(np.float64) - logits.max(1, keepdims=True)  # float64: rounded values print short
    return np.round(shifted - np.log(np.exp(shifted).sum(1, keepdims=True)), 4).tolist()


def ensemble_cv(row: dict, p, options, states: list[dict]) -> None:
    """Log-probabilities on the held-out part (`val`) and the fold's held-out images (`fold_test`) of every
    epoch's network and of the probes on cached features: the one LP-FT started from (fitted on the part
    it trains on) and the one refitted on the fold's whole training part."""
    from pipeline.images.data import Dataset
    from pipeline.models.registry import get_spec
    from pipeline.tuning.finetune import every_image_probe
    from pipeline.tuning.training import predict_logits

    layer = get_spec(options.backbone).default_layer
    parts = {"val": p.val_set, "fold_test": p.test[0]}
    row |= {"epochs": len(states) - 1, **{f"{key}_labels": images.labels.tolist() for key, images in parts.items()}}
    for key, images in parts.items():
        row[key] = {}
        for k, state in enumerate(states):
            p.model.load_state_dict(state)
            row[key][f"e{k}"] = _log_probabilities(predict_logits(p.model, images, p.parent.preprocess, options.train))
    refit = every_image_probe(p, options, False)
    for key, images in parts.items():
        dataset = Dataset(images.paths, images.labels, p.classes, [])
        fs = extract(dataset, options.backbone, [layer], options.cache_dir, progress=False).feature_sets
        X = fs[(options.backbone, layer)].features.compute()
        row[key]["probe"] = np.round(p.probe.predict_log_proba(X).astype(np.float64), 4).tolist()
        if key == "fold_test":
            row[key]["refit"] = np.round(refit.predict_log_proba(X).astype(np.float64), 4).tolist()


def _embed(model, images, pre, settings) -> np.ndarray:
    """The network's pooled features (its linear layer's input): `predict_logits` without the layer."""
    from torch import nn

    from pipeline.tuning.training import predict_logits

    classifier, model.classifier = model.classifier, nn.Identity()
    try:
        return predict_logits(model, images, pre, settings)
    finally:
        model.classifier = classifier


def head_refit_cv(row: dict, p, settings, states: list[dict], result) -> None:
    """Fold accuracy of the best and the last epoch with the trained head and with refitted probes."""
    from pipeline.tuning.training import Images, predict_logits

    spec = HeadSpec("refit", "logistic_regression", LITES[:1], dict(HEAD_OPTIONS["logistic_regression"]))
    pre, test = p.parent.preprocess, p.test[0]
    margin = (p.fit_set.pixels.shape[1] - pre.crop) // 2  # the square's centre crop: evaluation's input
    fit_pixels = p.fit_set.pixels[:, margin:margin + pre.crop, margin:margin + pre.crop]
    every = Images(np.concatenate([fit_pixels, p.val_set.pixels]),
                   np.concatenate([p.fit_set.labels, p.val_set.labels]), p.fit_set.paths + p.val_set.paths)
    row |= {"best_trained_epoch": result.best_trained_epoch, "guard_p": result.guard_p}
    for key, epoch in (("best", result.best_trained_epoch), ("last", len(states) - 1)):
        p.model.load_state_dict(states[epoch])
        trained = predict_logits(p.model, test, pre, settings).argmax(1)
        X, X_test = _embed(p.model, every, pre, settings), _embed(p.model, test, pre, settings)
        row[key] = {"epoch": epoch, "trained head": float(np.mean(trained == test.labels))}
        for label, part in (("refit on 100%", slice(None)), ("refit on 80%", slice(0, len(fit_pixels)))):
            head = fit_head(spec, X[part], every.labels[part], [X.shape[1]]).pipeline
            row[key][label] = float(np.mean(head.predict(X_test) == test.labels))


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    for fold in range(args.from_split, args.test_splits) if args.test_splits else range(args.run_folds):
        for name in args.sets:
            started = time.perf_counter()
            with fold_run(args, name, fold) as (p, options, states, result, probe_refit):
                row = {"set": name, "fold": fold, "best_epoch": result.best_epoch, "probe_refit_accuracy": probe_refit}
                if args.part == "averaging":
                    averaging_cv(row, p, options.train, states)
                elif args.part == "ensemble":
                    ensemble_cv(row, p, options, states)
                else:
                    head_refit_cv(row, p, options.train, states, result)
            row["seconds"] = round(time.perf_counter() - started, 1)
            rows.append(row)
            part = "split" if args.test_splits else "fold"
            print(f"{name:<10} {part} {fold}: kept epoch {row['best_epoch']}, probe on the {part}'s training part "
                  f"{probe_refit:.2%} ({row['seconds']:.0f} s)", flush=True)
            out = Path(args.out or ROOT / "runs" / "bench" / f"lpft_finish_{args.part}.json")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"settings": vars(args), "runs": rows}, indent=1, default=str))
    return rows


def _line(label: str, means: list[float]) -> None:
    print(f"{label:<46}" + "".join(f"{m:>11.2%}" for m in means) + f"{np.mean(means):>9.2%}")


def _by_set(rules: dict, items: list, set_of=lambda r: r["set"]) -> dict:
    """{rule label: {set: the rule's fold accuracy on each of the set's items}}."""
    sets = dict.fromkeys(set_of(item) for item in items)
    return {label: {s: [rule(item) for item in items if set_of(item) == s] for s in sets}
            for label, rule in rules.items()}


def _score(right: str) -> float:
    return right.count("1") / len(right)


def averaging_rules(rows: list[dict]) -> dict:
    """Fold accuracy per set of each rule (a rule: the candidates it chooses among on the held-out part)."""
    def pick(row: dict, labels: list[str]) -> float:
        best = max(labels, key=lambda c: (_score(row["val"][c]), -labels.index(c)))  # the earliest of ties
        if _score(row["val"][best]) > _score(row["val"]["e0"]):
            return _score(row["fold_right"][best])
        return row["probe_refit_accuracy"]

    def epochs(row: dict, prefix: str = "") -> list[str]:
        return [f"{prefix}e{k}" for k in range(1, row["epochs"] + 1)]

    def best(row: dict) -> str:
        return max(epochs(row), key=lambda c: (_score(row["val"][c]), -int(c[1:])))

    rules = {"best epoch (the guard today)": lambda r: pick(r, epochs(r)),
             "last epoch": lambda r: pick(r, [f"e{r['epochs']}"])}
    for a in WISE:
        rules[f"wise {a:g} of the best epoch"] = lambda r, a=a: pick(r, [f"wise{a:g} {best(r)}"])
        rules[f"wise {a:g}, epoch chosen blended"] = lambda r, a=a: pick(r, epochs(r, f"wise{a:g} "))
        rules[f"wise {a:g} of the last epoch"] = lambda r, a=a: pick(r, [f"wise{a:g} e{r['epochs']}"])
    for n in (n for n in LAST if all(f"last{n}" in r["val"] for r in rows)):  # runs of n epochs or more
        rules[f"mean of the last {n}"] = lambda r, n=n: pick(r, [f"last{n}"])
        rules[f"best epoch or mean of last {n}"] = lambda r, n=n: pick(r, [*epochs(r), f"last{n}"])
    rules["probe refitted (no fine-tuning)"] = lambda r: r["probe_refit_accuracy"]
    return _by_set(rules, rows)


def right(row: dict, key: str, *members: str) -> np.ndarray:
    """Which of a part's images (`val` or `fold_test`) the mean of the members' probabilities gets right."""
    mean = np.mean([np.exp(np.asarray(row[key][m])) for m in members], axis=0)
    return mean.argmax(1) == np.asarray(row[f"{key}_labels"])


def _fold(row: dict, *members: str) -> float:
    """Accuracy on the fold's held-out images of the mean of the members' probabilities."""
    return float(right(row, "fold_test", *members).mean())


def two_runs_rules(first: list[dict], second: list[dict]) -> dict:
    """Two `ensemble` runs per fold with different seeds (so different held-out parts): guards that
    weigh both held-out parts, scored on the fold's images. The first run's network is kept."""
    pairs = [(a, b) for a in first for b in second if (a["set"], a["fold"]) == (b["set"], b["fold"])]

    def lead(row: dict, k: int) -> int:
        return int(right(row, "val", f"e{k}").sum() - right(row, "val", "e0").sum())

    def best(row: dict) -> int:
        return max(range(1, row["epochs"] + 1), key=lambda k: (lead(row, k), -k))

    def guard(row: dict) -> float:  # the guard today, on one run
        return _fold(row, f"e{best(row)}") if lead(row, best(row)) > 0 else _fold(row, "refit")

    def both(a: dict, b: dict) -> float:  # the epoch best on the two held-out parts together
        k = max(range(1, a["epochs"] + 1), key=lambda k: (lead(a, k) + lead(b, k), -k))
        return _fold(a, f"e{k}") if lead(a, k) + lead(b, k) > 0 else _fold(a, "refit")

    rules = {"first run, the guard today": lambda pair: guard(pair[0]),
             "second run, the guard today": lambda pair: guard(pair[1]),
             "an epoch chosen on both held-out parts": lambda pair: both(*pair),
             "each run's best epoch leads on its own part": lambda pair: guard(pair[0])
             if lead(pair[1], best(pair[1])) > 0 else _fold(pair[0], "refit"),
             "probe refitted (no fine-tuning)": lambda pair: _fold(pair[0], "refit")}
    return _by_set(rules, pairs, lambda pair: pair[0]["set"])


def ensemble_rules(rows: list[dict]) -> dict:
    """Fold accuracy per set of today's guard, of output ensembles (the mean of two members' probabilities)
    of the network with the probe, and of guards that judge the epoch on held-out images it was not
    chosen on (the choice of epoch made on the rest of the held-out part)."""
    def best(row: dict, *partner: str, among: np.ndarray | slice = slice(None)) -> str:
        """The trained epoch best on (`among`) the held-out part, the earliest of ties."""
        return max((f"e{k}" for k in range(1, row["epochs"] + 1)),
                   key=lambda e: (right(row, "val", e, *partner)[among].sum(), -int(e[1:])))

    def guard(row: dict, ensemble: bool, chosen_with_probe: bool) -> float:
        epoch = best(row, *(["probe"] if chosen_with_probe else []))
        held = right(row, "val", epoch, *(["probe"] if chosen_with_probe else [])).sum()
        if held > right(row, "val", "e0").sum():
            return _fold(row, epoch, *(["refit"] if ensemble else []))
        return _fold(row, "refit")

    def nested(row: dict, k: int) -> float:
        """The best epoch kept when choosing on k-1 parts of the held-out images and judging on the k-th
        (summed over the k ways, 5 seeds of the parts) beats the probe on them: the choice's own lead,
        without the upward bias of a maximum over epochs."""
        labels, kept = np.asarray(row["val_labels"]), []
        for seed in range(5):
            lead = 0
            for chosen_on, judged_on in StratifiedKFold(k, shuffle=True, random_state=seed).split(labels, labels):
                epoch = best(row, among=chosen_on)
                lead += int(right(row, "val", epoch)[judged_on].sum() - right(row, "val", "e0")[judged_on].sum())
            kept.append(_fold(row, best(row)) if lead > 0 else _fold(row, "refit"))
        return float(np.mean(kept))

    rules = {"best epoch (the guard today)": lambda r: guard(r, False, False),
             "guard today, ensemble when kept": lambda r: guard(r, True, False),
             "guard on the ensemble": lambda r: guard(r, True, True),
             "ensemble of the best epoch, always": lambda r: _fold(r, best(r), "refit"),
             "ensemble of the last epoch, always": lambda r: _fold(r, f"e{r['epochs']}", "refit"),
             "finetune --ensemble (last epoch, unless below)": lambda r: _fold(r, f"e{r['epochs']}", "refit")
             if right(r, "val", f"e{r['epochs']}", "probe").sum() >= right(r, "val", "probe").sum()
             else _fold(r, "refit"),
             "guard on a 2-fold nested choice": lambda r: nested(r, 2),
             "guard on a 5-fold nested choice": lambda r: nested(r, 5),
             "probe refitted (no fine-tuning)": lambda r: _fold(r, "refit")}
    return _by_set(rules, rows)


def head_refit_rules(rows: list[dict]) -> dict:
    """The guard's decision as it was (a trained epoch, or the probe refitted), with each head."""
    rules = {f"{key} epoch, {head}": lambda r, key=key, head=head: r[key][head] if r["best_epoch"]
             else r["probe_refit_accuracy"]
             for key in ("best", "last") for head in ("trained head", "refit on 100%", "refit on 80%")}
    rules["probe refitted (no fine-tuning)"] = lambda r: r["probe_refit_accuracy"]
    return _by_set(rules, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("averaging", "headrefit", "ensemble"))
    parser.add_argument("--sets", nargs="+", default=list(SETS))
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--run-folds", type=int, default=3, help="run the first R of the K folds")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0,
                        help="finetune's seed: its held-out part, shuffling and augmentation (a second run per fold)")
    parser.add_argument("--test-splits", type=int, default=0,
                        help="run on three_sets.py's first N re-drawn train/test splits instead of CV folds")
    parser.add_argument("--from-split", type=int, default=0, help="with --test-splits: start at this split")
    parser.add_argument("--cache", default="/work/shared-cache")
    parser.add_argument("--runs", nargs="+", help="score the rules on the JSON an earlier run wrote (no training); "
                        "ensemble: a second file (another --seed) also scores guards weighing both held-out parts")
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = json.loads(Path(args.runs[0]).read_text())["runs"] if args.runs else run(args)
    if args.part == "ensemble" and args.runs and len(args.runs) > 1:
        table = two_runs_rules(rows, json.loads(Path(args.runs[1]).read_text())["runs"])
    else:
        rules = {"averaging": averaging_rules, "ensemble": ensemble_rules, "headrefit": head_refit_rules}
        table = rules[args.part](rows)
    sets = list(next(iter(table.values())))
    print(f"\n{'rule (fold runs per set)':<46}" + "".join(f"{s:>11}" for s in sets) + f"{'mean':>9}")
    for label, scores in table.items():
        _line(label, [float(np.mean(scores[s])) for s in sets])
    print("fold runs: " + ", ".join(f"{s} {len(table['probe refitted (no fine-tuning)'][s])}" for s in sets))
    if args.part != "averaging":
        paired(table, sets)


def paired(table: dict, sets: list[str]) -> None:
    """Each rule against the refitted probe on the same runs: the mean paired difference (points), its
    standard error, and on how many runs the rule is above / level with / below the probe."""
    probe = table["probe refitted (no fine-tuning)"]
    print(f"\n{'rule - probe: mean (se) above/level/below':<46}" + "".join(f"{s:>22}" for s in sets))
    for label, scores in table.items():
        cells = []
        for s in sets:
            diff = (np.array(scores[s]) - np.array(probe[s])) * 100
            se = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")
            cells.append(f"{diff.mean():+.2f} ({se:.2f}) {(diff > 1e-9).sum()}/{(abs(diff) <= 1e-9).sum()}/"
                         f"{(diff < -1e-9).sum()}")
        print(f"{label:<46}" + "".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
