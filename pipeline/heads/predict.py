"""Using a saved head on new images: image -> cache -> head.

New images are extracted with exactly the features the head was trained on (same backbone, layer,
weights and precision, hence the same cache key); images already in the cache are reused.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, f1_score

from pipeline.core.io import atomic_write, make_folder
from pipeline.core.paths import path_text
from pipeline.features.extract import ExtractReport, FeatureSet, cache_key, extract, f32_modules
from pipeline.features.settings import DEFAULTS
from pipeline.features.trained_on import TEST_ELSEWHERE, TESTED, warn_trained_on
from pipeline.heads.bundle import BundleError, HeadBundle, load_bundle
from pipeline.heads.decision import Decisions, answer_cells, answer_columns, decide
from pipeline.images.data import Dataset
from pipeline.models.registry import get_spec
from pipeline.models.weights import file_sha256, resolve_weights


def prediction_columns(bundle: HeadBundle) -> list[str]:
    """The columns of `Predictions.rows` for this head."""
    return ["path", "image_id", *answer_columns(bundle.decision), *[f"p_{c}" for c in bundle.classes]]


@dataclass
class Predictions:
    bundle: HeadBundle
    features: FeatureSet  # the first source: paths, ids and labels of the rows
    proba: np.ndarray
    report: ExtractReport

    @property
    def decisions(self) -> Decisions:
        """The head's decision for each image (`pipeline.heads.decision`)."""
        return decide(self.bundle.decision, self.proba)

    @property
    def predicted(self) -> np.ndarray:
        """The class each image gets (for a rejected one, its top class)."""
        if not len(self.proba):
            return np.zeros(0, dtype=int)
        return self.bundle.pipeline.classes_[self.decisions.label]

    def rows(self) -> Iterator[list[str]]:
        """Per image: path (as `path_text` writes it), image id, predicted class (unknown below a reject
        threshold, then the top class and its probability), then one probability per class."""
        answers = answer_cells(self.bundle.decision, self.decisions, self.bundle.classes)
        for path, image_id, answer, row in zip(self.features.paths, self.features.image_ids, answers, self.proba,
                                               strict=True):
            yield [path_text(path), image_id, *answer, *[f"{v:.6f}" for v in row]]


def feature_options(bundle: HeadBundle, model: str | os.PathLike) -> dict:
    """The `extract` options that remake the head's training features (backbones, layers, precision,
    runtime, weights, and for OpenVINO bf16 whether modules are kept in f32: a head fitted before
    2026-11-29 keeps the plain bf16 it was fitted on), checked against this installation so that nothing
    is computed with the wrong ones."""
    sources = bundle.sources
    precisions, runtimes = {s.precision for s in sources}, {s.runtime for s in sources}
    if len(precisions) != 1 or len(runtimes) != 1:
        raise BundleError(f"{model}: its feature sources mix precisions or runtimes "
                          f"{sorted(precisions)} {sorted(runtimes)}")
    precision, runtime = precisions.pop(), runtimes.pop()
    weights = sources[0].weights
    shas = {name: file_sha256(resolve_weights(get_spec(name), weights)) for name in {s.backbone for s in sources}}

    def keys(openvino_f32: bool) -> list[str]:
        return [cache_key(s.backbone, shas[s.backbone], s.layer, precision, runtime,
                          f32_modules(s.backbone, precision, runtime, openvino_f32)).dirname for s in sources]

    made = [s.cache_key for s in sources]
    # the same features as in training, or nothing is computed at all
    openvino_f32 = next((flag for flag in (True, False) if keys(flag) == made), None)
    if openvino_f32 is None:
        source, key = next((s, key) for s, key in zip(sources, keys(True), strict=True) if key != s.cache_key)
        raise BundleError(f"{model} was trained on features {source.cache_key}, but this installation "
                          f"makes {key} (different weights, preprocessing or decoder): refit the head")
    return {"backbones": list(dict.fromkeys(s.backbone for s in sources)),
            "layers": [f"{s.backbone}:{s.layer}" for s in sources], "precision": precision, "runtime": runtime,
            "weights": weights, "openvino_f32": openvino_f32}


def predict(model: str | os.PathLike, data: str | os.PathLike, cache_dir: str | os.PathLike = DEFAULTS.cache_dir,
            device: str = DEFAULTS.device, scheduler: str | None = None, progress: bool = True,
            trust_pickle: bool = False) -> Predictions:
    """Apply the saved head `model` to `data`; `trust_pickle` lets a format-1 head (a pickle) load, which
    runs any code the file holds (`load_bundle`)."""
    bundle = load_bundle(model, trust_pickle)
    return predict_with(bundle, data, cache_dir=cache_dir, device=device, scheduler=scheduler, progress=progress,
                        **feature_options(bundle, model))


def predict_with(bundle: HeadBundle, data: str | os.PathLike | Dataset, **extract_options) -> Predictions:
    """Apply a loaded head; `extract_options` are `extract`'s keywords, including `feature_options(bundle)`."""
    sources = bundle.sources
    report = extract(data, **extract_options)
    blocks = [report.feature_sets[(s.backbone, s.layer)].features.compute() for s in sources]
    rows = blocks[0].shape[0]
    proba = bundle.pipeline.predict_proba(np.hstack(blocks)) if rows else np.zeros((0, len(bundle.classes)))
    first = report.feature_sets[(sources[0].backbone, sources[0].layer)]
    return Predictions(bundle, first, proba, report)


def write_predictions(result: Predictions, out: str | os.PathLike) -> Path:
    """One row per image (`Predictions.rows`)."""
    out = Path(out)
    make_folder(out.parent)
    with atomic_write(out, newline="") as fh:  # whole or not at all: a failure leaves the old file
        writer = csv.writer(fh)
        writer.writerow(prediction_columns(result.bundle))
        writer.writerows(result.rows())
    return out


def evaluate(result: Predictions) -> dict:
    """Accuracy and macro-F1 on a labelled folder whose class folders carry the head's class names."""
    classes = result.bundle.classes
    names = result.features.class_names
    unknown = sorted(set(names) - set(classes))
    if not names:
        raise BundleError("evaluation needs a labelled image folder (DIR/<class>/<image>)")
    if not len(result.features.labels):
        raise BundleError("no usable image to evaluate on (see the skipped files)")
    if unknown:
        raise BundleError(f"classes the head does not know: {', '.join(unknown)}")
    warn_trained_on(result.report.feature_sets.values(), "the evaluated folder", TESTED, TEST_ELSEWHERE)
    truth = np.asarray([classes.index(names[i]) for i in result.features.labels])
    return {"images": int(len(truth)), "accuracy": float(accuracy_score(truth, result.predicted)),
            "macro_f1": float(f1_score(truth, result.predicted, average="macro"))}
