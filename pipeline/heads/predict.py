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
from pipeline.features.extract import ExtractReport, FeatureSet, cache_key, extract
from pipeline.features.settings import DEFAULTS
from pipeline.heads.bundle import BundleError, HeadBundle, load_bundle
from pipeline.images.data import Dataset
from pipeline.models.registry import get_spec
from pipeline.models.weights import file_sha256, resolve_weights


@dataclass
class Predictions:
    bundle: HeadBundle
    features: FeatureSet  # the first source: paths, ids and labels of the rows
    proba: np.ndarray
    report: ExtractReport

    @property
    def predicted(self) -> np.ndarray:
        if not len(self.proba):
            return np.zeros(0, dtype=int)
        return self.bundle.pipeline.classes_[self.proba.argmax(1)]

    def rows(self) -> Iterator[list[str]]:
        """Per image: path (as `path_text` writes it), image id, predicted class, then one probability per class."""
        classes = self.bundle.classes
        for path, image_id, label, row in zip(self.features.paths, self.features.image_ids, self.predicted,
                                              self.proba, strict=True):
            yield [path_text(path), image_id, classes[label], *[f"{v:.6f}" for v in row]]


def feature_options(bundle: HeadBundle, model: str | os.PathLike) -> dict:
    """The `extract` options that remake the head's training features (backbones, layers, precision,
    runtime, weights), checked against this installation so that nothing is computed with the wrong ones."""
    sources = bundle.sources
    precisions, runtimes = {s.precision for s in sources}, {s.runtime for s in sources}
    if len(precisions) != 1 or len(runtimes) != 1:
        raise BundleError(f"{model}: its feature sources mix precisions or runtimes "
                          f"{sorted(precisions)} {sorted(runtimes)}")
    precision, runtime = precisions.pop(), runtimes.pop()
    weights = sources[0].weights
    for source in sources:  # the same features as in training, or nothing is computed at all
        spec = get_spec(source.backbone)
        sha = file_sha256(resolve_weights(spec, weights))
        key = cache_key(source.backbone, sha, source.layer, precision, runtime).dirname
        if key != source.cache_key:
            raise BundleError(f"{model} was trained on features {source.cache_key}, but this installation "
                              f"makes {key} (different weights, preprocessing or decoder): refit the head")
    return {"backbones": list(dict.fromkeys(s.backbone for s in sources)),
            "layers": [f"{s.backbone}:{s.layer}" for s in sources], "precision": precision, "runtime": runtime,
            "weights": weights}


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
    """One row per image: path, image id, predicted class, then one probability column per class."""
    out = Path(out)
    make_folder(out.parent)
    classes = result.bundle.classes
    with atomic_write(out, newline="") as fh:  # whole or not at all: a failure leaves the old file
        writer = csv.writer(fh)
        writer.writerow(["path", "image_id", "predicted_class", *[f"p_{c}" for c in classes]])
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
    truth = np.asarray([classes.index(names[i]) for i in result.features.labels])
    return {"images": int(len(truth)), "accuracy": float(accuracy_score(truth, result.predicted)),
            "macro_f1": float(f1_score(truth, result.predicted, average="macro"))}
