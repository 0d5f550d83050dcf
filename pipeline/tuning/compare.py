"""Transfer vs. scratch: how much labelled data and time each approach needs, on your own data.

At k labelled images per class (same seeded draws for every method) three things are trained and
scored on the same test split: the linear probe on frozen cached features (stage 2), fine-tuning
(stage 3, LP-FT, a short fixed schedule) and a small CNN from scratch (same augmentation, small
input). Wall times count fitting or training only: the frozen features are extracted once for all
runs (that time is reported separately, and a second comparison reads them from the cache).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score
from torch import nn

from pipeline.core.errors import ConfigError
from pipeline.core.io import make_folder, write_json_atomic
from pipeline.core.paths import path_text
from pipeline.features.extract import extract, resolve_device, resolve_precision
from pipeline.heads.fit import fit_head
from pipeline.heads.spec import HeadSpec
from pipeline.images.data import require_labelled, scan
from pipeline.images.data import test_labels as labels_in
from pipeline.images.preprocess import Preprocess
from pipeline.models.registry import BackboneSpec, get_spec
from pipeline.models.weights import load_backbone, resolve_weights
from pipeline.tuning.finetune import check_unfreeze
from pipeline.tuning.network import build_model
from pipeline.tuning.options import CompareOptions
from pipeline.tuning.training import Images, TrainSettings, decode_images, predict_logits, square, train

METHODS = ("linear probe", "fine-tuning", "from scratch")
FINETUNE_LR = 3e-4  # the rate the comparison's few fixed steps were measured at (benchmarks/RESULTS.md)

logger = logging.getLogger(__name__)


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU-pool stages (32 to 256 channels), global pooling, a linear layer: the kind of
    network people train from scratch on a small dataset."""

    def __init__(self, classes: int, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for i in range(4):
            out = width * 2 ** i
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


def parse_shots(text: str) -> list[int | None]:
    try:
        shots = [None if s.strip() == "all" else int(s) for s in text.split(",")]
    except ValueError:
        raise ConfigError(f"--shots must be positive integers or 'all', comma-separated, not {text!r}") from None
    if any(s is not None and s < 1 for s in shots):
        raise ConfigError("--shots must be positive integers or 'all'")
    return shots


def kshot_rows(labels: np.ndarray, k: int | None, seed: int) -> np.ndarray:
    """k rows per class drawn with `seed` (every row when k is None or exceeds the class)."""
    rng = np.random.default_rng(seed)
    rows = [rng.permutation(np.flatnonzero(labels == c))[:k] for c in np.unique(labels)]
    return np.sort(np.concatenate(rows))


@dataclass
class _Data:
    """Everything decoded and extracted once, aligned row by row on the training images."""

    ft_train: Images
    ft_test: Images
    sc_train: Images
    sc_test: Images
    X_train: np.ndarray
    X_test: np.ndarray
    classes: list[str]
    extract_seconds: float
    skipped: list[tuple[str, str]]  # (path, reason): files of either folder left out, training files first


def _aligned(images: Images, paths: list[Path]) -> Images:
    where = {p: i for i, p in enumerate(images.paths)}
    return images.subset(np.asarray([where[p] for p in paths]))


def _load(options: CompareOptions, spec: BackboneSpec, scratch_pre: Preprocess, progress: bool) -> _Data:
    train_ds = require_labelled(scan(options.data), f"--data {options.data}")
    test_ds = require_labelled(scan(options.test), f"--test {options.test}")
    classes = train_ds.class_names
    test_labels = labels_in(classes, test_ds, "--test")
    started = time.perf_counter()
    layer = spec.default_layer
    reports = [extract(ds, options.backbone, [layer], options.cache_dir, options.device, options.precision,
                       progress=progress) for ds in (train_ds, test_ds)]
    feats = [report.feature_sets[(options.backbone, layer)] for report in reports]
    extract_seconds = time.perf_counter() - started
    skipped: dict[str, str] = {}  # path -> the first reason given for it (the extraction's, else the decoding's)
    split = {}
    parts = (("train", train_ds, train_ds.labels, feats[0]), ("test", test_ds, test_labels, feats[1]))
    for (name, ds, labels, fs), report in zip(parts, reports, strict=True):
        ft, ft_skipped = decode_images(ds.paths, labels, square(spec.preprocess) if name == "train"
                                       else spec.preprocess, f"decode {name}", progress)
        sc, sc_skipped = decode_images(ds.paths, labels, square(scratch_pre) if name == "train" else scratch_pre,
                                       f"decode {name} (scratch)", progress)
        for path, reason in report.skipped + ft_skipped + sc_skipped:
            skipped.setdefault(path, reason)
        paths = [p for p in fs.paths if p in set(ft.paths) & set(sc.paths)]  # usable for all three
        rows = {p: i for i, p in enumerate(fs.paths)}
        split[name] = (_aligned(ft, paths), _aligned(sc, paths), fs.features.compute()[[rows[p] for p in paths]])
    return _Data(split["train"][0], split["test"][0], split["train"][1], split["test"][1], split["train"][2],
                 split["test"][2], classes, extract_seconds, list(skipped.items()))


def _settings(options: CompareOptions, n: int, steps: int, lr: float, seed: int) -> TrainSettings:
    """A fixed number of optimizer steps whatever k is, so small k still trains (many short epochs)."""
    epochs = max(1, math.ceil(steps / max(1, math.ceil(n / options.batch_size))))
    return TrainSettings(epochs=epochs, lr=lr, warmup=0.1 * epochs, batch_size=options.batch_size, seed=seed,
                         device=options.device, precision=options.precision)


def _one(options: CompareOptions, data: _Data, network: nn.Module, spec: BackboneSpec,
         scratch_pre: Preprocess, rows: np.ndarray, seed: int) -> dict[str, dict]:
    """The three methods on one k-shot draw: test accuracy and seconds of each."""
    out = {}
    y = data.ft_train.labels[rows]
    started = time.perf_counter()
    probe = fit_head(HeadSpec("probe", "logistic_regression", [spec.name], {"C": options.probe_C}),
                     data.X_train[rows], y, [data.X_train.shape[1]]).pipeline
    probe_seconds = time.perf_counter() - started
    out["linear probe"] = {"accuracy": float(accuracy_score(data.ft_test.labels, probe.predict(data.X_test))),
                           "seconds": probe_seconds}

    started = time.perf_counter()
    settings = _settings(options, len(rows), options.finetune_steps, FINETUNE_LR, seed)
    model, groups, _ = build_model(copy.deepcopy(network), spec, len(data.classes), probe, options.unfreeze,
                                   settings.lr, 0.5)
    model.to(settings.device, memory_format=torch.channels_last)
    train(model, groups, data.ft_train.subset(rows), None, spec.preprocess, settings, progress=False)
    seconds = time.perf_counter() - started + probe_seconds  # LP-FT starts from the probe
    predicted = predict_logits(model, data.ft_test, spec.preprocess, settings).argmax(1)
    out["fine-tuning"] = {"accuracy": float(accuracy_score(data.ft_test.labels, predicted)), "seconds": seconds}

    started = time.perf_counter()
    torch.manual_seed(seed)
    settings = _settings(options, len(rows), options.scratch_steps, 3e-3, seed)
    scratch = SmallCNN(len(data.classes)).to(settings.device, memory_format=torch.channels_last)
    train(scratch, [{"params": list(scratch.parameters()), "lr": settings.lr}], data.sc_train.subset(rows), None,
          scratch_pre, settings, progress=False)
    seconds = time.perf_counter() - started
    predicted = predict_logits(scratch, data.sc_test, scratch_pre, settings).argmax(1)
    out["from scratch"] = {"accuracy": float(accuracy_score(data.sc_test.labels, predicted)), "seconds": seconds}
    return out


def _warm_up(options: CompareOptions, data: _Data, network: nn.Module, spec: BackboneSpec,
             scratch_pre: Preprocess) -> None:
    """One untimed step of each network, so one-time kernel set-up is not charged to the first run."""
    rows = kshot_rows(data.ft_train.labels, 1, 0)[:2]
    settings = _settings(options, len(rows), 1, 1e-9, 0)
    model, groups, _ = build_model(copy.deepcopy(network), spec, len(data.classes), None, options.unfreeze, 1e-9, 0.5)
    model.to(settings.device, memory_format=torch.channels_last)
    train(model, groups, data.ft_train.subset(rows), None, spec.preprocess, settings, progress=False)
    scratch = SmallCNN(len(data.classes)).to(settings.device, memory_format=torch.channels_last)
    train(scratch, [{"params": list(scratch.parameters()), "lr": 1e-9}], data.sc_train.subset(rows), None,
          scratch_pre, settings, progress=False)


def check_options(options: CompareOptions) -> None:
    """Everything that can be refused before any work (a run config calls it before extracting)."""
    if min(options.finetune_steps, options.scratch_steps, options.batch_size) < 1 or options.scratch_size < 16:
        raise ConfigError("steps and batch size must be positive, and the scratch input at least 16 px")
    if not options.seeds or not options.shots:
        raise ConfigError("compare needs at least one seed and one shot count")
    if not 0 < options.probe_C < math.inf:
        raise ConfigError(f"probe_C must be a finite positive number, not {options.probe_C}")
    check_unfreeze(options.unfreeze)
    resolve_weights(get_spec(options.backbone))


def compare(options: CompareOptions, progress: bool = True) -> dict:
    """Run every (k, seed), write compare.json into `options.out` and return what it holds (the app
    layer draws compare.png and compare.html from it)."""
    from tqdm.auto import tqdm

    check_options(options)
    options.device = resolve_device(options.device)
    options.precision = resolve_precision(options.precision, options.device)
    spec = get_spec(options.backbone)
    network = load_backbone(options.backbone).network
    size = options.scratch_size
    scratch_pre = Preprocess(size * 8 // 7, size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear")
    data = _load(options, spec, scratch_pre, progress)
    _warm_up(options, data, network, spec, scratch_pre)
    runs = []
    todo = [(k, seed) for k in options.shots for seed in options.seeds]
    for k, seed in tqdm(todo, desc="compare", unit="run", disable=None if progress else True):
        rows = kshot_rows(data.ft_train.labels, k, seed)
        results = _one(options, data, network, spec, scratch_pre, rows, seed)
        runs += [{"shots": "all" if k is None else k, "seed": seed, "images": len(rows), "method": method, **r}
                 for method, r in results.items()]
        if progress:
            logger.info(f"k={'all' if k is None else k} seed={seed}: " + ", ".join(
                f"{m} {r['accuracy']:.1%} ({r['seconds']:.0f} s)" for m, r in results.items()))
    result = {"runs": runs, "classes": data.classes, "train_images": len(data.ft_train.labels),
              "test_images": len(data.ft_test.labels), "extract_seconds": round(data.extract_seconds, 3),
              "skipped": [[path_text(path), path_text(reason)] for path, reason in data.skipped],
              "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()}}
    out = make_folder(options.out)
    write_json_atomic(out / "compare.json", result)
    return result


def compare_summary(runs: list[dict]) -> dict[tuple[str, str], dict]:
    """(method, shots) -> mean/std accuracy, mean seconds and images over the seeds."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["method"], str(run["shots"])), []).append(run)
    return {key: {"accuracy": float(np.mean([r["accuracy"] for r in rs])),
                  "std": float(np.std([r["accuracy"] for r in rs])),
                  "seconds": float(np.mean([r["seconds"] for r in rs])),
                  "images": float(np.mean([r["images"] for r in rs])), "seeds": len(rs)}
            for key, rs in groups.items()}


def compare_rows(runs: list[dict]) -> list[dict]:
    """compare_summary as JSON-ready rows: method, shots, and the means over seeds."""
    return [{"method": method, "shots": shots, **stats} for (method, shots), stats in compare_summary(runs).items()]

