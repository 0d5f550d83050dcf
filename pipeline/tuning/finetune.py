"""Stage 3: fine-tune a backbone on a labelled folder and save it as a new registered backbone.

The trunk is cut at its default feature layer (the one stage 2 reads) and a new linear layer is put
on the pooled output (`pipeline.tuning.network`). LP-FT: that layer starts from the stage-2
logistic-regression probe fitted on the same backbone's cached features (its StandardScaler folded
into the weights), so training begins at the probe's accuracy instead of from noise that would first
wreck the pretrained features. A part of the training folder is held out to judge what is kept: the
best epoch, or the probe when no epoch beats it there; with `ensemble`, the last epoch averaged with
the probe (`pipeline.tuning.ensemble`), or the probe when that is below it there.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score

from pipeline.core.errors import ConfigError
from pipeline.core.io import make_folder, write_json_atomic
from pipeline.core.names import SAFE_NAME_RULE, is_safe_name
from pipeline.features.extract import resolve_device, resolve_precision
from pipeline.features.trained_on import trained_on as images_trained_on
from pipeline.heads.fit import fit_head
from pipeline.heads.spec import HEAD_OPTIONS, HeadSpec
from pipeline.images.data import Dataset, hash_files, require_labelled, scan, test_labels
from pipeline.images.preprocess import Preprocess
from pipeline.models.registry import MANIFEST, BackboneSpec, backbone_dirs, get_spec, list_backbones
from pipeline.models.weights import load_backbone, resolve_weights, save_backbone
from pipeline.tuning import ensemble
from pipeline.tuning.network import FineTuneNet, build_model, linear_from_probe
from pipeline.tuning.options import INITS, FinetuneOptions
from pipeline.tuning.training import Images, TrainResult, decode_images, predict_logits, square, train

logger = logging.getLogger(__name__)


def fit_probe(dataset: Dataset, backbone: str, options: FinetuneOptions, progress: bool = True):
    """The stage-2 logistic regression on the backbone's cached default-layer features of `dataset`."""
    fs = ensemble.cached_features(dataset, backbone, options, progress)
    C = HEAD_OPTIONS["logistic_regression"]["C"] if options.probe_C is None else options.probe_C
    spec = HeadSpec("probe", "logistic_regression", [f"{backbone}:{fs.layer}"], {"source": None, "C": C})
    features = fs.features.compute()
    return fit_head(spec, features, fs.labels, [features.shape[1]], class_names=fs.class_names).pipeline


def _split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded train/validation rows; fraction 0 keeps every image for training."""
    rows = np.arange(len(labels))
    if fraction == 0:
        return rows, rows[:0]
    from sklearn.model_selection import train_test_split

    try:
        fit, val = train_test_split(rows, test_size=fraction, stratify=labels, random_state=seed)
    except ValueError as exc:
        raise ConfigError(f"cannot hold out a stratified validation split of {fraction:.0%}: {exc}; "
                          "use --val-fraction 0 or a larger one") from None
    return np.sort(fit), np.sort(val)


def _backbones_root(options: FinetuneOptions) -> Path:
    return Path(options.backbones_dir) if options.backbones_dir else backbone_dirs()[0]


def check_unfreeze(unfreeze: str) -> None:
    """The syntax only; whether N fits the backbone is checked once the network is loaded."""
    if not re.fullmatch(r"head|all|last:[1-9][0-9]*", unfreeze):
        raise ConfigError(f"unfreeze must be head, all or last:N (N >= 1), not {unfreeze!r}")


def check_options(options: FinetuneOptions) -> str:
    """Everything that can be refused before any work; returns the new backbone's id."""
    if options.init not in INITS:
        raise ConfigError(f"init must be one of {', '.join(INITS)}, not {options.init!r}")
    if not 0 <= options.val_fraction < 1 or not 0 < options.lr_decay < math.inf:
        raise ConfigError("val-fraction must be in [0, 1) and lr-decay > 0 (finite)")
    if options.probe_C is not None and not 0 < options.probe_C < math.inf:
        raise ConfigError(f"probe C must be a finite positive number, not {options.probe_C}")
    check_unfreeze(options.unfreeze)
    options.train.check()
    spec = get_spec(options.backbone)
    resolve_weights(spec)
    name = options.name or f"{options.backbone}_ft_{Path(options.out).name}"
    if not is_safe_name(name):
        raise ConfigError(f"--name {name!r} must be {SAFE_NAME_RULE} (it names a folder)")
    root = _backbones_root(options)
    exists = name in list_backbones() or (root / name / MANIFEST).exists()
    if exists and not options.resume:
        raise ConfigError(f"backbone {name!r} already exists (registered, or in {root}): choose another --name")
    return name


def _test_images(options: FinetuneOptions, classes: list[str], pre: Preprocess,
                 progress: bool) -> tuple[tuple[Images, Dataset] | None, list[tuple[str, str]]]:
    """The decoded test split (None without `options.test`) and the files of it that were skipped."""
    if options.test is None:
        return None, []
    test = require_labelled(scan(options.test), f"--test {options.test}")
    labels = test_labels(classes, test, "--test")
    images, skipped = decode_images(test.paths, labels, pre, "decode test", progress)
    return (images, Dataset(images.paths, images.labels, classes, [])), list(test.skipped) + skipped



@dataclass
class Prepared:
    """Everything set up before the first step: the model (head initialised, blocks frozen), the
    AdamW groups, and the decoded splits."""

    name: str
    parent: BackboneSpec
    model: FineTuneNet | None
    groups: list[dict]
    blocks: int
    classes: list[str]
    fit_set: Images
    val_set: Images | None  # the held-out part of the training folder (the probe guard), None with val_fraction 0
    test: tuple[Images, Dataset] | None
    skipped: list[tuple[str, str]]  # (path, reason): training files left out, by the scan or the decoding
    probe: object = None  # the fitted stage-2 Pipeline, with init="probe"
    probe_accuracy: float | None = None  # the probe's test accuracy; after training, that of every image's probe
    test_skipped: list[tuple[str, str]] = field(default_factory=list)  # the same for the test folder


def prepare(options: FinetuneOptions, progress: bool = True) -> Prepared:
    """Check the options, decode the splits, build the model and initialise its head."""
    name = check_options(options)
    settings = options.train
    settings.device = resolve_device(settings.device)
    settings.precision = resolve_precision(settings.precision, settings.device)
    torch.manual_seed(settings.seed)
    parent = get_spec(options.backbone)
    loaded = load_backbone(options.backbone)
    dataset = require_labelled(scan(options.data), f"--data {options.data}")
    classes = dataset.class_names
    train_all, skipped = decode_images(dataset.paths, dataset.labels, square(parent.preprocess), "decode train",
                                       progress)
    fit_rows, val_rows = _split(train_all.labels, options.val_fraction, settings.seed)
    fit_set = train_all.subset(fit_rows)
    val_set = decode_images([train_all.paths[i] for i in val_rows], train_all.labels[val_rows],
                            parent.preprocess, "decode val", progress)[0] if len(val_rows) else None
    test, test_skipped = _test_images(options, classes, parent.preprocess, progress)
    prepared = Prepared(name, parent, None, [], 0, classes, fit_set, val_set, test, list(dataset.skipped) + skipped,
                        test_skipped=test_skipped)
    if options.init == "probe":
        prepared.probe = fit_probe(Dataset(fit_set.paths, fit_set.labels, classes, []), options.backbone, options,
                                   progress)
        if test is not None:
            prepared.probe_accuracy = probe_accuracy(prepared.probe, test[1], options, progress)
    prepared.model, prepared.groups, prepared.blocks = build_model(
        loaded.network, parent, len(classes), prepared.probe, options.unfreeze, settings.lr, options.lr_decay,
        options.train_bn)
    prepared.model.to(settings.device, memory_format=torch.channels_last)
    return prepared


@dataclass
class FinetuneResult:
    backbone: str
    folder: Path
    metrics: dict
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): training, then test files


def every_image_probe(p: Prepared, options: FinetuneOptions, progress: bool = True):
    """The probe fitted on every training image (the held-out part too; cheap, on cached features): stage
    2's logistic regression on this backbone, the head a user would have without fine-tuning."""
    images = [p.fit_set] + ([p.val_set] if p.val_set is not None else [])
    every = Dataset([path for i in images for path in i.paths], np.concatenate([i.labels for i in images]),
                    p.classes, [])
    return fit_probe(every, options.backbone, options, progress)


def keep_probe(p: Prepared, probe, options: FinetuneOptions) -> None:
    """No trained epoch beat the probe on the held-out part: the model is the parent network with the
    probe refitted on every training image as its head (folded into the classifier); the network keeps
    the parent's weights."""
    p.probe = probe
    weight, bias = linear_from_probe(p.probe, len(p.classes))
    with torch.no_grad():
        p.model.classifier.weight.copy_(weight.to(p.model.classifier.weight.device))
        p.model.classifier.bias.copy_(bias.to(p.model.classifier.bias.device))


def kept(init: str, best_epoch: int) -> str:
    """What the saved backbone holds: "fine-tuned" (an epoch's weights), "probe" (LP-FT whose probe no
    epoch beat on the held-out part) or "initial" (a random head no epoch beat); with `ensemble`,
    `finetune` itself decides between "ensemble" and "probe"."""
    if best_epoch:
        return "fine-tuned"
    return "probe" if init == "probe" else "initial"


def finetune(options: FinetuneOptions, progress: bool = True,
             on_epoch: Callable[[int, dict], None] | None = None) -> FinetuneResult:
    """Fine-tune, evaluate on `options.test` if given, and register the result as a new backbone.

    By default (`options.ensemble`, where it can be made) what is kept is the last epoch's network
    averaged with the probe, saved as a twin backbone (`pipeline.tuning.ensemble`); with a held-out
    part (`val_fraction` > 0) the probe is kept instead (refitted on every training image) when the
    ensemble is below it there, and the run says so. Without the ensemble the epoch kept is the best on
    the held-out part, the probe (epoch 0) included, kept as trained on the rest (no second training)."""
    started = time.perf_counter()
    p = prepare(options, progress)
    settings = options.train
    out = make_folder(options.out)
    use_ensemble = uses_ensemble(options)
    fingerprint = {"backbone": options.backbone, "unfreeze": options.unfreeze, "lr_decay": options.lr_decay,
                   "init": options.init, "train_bn": options.train_bn, "val_fraction": options.val_fraction,
                   **({"ensemble": True} if use_ensemble else {})}
    result = train(p.model, p.groups, p.fit_set, p.val_set, p.parent.preprocess, settings, out / "checkpoint.pt",
                   options.resume, fingerprint, on_epoch, progress, restore=not use_ensemble)
    outcome = kept(options.init, result.best_epoch)
    verdict = None  # with the ensemble and a held-out part: the guard's judgement of the ensemble
    if use_ensemble:
        if p.val_set is not None:
            verdict = ensemble.judge(p.model, p.probe, p.val_set, p.classes, p.parent.preprocess, options,
                                     len(result.history))
        outcome = "ensemble" if verdict is None or verdict.kept else "probe"
        if outcome == "probe":  # the network holds the last epoch's weights: back to the parent's
            p.model.network.load_state_dict(load_backbone(options.backbone).network.state_dict())
    start_probe_accuracy = p.probe_accuracy
    reference = None  # (labels, predicted) of the probe on every training image, on the test split
    if options.init == "probe":  # the reference: the probe on every training image (kept, when no epoch beats it)
        probe = p.probe
        if p.val_set is not None:
            probe = every_image_probe(p, options, progress)
            if p.test is not None:
                reference = probe_predictions(probe, p.test[1], options, progress)
                p.probe_accuracy = float(accuracy_score(*reference))
        if outcome == "probe":
            why = verdict.line() if verdict is not None else guard_verdict(result, settings.guard_alpha)
            logger.info(f"{why}: keeping the probe (the frozen backbone with the probe, refitted on every "
                        "training image, as its head)")
            keep_probe(p, probe, options)
    metrics = {"backbone": p.name, "parent": options.backbone, "classes": p.classes, "kept": outcome,
               "trainable_parameters": sum(t.numel() for g in p.groups for t in g["params"]), "blocks": p.blocks,
               "best_epoch": result.best_epoch, "start_val_accuracy": result.start_val_accuracy,
               "best_val_accuracy": _best_val(result), "best_trained_epoch": result.best_trained_epoch,
               "guard_p": result.guard_p, "guard_alpha": settings.guard_alpha,
               "guard": guard_verdict(result, settings.guard_alpha),
               **(_ensemble_metrics(verdict, outcome, result) if use_ensemble else {}),
               "stopped_early": result.stopped_early,
               "resumed_from_epoch": result.resumed_from, "train_seconds": round(result.seconds, 3),
               "history": result.history, "probe_accuracy": p.probe_accuracy,
               "start_probe_accuracy": start_probe_accuracy,
               "images": {"train": len(p.fit_set.labels), "val": 0 if p.val_set is None else len(p.val_set.labels),
                          "skipped": len(p.skipped)},
               "options": {**{k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()
                              if k != "train"}, **asdict(settings)}}
    if p.test is not None:
        if outcome == "probe" and reference is not None:  # the parent network with the reference probe as head
            labels, predicted = reference
        elif outcome == "ensemble":
            labels = p.test[0].labels
            predicted = ensemble.predict(p.model, probe, p.test[0], p.classes, p.parent.preprocess, options)
        else:
            labels = p.test[0].labels
            predicted = predict_logits(p.model, p.test[0], p.parent.preprocess, settings).argmax(1)
        metrics["accuracy"] = float(accuracy_score(labels, predicted))
        metrics["macro_f1"] = float(f1_score(labels, predicted, average="macro"))
    summary = {k: metrics.get(k) for k in ("accuracy", "macro_f1", "probe_accuracy", "best_epoch", "kept")}
    extra = {"classes": p.classes, "finetune": summary}
    # the images whose features the kept network was trained to separate (`features.trained_on` warns of
    # them): the parent's own, where it was fine-tuned too, and this run's where the network trained
    trained = set(images_trained_on(p.parent))
    if outcome in ("ensemble", "fine-tuned") and p.model.trained_units:
        trained.update(i for i in hash_files(p.fit_set.paths) if i is not None)
    if outcome == "ensemble":
        twin = ensemble.twin_state(p.parent, p.model.network, p.model.trained_units,
                                   *linear_from_probe(probe, len(p.classes)), p.model.classifier)
        folder = save_backbone(_backbones_root(options), p.name, p.parent, twin.state, extra, twin.layers, twin.paths,
                               trained)
    else:
        state = {"state_dict": {k: v.cpu() for k, v in p.model.network.state_dict().items()},
                 "classifier": {k: v.cpu() for k, v in p.model.classifier.state_dict().items()}}
        folder = save_backbone(_backbones_root(options), p.name, p.parent, state, extra, trained_on=trained)
    metrics["seconds"] = round(time.perf_counter() - started, 3)
    write_json_atomic(out / "finetune.json", metrics, default=str)
    return FinetuneResult(p.name, folder, metrics, p.skipped + p.test_skipped)


def guard_verdict(result: TrainResult, alpha: float) -> str | None:
    """Why the run kept what it kept, in a line; None without a held-out part."""
    if result.start_val_accuracy is None:
        return None
    start = f"the starting weights' {result.start_val_accuracy:.1%}"
    if not result.best_trained_epoch or result.guard_p is None:
        return f"no trained epoch beat {start} on the held-out part"
    best = result.history[result.best_trained_epoch - 1]
    lead = (f"epoch {result.best_trained_epoch} ({best['val_accuracy']:.1%} on the held-out part, "
            f"{best['val_gained']} image{'' if best['val_gained'] == 1 else 's'} gained and {best['val_lost']} lost "
            f"against {start}; McNemar p = {result.guard_p:.3f}")
    if result.best_epoch:
        return f"{lead}{'' if alpha >= 1 else f' <= {alpha:g}'}): kept"
    return f"{lead} > {alpha:g}) does not beat them by more than chance"


def uses_ensemble(options: FinetuneOptions) -> bool:
    """Whether the run keeps the ensemble with the probe: `options.ensemble` (the default), where it can
    be made; where it cannot, the run says why and the best epoch is judged instead."""
    if not options.ensemble:
        return False
    reason = ensemble.not_applicable(options.init, options.unfreeze)
    if reason is not None:
        logger.info(f"no ensemble ({reason}): the held-out part judges the epochs instead")
    return reason is None


def _ensemble_metrics(verdict: ensemble.Verdict | None, outcome: str, result: TrainResult) -> dict:
    """What `--ensemble` changes in finetune.json: the epoch in the ensemble (the last), the guard's line
    about the ensemble (no McNemar test: the epochs are not judged), and its held-out accuracy."""
    last = len(result.history) if outcome == "ensemble" else 0
    if verdict is None:
        return {"best_epoch": last, "guard": None, "guard_p": None, "ensemble_val_accuracy": None}
    return {"best_epoch": last, "guard": verdict.line(), "guard_p": None, "ensemble_val_accuracy": verdict.accuracy,
            "best_val_accuracy": verdict.accuracy if verdict.kept else result.start_val_accuracy}


def _best_val(result) -> float | None:
    """Held-out accuracy of the epoch kept (epoch 0: the starting weights); None without a held-out part."""
    if result.best_epoch == 0:
        return result.start_val_accuracy
    return result.history[result.best_epoch - 1].get("val_accuracy")


def probe_predictions(probe, test: Dataset, options: FinetuneOptions,
                      progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(labels, predicted classes) of the linear probe on the test split's cached features."""
    fs = ensemble.cached_features(test, options.backbone, options, progress)
    return fs.labels, probe.predict(fs.features.compute())


def probe_accuracy(probe, test: Dataset, options: FinetuneOptions, progress: bool = True) -> float:
    """The linear probe alone on the test split (cached features): what fine-tuning has to beat."""
    return float(accuracy_score(*probe_predictions(probe, test, options, progress)))
